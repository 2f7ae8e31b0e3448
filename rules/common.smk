import json
import shlex
from pathlib import Path

from lora2gguf.quant.types import file_tag, type_from_tag
from lora2gguf.ranking import ADAPTER_CONFIG, METRIC_FILES, STATE_FILE


wildcard_constraints:
    model="|".join(sorted(config["candidates"])),
    q="|".join(file_tag(t) for t in config["quantize"]["types"]),
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
    for key, path in keyed.items():
        if not is_demo_path(path) and not Path(path).exists():
            raise ValueError(f"config.yaml: {key}: path '{path}' does not exist")


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


def quant_tags():
    return [file_tag(t) for t in config["quantize"]["types"]]


def quant_type(wildcards):
    return type_from_tag(wildcards.q)


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
        input.test,
        input.compare,
        *input.plots,
    ]
    return " ".join(f"--output {shlex.quote(str(path))}" for path in paths)
