"""Where the workflow puts every artifact: path patterns relative to its working directory.

Pure data, standard library only, so that the Snakemake rules (through rules/common.smk), the
manifest and the plot step all read one spelling of each path. Patterns use Snakemake's wildcard
syntax: ``{model}`` is a candidate name, ``{q}`` a quantization file tag (q4_km, q4_km-imat),
``{kind}`` a comparison plot name and ``{run}`` a demo LoRA run; fill them with ``str.format``.
"""

from __future__ import annotations

# The ranking of all candidates and its plot.
MODEL_ANALYSIS = "results/model_analysis.json"
PLOTS_DIR = "results/plots"
CANDIDATES_PLOT = f"{PLOTS_DIR}/candidates.png"

# One model's build.
MERGED_DIR = "models/{model}-merged"
MERGE_REPORT = "results/{model}/merge_report.json"
GGUF_DIR = "models/{model}-merged-gguf"
F16_GGUF = f"{GGUF_DIR}/model.gguf"
QUANT_GGUF = f"{GGUF_DIR}/model-{{q}}.gguf"
QUANT_SIDECAR = f"{GGUF_DIR}/model-{{q}}.json"
IMATRIX_GGUF = f"{GGUF_DIR}/imatrix.gguf"
IMATRIX_REPORT = "results/{model}/imatrix.json"
TEST_REPORT = "results/{model}/merged_model_test.json"
COMPARE_REPORT = "results/{model}/compare_models.json"
MANIFEST = "results/{model}/manifest.json"

# Deploying it: the Ollama Modelfile beside the GGUFs it names, the commands for each runtime, the
# template translation report and the chat parity of every renderer against training.
MODELFILE = f"{GGUF_DIR}/Modelfile"
DEPLOY_NOTES = "results/{model}/deploy.md"
DEPLOY_REPORT = "results/{model}/deploy.json"
CHAT_PARITY = "results/{model}/chat_parity.json"

# LoRA adapters shipped beside a base instead of merged: the base as GGUF once per quantization type
# ({base} is the base folder's name), each candidate's adapter GGUF, and how close each way of
# shipping comes to the float model.
BASE_GGUF_DIR = "models/bases/{base}-gguf"
BASE_F16_GGUF = f"{BASE_GGUF_DIR}/model.gguf"
BASE_QUANT_GGUF = f"{BASE_GGUF_DIR}/model-{{q}}.gguf"
BASE_QUANT_SIDECAR = f"{BASE_GGUF_DIR}/model-{{q}}.json"
ADAPTER_GGUF = "models/{model}-lora/adapter-{atype}.gguf"
ADAPTER_REPORT = "models/{model}-lora/adapter-{atype}.json"
ADAPTER_COMPARE = "results/{model}/adapter_compare.json"

# The float-vs-GGUF comparison plots, one file per kind: results/plots/{model}-{kind}.png
SIZE_VS_KL = "size-vs-kl"
SIZE_VS_PERPLEXITY = "size-vs-perplexity"
SPEED = "speed"
COMPARISON_PLOTS = (SIZE_VS_KL, SIZE_VS_PERPLEXITY, SPEED)
COMPARISON_PLOT_NAME = "{model}-{kind}.png"
COMPARISON_PLOT = f"{PLOTS_DIR}/{COMPARISON_PLOT_NAME}"

# The embedded demo's inputs (rules/demo.smk builds them when config.yaml points there).
DEMO_DIR = "resources/demo"
DEMO_DATA_DIR = f"{DEMO_DIR}/data"
DEMO_TRAIN_JSONL = f"{DEMO_DATA_DIR}/train.jsonl"
DEMO_EVAL_JSONL = f"{DEMO_DATA_DIR}/eval.jsonl"
DEMO_TRAIN_TEXT = f"{DEMO_DATA_DIR}/train.txt"
DEMO_EVAL_TEXT = f"{DEMO_DATA_DIR}/eval.txt"
DEMO_DATA_INFO = f"{DEMO_DATA_DIR}/dataset_info.json"
DEMO_TINY_BASE = f"{DEMO_DIR}/bases/tiny-qwen2"
DEMO_SMOLLM2_BASE = f"{DEMO_DIR}/bases/smollm2-135m"
DEMO_RUN = f"{DEMO_DIR}/runs/{{run}}"

# Which rule writes which artifact. The manifest names the rule of every file it hashes from this,
# without Snakemake; the rule names are fixed by contract (tests check them against rules/*.smk).
RULE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "rank_candidates": (MODEL_ANALYSIS,),
    "plot_candidates": (CANDIDATES_PLOT,),
    "merge_adapter": (MERGED_DIR, MERGE_REPORT),
    "convert_gguf": (F16_GGUF,),
    "quantize_gguf": (QUANT_GGUF, QUANT_SIDECAR),
    "compute_imatrix": (IMATRIX_GGUF, IMATRIX_REPORT),
    "test_merged_model": (TEST_REPORT,),
    "compare_models": (COMPARE_REPORT,),
    "plot_comparison": (COMPARISON_PLOT,),
    "deploy_model": (MODELFILE, DEPLOY_NOTES, DEPLOY_REPORT),
    "convert_base_gguf": (BASE_F16_GGUF,),
    "quantize_base_gguf": (BASE_QUANT_GGUF, BASE_QUANT_SIDECAR),
    "export_adapter": (ADAPTER_GGUF, ADAPTER_REPORT),
    "compare_adapter": (ADAPTER_COMPARE,),
    "check_chat_parity": (CHAT_PARITY,),
    "write_manifest": (MANIFEST,),
}
# directory() outputs: every file below one belongs to the rule that writes the folder.
FOLDER_OUTPUTS = frozenset({MERGED_DIR})

# Per-job logs and Snakemake benchmark tables, both under logs/ (benchmarks/ holds benchmark code):
# logs/{rule}{job}.log and logs/benchmarks/{rule}{job}.tsv, where {job} names the job of the rule.
LOG_DIR = "logs"
BENCHMARK_DIR = f"{LOG_DIR}/benchmarks"
_JOBS = {
    "rank_candidates": "",
    "plot_candidates": "",
    "merge_adapter": "/{model}",
    "convert_gguf": "/{model}",
    "quantize_gguf": "/{model}-{q}",
    "compute_imatrix": "/{model}",
    "test_merged_model": "/{model}",
    "compare_models": "/{model}",
    "plot_comparison": "/{model}",
    "deploy_model": "/{model}",
    "check_chat_parity": "/{model}",
    "convert_base_gguf": "/{base}",
    "quantize_base_gguf": "/{base}-{q}",
    "export_adapter": "/{model}-{atype}",
    "compare_adapter": "/{model}",
    "write_manifest": "/{model}",
    "build_demo_data": "",
    "build_demo_tiny_base": "",
    "build_demo_smollm2_base": "",
    "build_demo_lora_run": "/{run}",
}
LOGS = {rule: f"{LOG_DIR}/{rule}{job}.log" for rule, job in _JOBS.items()}
BENCHMARKS = {rule: f"{BENCHMARK_DIR}/{rule}{job}.tsv" for rule, job in _JOBS.items()}
