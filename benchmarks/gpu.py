"""GPU part of the benchmark: the Qwen2-0.5B-shaped model merged and tested on CUDA in bf16, the
inference test on its eager path and on its fast path (static KV cache + CUDA graphs).

Run on a machine with an NVIDIA GPU, torch, transformers and peft (lora2gguf from this checkout on
PYTHONPATH; llama.cpp is not needed; the `lora2gguf` command imports gguf-py):

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/gpu.py --out OUT_DIR [--runs 1] [--tokens 128,64,256]

1. builds the inputs on that machine (benchmarks/build_model.py: random, seeded; nothing carried),
2. times ``lora2gguf merge --device cuda`` as fresh processes (--runs times; 0: test the base model,
   which has the merged model's shape),
3. identity (in this process), in bf16 and in float32: the greedy tokens of every test prompt from
   the eager path (generate(), one prompt at a time: the reference) against generate() on a padded
   batch, the CUDA graph one prompt at a time, and the CUDA-graph batch with its prompts prefilled one
   by one and in one right-padded pass; no stop tokens, so every reply has all its tokens,
4. timing: runs ``lora2gguf test`` as fresh processes on that model in bf16 with the config's six
   test prompts, for each number of new tokens, one prompt at a time and as one batch, with
   ``--decode eager`` and ``--decode cuda-graph``: the process's wall time and the report's figures
   (set-up, time to first token, tokens/s per prompt, overall throughput, CUDA peak memory),
5. writes OUT_DIR/gpu-results.json (every figure, device named) and OUT_DIR/gpu-results.md.

A failing step is recorded with its error and the rest still runs.
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
PATHS = ("eager", "cuda-graph")


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


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _summ_test(report: dict[str, Any]) -> dict[str, Any]:
    s = report["summary"]
    record = report["settings"].get("decode", {})
    return {
        "decode_path": s.get("decode_path"),
        "decode_reason": record.get("reason"),
        "graphs_captured": record.get("graphs_captured"),
        "batched": report["settings"]["batched"],
        "dtype": report["dtype"],
        "max_new_tokens": report["settings"]["generation"]["max_new_tokens"],
        "load_s": round(s["load_seconds"], 3),
        "setup_s": _round(s.get("setup_seconds"), 3),
        "generation_s": round(s["generation_seconds"], 3),
        "generated_tokens": s["generated_tokens"],
        "throughput_tokens_per_s": round(s["overall_tokens_per_s"], 1),
        "throughput_after_setup_tokens_per_s": _round(s.get("overall_tokens_per_s_after_setup"), 1),
        "mean_time_to_first_token_s": round(s["mean_time_to_first_token_s"], 4),
        "mean_latency_s": round(s["mean_latency_s"], 3),
        "mean_tokens_per_s": _round(s["mean_tokens_per_s"], 1),
        "cuda_peak_allocated_mb": s["memory"].get("cuda_peak_allocated_mb"),
        "cases": [
            {k: c[k] for k in ("id", "prompt_tokens", "generated_tokens", "stopped_by")}
            | {"time_to_first_token_s": round(c["time_to_first_token_s"], 4), "latency_s": round(c["latency_s"], 3),
               "tokens_per_s": _round(c["tokens_per_s"], 1)}
            for c in report["cases"]
        ],
    }


def _merge(args: argparse.Namespace, base: Path, run: Path, res: dict[str, Any]) -> Path | None:
    """Merge on CUDA as fresh processes; the merged folder (the base with --runs 0)."""
    from benchmarks.run import measure

    if args.runs == 0:
        res["merge"] = {"skipped": "--runs 0: the inference test runs on the base model (same shape)"}
        return base
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
            break
        data = json.loads(report.read_text())
        m.update(in_call_s=data["timing_s"]["total"], phases_s=data["timing_s"], dtype=data["settings"]["dtype"],
                 device=data["settings"]["device"], gpu=data["device_info"].get("gpu"),
                 cuda_peak_allocated_mb=data["memory"]["cuda_peak_allocated_mb"])
        merges.append(m)
        logger.info("merge on cuda run %d: %.1f s process, %.1f s in-call", i + 1, m["process_s"], m["in_call_s"])
    res["merge"] = {"runs": merges}
    if not merges:
        return None
    in_call = sorted(m["in_call_s"] for m in merges)
    process = sorted(m["process_s"] for m in merges)
    res["merge"].update(median_in_call_s=in_call[len(in_call) // 2], median_process_s=process[len(process) // 2])
    return merged


def _timing(args: argparse.Namespace, model: Path, res: dict[str, Any], save: Any) -> None:
    """`lora2gguf test` as fresh processes: each token count, one at a time and batched, both paths."""
    import yaml

    from benchmarks.run import measure

    cli = [sys.executable, "-m", "lora2gguf.cli"]
    generation = yaml.safe_load(args.config.read_text(encoding="utf-8")).get("generation") or {}
    res.setdefault("inference", {})
    for tokens in args.tokens:
        for batch in ("off", "on"):
            for path in PATHS:
                name = f"{'batched' if batch == 'on' else 'one-at-a-time'}-{tokens}-{path}"
                report = args.work / f"test-{name}.json"
                gen = {**generation, "max_new_tokens": tokens}
                try:
                    m = measure(cli + ["test", "--model", str(model), "--config", str(args.config), "--generation",
                                       json.dumps(gen), "--out", str(report), "--device", args.device, "--dtype", "auto",
                                       "--batch", batch, "--decode", path], args.work / f"test-{name}.log")
                except RuntimeError as exc:
                    res["errors"][f"test-{name}"] = str(exc)[-2000:]
                    save()
                    continue
                res["inference"][name] = {"process_s": m["process_s"], **_summ_test(json.loads(report.read_text()))}
                s = res["inference"][name]
                logger.info("%s: %.1f s process, set-up %.2f s, ttft %.3f s, %.1f tok/s per prompt, %.1f tok/s overall",
                            name, m["process_s"], s["setup_s"] or 0, s["mean_time_to_first_token_s"],
                            s["mean_tokens_per_s"] or 0, s["throughput_tokens_per_s"])
                save()


def _compare(reference: list[list[int]], other: list[list[int]], ids: list[str]) -> dict[str, Any]:
    """Per prompt: identical or not, and the first position where the tokens differ."""
    rows = []
    for pid, ref, got in zip(ids, reference, other):
        first = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
        if first is None and len(ref) != len(got):
            first = min(len(ref), len(got))
        rows.append({"id": pid, "identical": first is None, "first_difference": first, "tokens": len(ref)})
    return {"identical_prompts": sum(r["identical"] for r in rows), "prompts": len(rows), "rows": rows}


def _decode_variants(model: Any, prompt_ids: list[list[int]], new: int) -> dict[str, tuple[list[list[int]], float]]:
    """Greedy tokens (no stop tokens) and seconds of each decoding variant."""
    import torch

    from lora2gguf.evaluate import decode
    from lora2gguf.evaluate import test as inference
    from lora2gguf.settings import Generation

    config = inference._generation_config(Generation(max_new_tokens=new), [], 0)
    positions = decode.cache_positions(prompt_ids, new)
    out: dict[str, tuple[list[list[int]], float]] = {}

    def timed(name: str, fn: Any) -> None:
        torch.cuda.synchronize()
        start = time.perf_counter()
        tokens = fn()
        torch.cuda.synchronize()
        out[name] = (tokens, time.perf_counter() - start)

    def graphs(rows: int, prefill: str = "rows") -> list[list[int]]:
        with torch.inference_mode():
            decoder = decode.GraphDecoder(model, rows, positions, prefill=prefill)
            decoder.setup(prompt_ids, new)
            if rows > 1:
                return [r.tokens for r in decoder.decode(prompt_ids, new, set())]
            return [decoder.decode([ids], new, set())[0].tokens for ids in prompt_ids]

    inference._generate(model, [prompt_ids[0]], inference._generation_config(Generation(max_new_tokens=2), [], 0), 0, 0)
    timed("eager one at a time", lambda: [inference._generate(model, [ids], config, 0, 0)[0][0] for ids in prompt_ids])
    timed("eager padded batch", lambda: inference._generate(model, prompt_ids, config, 0, 0)[0])
    timed("cuda-graph one at a time", lambda: graphs(1))
    timed("cuda-graph batch, prompts prefilled one by one", lambda: graphs(len(prompt_ids)))
    timed("cuda-graph batch, prompts prefilled in one padded pass", lambda: graphs(len(prompt_ids), "batch"))
    return out


def _identity(args: argparse.Namespace, model_dir: Path, res: dict[str, Any], save: Any) -> None:
    """Greedy tokens of every test prompt: each variant against eager one-at-a-time, bf16 and float32.
    No stop tokens: every reply runs to the full length on every path."""
    import torch

    from lora2gguf import hf
    from lora2gguf.settings import resolve_prompts

    prompts = resolve_prompts(str(args.config), None)
    res.setdefault("identity", {"max_new_tokens": args.identity_tokens, "reference": "eager one at a time"})
    for dtype in ("bfloat16", "float32"):
        try:
            model, tokenizer = hf.load(model_dir, args.device, getattr(torch, dtype))
            model.generation_config.eos_token_id = None  # generate() would stop at the model's own eos
            prompt_ids = [hf.chat_prompt_ids(tokenizer, p.text)[0] for p in prompts]
            variants = _decode_variants(model, prompt_ids, args.identity_tokens)
        except Exception as exc:  # noqa: BLE001 - a benchmark records the failure and goes on
            res["errors"][f"identity-{dtype}"] = f"{type(exc).__name__}: {exc}"[-2000:]
            save()
            continue
        reference = variants["eager one at a time"][0]
        res["identity"][dtype] = {
            name: {"seconds": round(seconds, 3), **_compare(reference, tokens, [p.id for p in prompts])}
            for name, (tokens, seconds) in variants.items()
        }
        for name, entry in res["identity"][dtype].items():
            logger.info("identity %s %s: %d/%d prompts identical", dtype, name, entry["identical_prompts"], entry["prompts"])
        del model
        torch.cuda.empty_cache()
        save()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu-results.json/.md and raw reports")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lora2gguf-gpu-bench"))
    parser.add_argument("--runs", type=int, default=3, help="merge runs (0: test the base model)")
    parser.add_argument("--tokens", default="128,64,256", help="max_new_tokens of the timed tests, comma-separated")
    parser.add_argument("--identity-tokens", type=int, default=128, help="greedy tokens per prompt of the identity check")
    parser.add_argument("--parts", default="timing,identity", help="timing, identity or both")
    parser.add_argument("--config", type=Path, default=ROOT / "config.yaml")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to check this script")
    parser.add_argument("--shape", default="qwen2-0.5b", help="smoke: small model, to check this script")
    args = parser.parse_args(argv)
    args.tokens = [int(t) for t in args.tokens.split(",") if t]
    args.parts = set(args.parts.split(","))
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    os.environ["HF_HUB_OFFLINE"] = "1"
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {
        "schema": "lora2gguf/bench-gpu/2",
        "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"hostname": platform.node(), "cpu_count": os.cpu_count(), "platform": platform.platform()},
        "device": _gpu_facts(),
        "versions": _versions(),
        "errors": {},
    }
    out_json = args.out / "gpu-results.json"

    def save() -> None:
        out_json.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
        (args.out / "gpu-results.md").write_text(render_markdown(res), encoding="utf-8")

    save()
    from benchmarks import build_model

    start = time.perf_counter()
    base, run = build_model.build(args.work / "inputs", seed=0, dtype="bfloat16", shape=args.shape)
    res["inputs"] = {"builder": "benchmarks/build_model.py", "seed": 0, "dtype": "bfloat16",
                     "build_s": round(time.perf_counter() - start, 1), "shape": args.shape}
    model = _merge(args, base, run, res)
    save()
    if model is None:
        return 1
    if "identity" in args.parts:
        _identity(args, model, res, save)
    if "timing" in args.parts:
        _timing(args, model, res, save)
    res["finished_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    save()
    shutil.copy2(args.out / "gpu-results.md", args.work / "gpu-results.md")
    print(render_markdown(res))
    return 0


def _timing_lines(inference: dict[str, Any]) -> list[str]:
    lines = [
        "| inference test | decode | new tokens | process s | set-up s | mean time to first token s | "
        "mean tokens/s per prompt | throughput tokens/s (all prompts) | after set-up | CUDA peak MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in inference.items():
        lines.append(
            f"| {'batched' if s['batched'] else 'one at a time'} | {s['decode_path']} | {s['max_new_tokens']} | "
            f"{s['process_s']:.1f} | {s['setup_s']} | {s['mean_time_to_first_token_s']:.3f} | {s['mean_tokens_per_s']} | "
            f"{s['throughput_tokens_per_s']} | {s['throughput_after_setup_tokens_per_s']} | {s['cuda_peak_allocated_mb']} |"
        )
    return lines


def _identity_lines(identity: dict[str, Any]) -> list[str]:
    lines = [
        f"Greedy tokens of the six test prompts, {identity['max_new_tokens']} each, against {identity['reference']}:",
        "",
        "| dtype | variant | prompts identical | first differences | seconds |",
        "|---|---|---:|---|---:|",
    ]
    for dtype in ("bfloat16", "float32"):
        for name, entry in identity.get(dtype, {}).items():
            diffs = ", ".join(f"{r['id']}@{r['first_difference']}" for r in entry["rows"] if not r["identical"]) or "-"
            lines.append(f"| {dtype} | {name} | {entry['identical_prompts']}/{entry['prompts']} | {diffs} | {entry['seconds']} |")
    return lines


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
    elif merge.get("skipped"):
        lines += [f"Merge not run: {merge['skipped']}.", ""]
    if res.get("inference"):
        lines += _timing_lines(res["inference"])
        lines += ["", "The export guide expects 2-5 s per prompt at 50-100 tokens/s on a GPU.", ""]
    if res.get("identity"):
        lines += _identity_lines(res["identity"])
    if res["errors"]:
        lines += ["", "Errors: " + "; ".join(f"{k}: {v[-300:]}" for k, v in res["errors"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
