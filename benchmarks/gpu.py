"""GPU part of the benchmark: the Qwen2-0.5B-shaped model merged and tested on CUDA in bf16.

Run on a machine with an NVIDIA GPU, torch, transformers and peft (lora2gguf from this checkout on
PYTHONPATH; gguf and llama.cpp are not needed):

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/gpu.py --out OUT_DIR [--runs 3]

1. builds the inputs on that machine (benchmarks/build_model.py: random, seeded; nothing carried),
2. times ``lora2gguf merge --device cuda`` as fresh processes (--runs times),
3. runs ``lora2gguf test`` (the export guide's inference test) on the merged model in bf16 on CUDA with
   the config's test prompts and generation settings, one prompt at a time and as one padded batch,
   and again with 256 new tokens per prompt (the guide's "2-5 s per prompt" implies long replies),
4. writes OUT_DIR/gpu-results.json (every figure, device named) and OUT_DIR/gpu-results.md.

Each measurement's raw report is copied to OUT_DIR too. A failing step is recorded with its error
and the rest still runs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger("benchmarks.gpu")


def _gpu_facts() -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                     multiprocessors=props.multi_processor_count, device_count=torch.cuda.device_count())
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30, check=False)
        facts["nvidia_smi"] = smi.stdout.strip()
    except OSError as exc:
        facts["nvidia_smi"] = f"not available: {exc}"
    return facts


def _versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "safetensors", "tokenizers", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _summ_test(report: dict[str, Any]) -> dict[str, Any]:
    s = report["summary"]
    return {
        "batched": report["settings"]["batched"],
        "dtype": report["dtype"],
        "max_new_tokens": report["settings"]["generation"]["max_new_tokens"],
        "load_s": round(s["load_seconds"], 3),
        "generation_s": round(s["generation_seconds"], 3),
        "generated_tokens": s["generated_tokens"],
        "throughput_tokens_per_s": round(s["overall_tokens_per_s"], 1),
        "mean_time_to_first_token_s": round(s["mean_time_to_first_token_s"], 4),
        "mean_latency_s": round(s["mean_latency_s"], 3),
        "mean_tokens_per_s": round(s["mean_tokens_per_s"], 1) if s["mean_tokens_per_s"] else None,
        "cuda_peak_allocated_mb": s["memory"].get("cuda_peak_allocated_mb"),
        "cases": [
            {k: c[k] for k in ("id", "prompt_tokens", "generated_tokens", "stopped_by")}
            | {"time_to_first_token_s": round(c["time_to_first_token_s"], 4), "latency_s": round(c["latency_s"], 3),
               "tokens_per_s": round(c["tokens_per_s"], 1) if c["tokens_per_s"] else None}
            for c in report["cases"]
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu-results.json/.md and raw reports")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lora2gguf-gpu-bench"))
    parser.add_argument("--runs", type=int, default=3, help="merge runs")
    parser.add_argument("--long-tokens", type=int, default=256, help="max_new_tokens of the long-reply test")
    parser.add_argument("--config", type=Path, default=ROOT / "config.yaml")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to check this script")
    parser.add_argument("--shape", default="qwen2-0.5b", help="smoke: small model, to check this script")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    os.environ["HF_HUB_OFFLINE"] = "1"
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)

    import yaml

    from benchmarks.run import measure

    res: dict[str, Any] = {
        "schema": "lora2gguf/bench-gpu/1",
        "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"hostname": platform.node(), "cpu_count": os.cpu_count(), "platform": platform.platform()},
        "device": _gpu_facts(),
        "versions": _versions(),
        "errors": {},
    }
    out_json = args.out / "gpu-results.json"

    def save() -> None:
        out_json.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")

    save()
    # 1. inputs, built here (random, seeded): nothing to carry.
    from benchmarks import build_model

    start = time.perf_counter()
    base, run = build_model.build(args.work / "inputs", seed=0, dtype="bfloat16", shape=args.shape)
    res["inputs"] = {"builder": "benchmarks/build_model.py", "seed": 0, "dtype": "bfloat16",
                     "build_s": round(time.perf_counter() - start, 1), "shape": args.shape}
    save()

    # 2. merge on CUDA, fresh processes.
    merged = args.work / "merged"
    cli = [sys.executable, "-m", "lora2gguf.cli"]
    merges = []
    for i in range(args.runs):
        report = args.work / "merge_report.json"
        try:
            m = measure(cli + ["merge", "--base", str(base), "--adapter", str(run), "--out", str(merged),
                               "--device", args.device, "--report", str(report)], args.work / f"merge-{i}.log")
        except RuntimeError as exc:
            res["errors"][f"merge-{i}"] = str(exc)[-2000:]
            save()
            break
        data = json.loads(report.read_text())
        m.update(in_call_s=data["timing_s"]["total"], phases_s=data["timing_s"], dtype=data["settings"]["dtype"],
                 device=data["settings"]["device"], gpu=data["device_info"].get("gpu"),
                 cuda_peak_allocated_mb=data["memory"]["cuda_peak_allocated_mb"],
                 verification={k: data["verification"].get(k) for k in ("max_abs_logit_delta", "mean_kl", "top1_agreement")})
        merges.append(m)
        logger.info("merge on cuda run %d: %.1f s process, %.1f s in-call", i + 1, m["process_s"], m["in_call_s"])
        if i == 0:
            shutil.copy2(report, args.out / "merge_report.json")
    res["merge"] = {"runs": merges}
    if merges:
        in_call = sorted(m["in_call_s"] for m in merges)
        process = sorted(m["process_s"] for m in merges)
        res["merge"].update(median_in_call_s=in_call[len(in_call) // 2], median_process_s=process[len(process) // 2])
    save()
    if not merges:
        return 1

    # 3. the inference test, as `lora2gguf test` runs it.
    generation = yaml.safe_load(args.config.read_text(encoding="utf-8")).get("generation") or {}
    variants = [
        ("one-at-a-time", "off", generation),
        ("batched", "on", generation),
        (f"one-at-a-time-{args.long_tokens}", "off", {**generation, "max_new_tokens": args.long_tokens}),
        (f"batched-{args.long_tokens}", "on", {**generation, "max_new_tokens": args.long_tokens}),
    ]
    res["inference"] = {}
    for name, batch, gen in variants:
        report = args.work / f"test-{name}.json"
        try:
            m = measure(cli + ["test", "--model", str(merged), "--config", str(args.config), "--generation", json.dumps(gen),
                               "--out", str(report), "--device", args.device, "--dtype", "auto", "--batch", batch],
                        args.work / f"test-{name}.log")
        except RuntimeError as exc:
            res["errors"][f"test-{name}"] = str(exc)[-2000:]
            save()
            continue
        data = json.loads(report.read_text())
        res["inference"][name] = {"process_s": m["process_s"], **_summ_test(data)}
        shutil.copy2(report, args.out / f"test-{name}.json")
        s = res["inference"][name]
        logger.info("%s: ttft %.3f s, %.1f tok/s per prompt, %.1f tok/s overall", name,
                    s["mean_time_to_first_token_s"], s["mean_tokens_per_s"] or 0, s["throughput_tokens_per_s"])
        save()
    res["finished_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    save()
    (args.out / "gpu-results.md").write_text(render_markdown(res), encoding="utf-8")
    print(render_markdown(res))
    return 0


def render_markdown(res: dict[str, Any]) -> str:
    dev = res["device"]
    lines = [
        f"# lora2gguf on GPU: {dev.get('gpu')} ({res['started_utc'][:10]})",
        "",
        f"torch {res['versions'].get('torch')} (CUDA {dev.get('cuda')}), transformers {res['versions'].get('transformers')}, "
        f"peft {res['versions'].get('peft')}; {dev.get('nvidia_smi')}; host {res['host']['cpu_count']} CPUs.",
        "Model: random weights with Qwen2-0.5B's architecture in bf16 (benchmarks/build_model.py), LoRA r=8 on all linear layers.",
        "",
    ]
    merge = res.get("merge", {})
    if merge.get("runs"):
        run_list = ", ".join(f"{m['process_s']:.1f}" for m in merge["runs"])
        lines += [
            f"Merge on CUDA (`lora2gguf merge --device cuda`, bf16, including the reload-and-compare check): median "
            f"{merge['median_in_call_s']:.1f} s in the call, {merge['median_process_s']:.1f} s as a process "
            f"(runs: {run_list} s).",
            "",
        ]
    if res.get("inference"):
        lines += [
            "| inference test | max new tokens | mean time to first token s | mean tokens/s per prompt | "
            "mean latency s | throughput tokens/s (all prompts) | CUDA peak MB |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, s in res["inference"].items():
            lines.append(
                f"| {name} | {s['max_new_tokens']} | {s['mean_time_to_first_token_s']:.3f} | {s['mean_tokens_per_s']} | "
                f"{s['mean_latency_s']:.2f} | {s['throughput_tokens_per_s']} | {s['cuda_peak_allocated_mb']} |"
            )
        lines += ["", "The export guide expects 2-5 s per prompt at 50-100 tokens/s on a GPU."]
    if res["errors"]:
        lines += ["", "Errors: " + "; ".join(f"{k}: {v[-300:]}" for k, v in res["errors"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
