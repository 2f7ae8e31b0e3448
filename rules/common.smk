import json
import shlex
from pathlib import Path

from lora2gguf.quant.types import quant_file_tag, split_quant_tag
from lora2gguf.ranking import ADAPTER_CONFIG, METRIC_FILES, STATE_FILE


def quant_tags():
    """File tags of the configured quantizations: Q4_K_M -> q4_km, {type: Q4_K_M, imatrix: true} -> q4_km-imat."""
    return [
        (
            quant_file_tag(t["type"], t["imatrix"])
            if isinstance(t, dict)
            else quant_file_tag(t)
        )
        for t in config["quantize"]["types"]
    ]


wildcard_constraints:
    model="|".join(sorted(config["candidates"])),
    q="|".join(quant_tags()),
    run="|".join(sorted(config["demo"].get("runs", {}))) or "(?!)",


def is_demo_path(path):
    """Paths under resources/demo/ are built by rules/demo.smk when the demo is enabled."""
    return config["demo"]["enabled"] and Path(path).parts[:2] == ("resources", "demo")


def check_config_paths():
    """Fail before any job runs when a configured path is missing, naming its key."""
    keyed = {}
    for name, cand in config["candidates"].items():
        keyed[f"candidates.{name}.base"] = cand["base"]
        keyed[f"candidates.{name}.run"] = cand["run"]
    keyed["evaluation.text"] = config["evaluation"]["text"]
    if uses_imatrix():
        if "calibration" not in config:
            raise ValueError(
                "config.yaml: calibration: required when a quantize.types entry has imatrix: true"
            )
        keyed["calibration.text"] = config["calibration"]["text"]
        if (
            Path(keyed["calibration.text"]).resolve()
            == Path(keyed["evaluation.text"]).resolve()
        ):
            raise ValueError(
                "config.yaml: calibration.text: is evaluation.text; the comparison would score "
                "the imatrix files on their own calibration data"
            )
    for key, path in keyed.items():
        if not is_demo_path(path) and not Path(path).exists():
            raise ValueError(f"config.yaml: {key}: path '{path}' does not exist")


def uses_imatrix():
    return any(t.endswith("-imat") for t in quant_tags())


check_config_paths()


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
    names = {*METRIC_FILES, STATE_FILE, ADAPTER_CONFIG}
    return [
        f
        for cand in config["candidates"].values()
        for f in folder_inputs(cand["run"], names)
    ]


def rank_candidate_args():
    return " ".join(
        f"--candidate {name} {cand['run']} {cand['base']}"
        for name, cand in sorted(config["candidates"].items())
    )


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
    gguf_dir = f"models/{wildcards.model}-merged-gguf"
    inputs = {"gguf": f"{gguf_dir}/model.gguf"}
    if split_quant_tag(wildcards.q)[1]:
        inputs["imatrix"] = f"{gguf_dir}/imatrix.gguf"
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
    return [
        f"models/{model}-merged-gguf/imatrix.gguf",
        f"results/{model}/imatrix.json",
    ]


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


# Per-model comparison plots (rules/plot.smk): results/plots/{model}-{kind}.png
COMPARISON_PLOTS = ["size-vs-kl", "size-vs-perplexity", "speed"]


def model_targets(model):
    gguf_dir = f"models/{model}-merged-gguf"
    return [
        f"models/{model}-merged",
        f"results/{model}/merge_report.json",
        f"{gguf_dir}/model.gguf",
        *(f"{gguf_dir}/model-{q}.gguf" for q in quant_tags()),
        *imatrix_targets(model),
        f"results/{model}/merged_model_test.json",
        f"results/{model}/compare_models.json",
        *(f"results/plots/{model}-{kind}.png" for kind in COMPARISON_PLOTS),
        f"results/{model}/manifest.json",
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
    ]
    return " ".join(f"--output {shlex.quote(str(path))}" for path in paths)
