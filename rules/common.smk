import json
import re
import shlex
from pathlib import Path

from snakemake.common.configfile import load_configfile
from snakemake.logging import logger

from lora2gguf.layout import (
    ADAPTER_COMPARE,
    ADAPTER_GGUF,
    ADAPTER_REPORT,
    BASE_F16_GGUF,
    BASE_QUANT_GGUF,
    BASE_QUANT_SIDECAR,
    BENCHMARKS,
    CANDIDATES_PLOT,
    CHAT_PARITY,
    COMPARE_REPORT,
    COMPARISON_PLOT,
    COMPARISON_PLOTS,
    DEMO_DATA_INFO,
    DEMO_DIR,
    DEMO_EVAL_JSONL,
    DEMO_EVAL_TEXT,
    DEMO_RUN,
    DEMO_SMOLLM2_BASE,
    DEMO_TINY_BASE,
    DEMO_TRAIN_JSONL,
    DEMO_TRAIN_TEXT,
    DEPLOY_NOTES,
    DEPLOY_REPORT,
    F16_GGUF,
    IMATRIX_GGUF,
    IMATRIX_REPORT,
    LOGS,
    MANIFEST,
    MERGE_REPORT,
    MERGED_DIR,
    MODEL_ANALYSIS,
    MODELFILE,
    QUANT_GGUF,
    QUANT_SIDECAR,
    SIZE_VS_KL,
    SIZE_VS_PERPLEXITY,
    SPEED,
    TEST_REPORT,
)
from lora2gguf.quantize.types import NEEDS_IMATRIX, quant_file_tag, split_quant_tag
from lora2gguf.rank import ADAPTER_CONFIG, METRIC_FILES, STATE_FILE, TRAINING_RECORDS


def quant_tags():
    """File tags of the configured quantizations: Q4_K_M -> q4_km, {type: Q4_K_M, imatrix: true} -> q4_km-imat."""
    return [quant_tag_of(t) for t in config["quantize"]["types"]]


def config_sources():
    """(name, values) of each config source in the order Snakemake merged them, the last one
    winning: config.yaml (unless --replace-workflow-config), each --configfile, then --config.
    """
    settings = workflow.config_settings
    given = [Path(path) for path in settings.configfiles]
    sources = []
    if not (settings.replace_workflow_config and settings.overwrite_config):
        sources += [
            (str(path), load_configfile(path))
            for path in workflow.configfiles
            if Path(path).absolute() not in given
        ]
    sources += [(shown_path(path), load_configfile(path)) for path in given]
    if settings.config:
        sources.append(("--config", dict(settings.config)))
    return sources


def shown_path(path):
    """A config file as the user would name it: relative to the working directory when inside it."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def config_error(keys, problem, missing=False):
    """``<file>: <key>: <problem>``, naming the file that set the key (the last one: it won the
    merge) or, for a missing key, the last file given: where the user would add it."""
    sources = [name for name, _ in config_sources() if name != "--config"]
    where = sources[-1] if sources else "config.yaml"
    if not missing:
        for name, values in reversed(config_sources()):
            if has_key(values, keys):
                where = name
                break
    return ValueError(f"{where}: {'.'.join(keys)}: {problem}")


def has_key(values, keys):
    for key in keys:
        if not isinstance(values, dict) or key not in values:
            return False
        values = values[key]
    return True


def own_candidates():
    """The candidates of the last config source that names any, or None. Snakemake merges a
    --configfile into config.yaml key by key; taken as is, candidates written in config.yaml would
    join those of your own file, so the last file naming candidates decides which ones run.
    """
    for name, values in reversed(config_sources()):
        named = values.get("candidates") if isinstance(values, dict) else None
        if named:
            dropped = sorted(set(config.get("candidates", {})) - set(named))
            if dropped:
                logger.info(
                    f"left out candidates {', '.join(dropped)}: {name} names its own"
                )
            return {key: config["candidates"][key] for key in named}
    return None


def apply_demo_defaults():
    """The demo supplies its runs as candidates and its own held-out and training texts, but only
    while it is enabled and no config names a candidate: a config of your own never picks up the
    demo's runs, nor scores or calibrates your models on the demo's text."""
    candidates = own_candidates()
    if candidates or not config["demo"]["enabled"]:
        config["candidates"] = candidates or {}
        return
    config["candidates"] = {
        name: {"base": run["base"], "run": DEMO_RUN.format(run=name)}
        for name, run in config["demo"].get("runs", {}).items()
    }
    config["evaluation"].setdefault("text", DEMO_EVAL_TEXT)
    if "calibration" in config:
        config["calibration"].setdefault("text", DEMO_TRAIN_TEXT)


def check_required_keys():
    """Keys the demo fills in for itself that a config of your own must name."""
    if not config["candidates"]:
        raise config_error(
            ("candidates",),
            "none named; name your LoRA runs (base, run) there (the demo's runs are the "
            "candidates only while demo.enabled is true and no candidate is named)",
            missing=True,
        )
    if not config["evaluation"].get("text"):
        raise config_error(
            ("evaluation", "text"),
            "missing; name a held-out text file (the demo's is used only for its own candidates)",
            missing=True,
        )
    if not uses_imatrix():
        return
    if "calibration" not in config:
        raise config_error(
            ("calibration",),
            "required when a quantize.types entry has imatrix: true",
            missing=True,
        )
    if not config["calibration"].get("text"):
        raise config_error(
            ("calibration", "text"),
            "missing; a quantize.types entry has imatrix: true, so name an in-domain text "
            "(e.g. the fine-tuning data) or drop imatrix: true",
            missing=True,
        )


def is_demo_path(path):
    """Paths under resources/demo/ are built by rules/demo.smk when the demo is enabled."""
    demo = Path(DEMO_DIR).parts
    return config["demo"]["enabled"] and Path(path).parts[: len(demo)] == demo


def check_config_paths():
    """Fail before any job runs when a configured path is missing, naming its key."""
    keyed = {}
    for name, cand in config["candidates"].items():
        keyed["candidates", name, "base"] = cand["base"]
        keyed["candidates", name, "run"] = cand["run"]
    keyed["evaluation", "text"] = config["evaluation"]["text"]
    if uses_imatrix():
        keyed["calibration", "text"] = config["calibration"]["text"]
        if (
            Path(keyed["calibration", "text"]).resolve()
            == Path(keyed["evaluation", "text"]).resolve()
        ):
            raise config_error(
                ("calibration", "text"),
                "is evaluation.text; the comparison would score "
                "the imatrix files on their own calibration data",
            )
    for keys, path in keyed.items():
        if not is_demo_path(path) and not Path(path).exists():
            raise config_error(keys, f"path '{path}' does not exist")


def uses_imatrix():
    return any(t.endswith("-imat") for t in quant_tags())


def quant_tag_of(spec):
    """The file tag of a quantize.types entry: Q4_K_M -> q4_km, {type, imatrix: true} -> q4_km-imat."""
    if isinstance(spec, dict):
        return quant_file_tag(spec["type"], spec["imatrix"])
    return quant_file_tag(spec)


def check_deploy_file():
    """deploy.file must name a file the workflow builds."""
    spec = config["deploy"]["file"]
    if spec not in ("auto", "convert") and quant_tag_of(spec) not in quant_tags():
        raise config_error(
            ("deploy", "file"),
            f"{spec} is not among quantize.types; name one of them, or convert for model.gguf",
        )


def check_imatrix_only_types():
    """llama.cpp makes the IQ2 types and IQ3_XXS only with an importance matrix."""
    for spec in config["quantize"]["types"]:
        if not isinstance(spec, dict) and spec in NEEDS_IMATRIX:
            raise config_error(
                ("quantize", "types"),
                f"{spec} needs an importance matrix (as in llama-quantize); write it as "
                f"{{type: {spec}, imatrix: true}}",
            )


def check_training_templates():
    for name, cand in config["candidates"].items():
        path = cand.get("training_template")
        if path is not None and not Path(path).is_file():
            raise config_error(
                ("candidates", name, "training_template"),
                f"path '{path}' is not a file",
            )


apply_demo_defaults()
check_required_keys()
check_config_paths()
check_deploy_file()
check_imatrix_only_types()
check_training_templates()


def base_name(cand):
    """A base folder's name: {base} in the base GGUFs' paths."""
    return Path(cand["base"]).name


def adapter_candidates():
    """Candidates exported as adapters (config adapters.build): auto takes those that share their
    base with another candidate; true every candidate; false none."""
    build = config["adapters"]["build"]
    if build is False:
        return []
    names = sorted(config["candidates"])
    if build is True:
        return names
    bases = [base_name(config["candidates"][n]) for n in names]
    return [n for n, b in zip(names, bases) if bases.count(b) > 1]


def check_base_names():
    """Two different base folders with one name would write one base GGUF."""
    seen = {}
    for name in adapter_candidates():
        cand = config["candidates"][name]
        folder = Path(cand["base"]).resolve()
        other = seen.setdefault(base_name(cand), folder)
        if other != folder:
            raise config_error(
                ("candidates", name, "base"),
                f"another candidate's base has the same folder name '{base_name(cand)}' "
                f"({other}); the base GGUFs would collide: rename one folder",
            )


check_base_names()


wildcard_constraints:
    model="|".join(sorted(config["candidates"])),
    base="|".join(
        sorted({re.escape(base_name(c)) for c in config["candidates"].values()})
    )
    or "(?!)",
    atype=re.escape(config["adapters"]["outtype"]),
    q="|".join(quant_tags()),
    run="|".join(sorted(config["demo"].get("runs", {}))) or "(?!)",


def folder_inputs(path, names=None):
    """A folder as inputs: its files when it exists outside the demo (so a rewrite of one file
    makes the folder stale), the folder itself when a demo rule builds it."""
    if is_demo_path(path):
        return [path]
    folder = Path(path)
    files = (
        sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    )
    if names is not None:
        files = [p for p in files if p.name in names]
    return [str(p) for p in files] or [path]


def rank_inputs(wildcards):
    names = {*METRIC_FILES, STATE_FILE, ADAPTER_CONFIG, *TRAINING_RECORDS}
    return [
        f
        for cand in config["candidates"].values()
        for f in folder_inputs(cand["run"], names)
    ]


def rank_candidate_args():
    return " ".join(
        f"--candidate {name} {cand['run']} {cand['base']}"
        + (f" --trained-on {name} {cand['trained_on']}" if "trained_on" in cand else "")
        for name, cand in sorted(config["candidates"].items())
    )


def trained_on_arg(wildcards):
    """--trained-on for the merge when the candidate names it (else the run folder's record is read)."""
    kind = candidate(wildcards).get("trained_on")
    return f"--trained-on {kind}" if kind else ""


def candidate(wildcards):
    return config["candidates"][wildcards.model]


def candidate_base(wildcards):
    return candidate(wildcards)["base"]


def candidate_run(wildcards):
    return candidate(wildcards)["run"]


def base_inputs(wildcards):
    return folder_inputs(candidate_base(wildcards))


def run_inputs(wildcards):
    return folder_inputs(candidate_run(wildcards))


def quant_type(wildcards):
    return split_quant_tag(wildcards.q)[0]


def quantize_inputs(wildcards):
    """The F16 GGUF, plus the importance matrix for an imatrix quantization (tag *-imat)."""
    inputs = {"gguf": F16_GGUF.format(model=wildcards.model)}
    if split_quant_tag(wildcards.q)[1]:
        inputs["imatrix"] = IMATRIX_GGUF.format(model=wildcards.model)
    return inputs


def imatrix_arg(wildcards, input):
    return (
        f"--imatrix {shlex.quote(input.imatrix)}" if "imatrix" in input.keys() else ""
    )


def calibration_max_tokens_arg():
    max_tokens = config.get("calibration", {}).get("max_tokens")
    return "" if max_tokens is None else f"--max-tokens {max_tokens}"


def imatrix_targets(model):
    """The importance matrix and its report, when some quantization uses them."""
    if not uses_imatrix():
        return []
    return [IMATRIX_GGUF.format(model=model), IMATRIX_REPORT.format(model=model)]


def imatrix_outputs(wildcards):
    return imatrix_targets(wildcards.model)


def calibration_input_arg(wildcards):
    if not uses_imatrix():
        return ""
    return f"--input calibration_text={shlex.quote(config['calibration']['text'])}"


def best_candidate():
    """The winner of the ranking; evaluated only after the rank_candidates checkpoint ran."""
    analysis = checkpoints.rank_candidates.get().output.analysis
    with open(analysis, encoding="utf-8") as handle:
        return json.load(handle)["best"]


def per_quant(pattern):
    """``pattern`` once per configured quantization, {model} left for the rule's wildcard."""
    return expand(pattern, q=quant_tags(), allow_missing=True)


def comparison_plot(kind):
    """The path pattern of one comparison plot, {model} left for the rule's wildcard."""
    return expand(COMPARISON_PLOT, kind=[kind], allow_missing=True)[0]


def model_targets(model):
    return [
        MERGED_DIR.format(model=model),
        MERGE_REPORT.format(model=model),
        F16_GGUF.format(model=model),
        *(QUANT_GGUF.format(model=model, q=q) for q in quant_tags()),
        *imatrix_targets(model),
        TEST_REPORT.format(model=model),
        COMPARE_REPORT.format(model=model),
        *(COMPARISON_PLOT.format(model=model, kind=kind) for kind in COMPARISON_PLOTS),
        MODELFILE.format(model=model),
        DEPLOY_NOTES.format(model=model),
        DEPLOY_REPORT.format(model=model),
        CHAT_PARITY.format(model=model),
        *(
            [ADAPTER_COMPARE.format(model=model)]
            if model in adapter_candidates()
            else []
        ),
        MANIFEST.format(model=model),
    ]


def deploy_tag():
    """The deployed file's tag: deploy.file, where auto is the export guide's Q4_K_M when it is
    built, else the first quantize.types entry; None for model.gguf."""
    spec = config["deploy"]["file"]
    if spec == "convert":
        return None
    if spec != "auto":
        return quant_tag_of(spec)
    tags = quant_tags()
    return "q4_km" if "q4_km" in tags else (tags[0] if tags else None)


def deploy_gguf(wildcards):
    """The GGUF that deploy.file names for this model."""
    tag = deploy_tag()
    if tag is None:
        return F16_GGUF.format(model=wildcards.model)
    return QUANT_GGUF.format(model=wildcards.model, q=tag)


def training_template(wildcards):
    """The candidate's training_template as an input list (empty when none is named)."""
    path = candidate(wildcards).get("training_template")
    return [path] if path else []


def carried_template(wildcards):
    """The template the GGUF and the Modelfile carry instead of the run's own: the training template
    when one is named and deploy.template is training."""
    if config["deploy"]["template"] != "training":
        return []
    return training_template(wildcards)


def option_for(flag, paths):
    """``--flag 'path'`` for a one-element input list, nothing for an empty one."""
    return " ".join(f"{flag} {shlex.quote(str(path))}" for path in paths)


def base_folder(wildcards):
    """The base folder whose name is {base}."""
    for cand in config["candidates"].values():
        if base_name(cand) == wildcards.base:
            return cand["base"]
    raise ValueError(f"no candidate has a base named {wildcards.base}")


def base_folder_inputs(wildcards):
    return folder_inputs(base_folder(wildcards))


def plain_quant_tags():
    """Quantizations without an importance matrix: the base GGUFs are quantized plainly."""
    return [t for t in quant_tags() if not split_quant_tag(t)[1]]


def compared_quant_tag():
    """The quantization the adapter comparison scores: Q4_K_M when built, else the first plain one."""
    tags = plain_quant_tags()
    return "q4_km" if "q4_km" in tags else (tags[0] if tags else None)


def adapter_compare_inputs(wildcards):
    model = wildcards.model
    base = base_name(candidate(wildcards))
    inputs = {
        "adapter": ADAPTER_GGUF.format(
            model=model, atype=config["adapters"]["outtype"]
        ),
        "merged_f16": F16_GGUF.format(model=model),
        "base_f16": BASE_F16_GGUF.format(base=base),
    }
    tag = compared_quant_tag()
    if tag is not None:
        inputs["merged_quant"] = QUANT_GGUF.format(model=model, q=tag)
        inputs["base_quant"] = BASE_QUANT_GGUF.format(base=base, q=tag)
    return inputs


def adapter_compare_pairs(wildcards, input):
    pairs = [("merged_f16", "base_f16"), ("merged_quant", "base_quant")]
    return " ".join(
        f"--merged-gguf {shlex.quote(input[m])} --base-gguf {shlex.quote(input[b])}"
        for m, b in pairs
        if m in input.keys()
    )


def adapter_targets():
    """Every adapter and its report, and the shared bases' GGUFs (the comparison, which needs the
    merged files, is made for the best candidate: model_targets)."""
    names = adapter_candidates()
    bases = sorted({base_name(config["candidates"][n]) for n in names})
    atype = config["adapters"]["outtype"]
    return [
        *(BASE_F16_GGUF.format(base=b) for b in bases),
        *(
            BASE_QUANT_GGUF.format(base=b, q=q)
            for b in bases
            for q in plain_quant_tags()
        ),
        *(ADAPTER_GGUF.format(model=n, atype=atype) for n in names),
        *(ADAPTER_REPORT.format(model=n, atype=atype) for n in names),
    ]


def best_model_targets(wildcards):
    return model_targets(best_candidate())


def demo_run(wildcards):
    """Training settings of one demo LoRA run (config demo.runs)."""
    return config["demo"]["runs"][wildcards.run]


def demo_run_base(wildcards):
    return demo_run(wildcards)["base"]


def drop_threads(section):
    """Thread counts change speed, not results: left out of the manifest so they rerun nothing."""
    return {key: value for key, value in section.items() if key != "threads"}


def manifest_config(wildcards):
    """The config values that shape this model's artifacts (as JSON, so a change reruns the manifest)."""
    return json.dumps(
        {
            "candidate": {"name": wildcards.model, **candidate(wildcards)},
            "selection": config["selection"],
            "merge": config["merge"],
            "convert": config["convert"],
            "quantize": drop_threads(config["quantize"]),
            "calibration": (
                drop_threads(config["calibration"]) if uses_imatrix() else None
            ),
            "evaluation": drop_threads(config["evaluation"]),
            "generation": config["generation"],
            "test_prompts": config["test_prompts"],
            "deploy": drop_threads(config["deploy"]),
        },
        ensure_ascii=False,
        sort_keys=True,
    )


def manifest_outputs(wildcards, input):
    paths = [
        input.merged,
        input.merge_report,
        input.f16,
        *input.quants,
        *input.sidecars,
        *input.imatrix,
        input.test,
        input.compare,
        *input.plots,
        *input.deploy,
    ]
    return " ".join(f"--output {shlex.quote(str(path))}" for path in paths)
