"""Benchmark: the cost of calibration on a Qwen2-0.5B-sized model, against llama.cpp's own tools.

Inputs as in benchmarks/run.py (benchmarks/build_model.py: Qwen2-0.5B's exact shape, bf16, built
once, not timed), its F16 GGUF (lora2gguf convert, not timed) and the demo's training text. Each
step is a fresh child process (wall time, CPU time and peak RSS from wait4(), as in run.py):

    imatrix           lora2gguf imatrix (PyTorch float32, CPU)  vs  llama-imatrix on the F16 GGUF,
                      the same text cut to the same whole chunks
    quantize Q4_K_M   lora2gguf quantize --imatrix              vs  llama-quantize --imatrix, both
                      given our imatrix (and the plain quantization of both for the difference)

llama.cpp's tools come from LORA2GGUF_LLAMA_BIN (see `make llama-tools`); without them only our
side is measured and the report says so. Also reported: whether the two imatrix quantizations are
byte-identical, and how close the two importance matrices are (cosine similarity per entry).

    .venv/bin/python benchmarks/imatrix_speed.py --tokens 2048 --threads 2 --out results.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from run import _lora2gguf, _sha256, _summary, ensure_inputs, measure  # noqa: E402  (benchmarks/run.py)

from lora2gguf.demo.dataset import render_text  # noqa: E402
from lora2gguf.formats.imatrix import read_imatrix  # noqa: E402
from lora2gguf.provenance import device_info, package_versions  # noqa: E402

logger = logging.getLogger("benchmarks.imatrix_speed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lora2gguf-bench")
    parser.add_argument("--tokens", type=int, default=2048, help="calibration tokens (whole chunks)")
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--llama-bin", type=Path, default=os.environ.get("LORA2GGUF_LLAMA_BIN") or None)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.tokens % args.chunk_size:
        parser.error("--tokens must be a multiple of --chunk-size (llama-imatrix uses whole chunks)")

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    base, _run, model_info = ensure_inputs(work, seed=0, rebuild=False)
    f16 = work / "imatrix-model-f16.gguf"
    if not f16.is_file():
        measure(_lora2gguf() + ["convert", str(base), str(f16), "--outtype", "f16", "--no-progress"], work / "convert.log")
    text = work / "train.txt"
    text.write_text(render_text("train"), encoding="utf-8")
    chunks = args.tokens // args.chunk_size
    tools = args.llama_bin if args.llama_bin and (args.llama_bin / "llama-imatrix").is_file() else None

    steps: dict[str, dict[str, list[dict[str, Any]]]] = {"imatrix": {}, "quantize_plain": {}, "quantize_imatrix": {}}
    ours_imx, theirs_imx = work / "ours-imatrix.gguf", work / "llama-imatrix.gguf"
    for i in range(args.runs):
        m = measure(_lora2gguf() + ["imatrix", "--model", str(base), "--text", str(text), "--out", str(ours_imx),
                                    "--max-tokens", str(args.tokens), "--chunk-size", str(args.chunk_size),
                                    "--device", "cpu", "--threads", str(args.threads)], work / f"imatrix-ours-{i}.log")
        m["in_call_s"] = json.loads(ours_imx.with_suffix(".json").read_text())["measured"]["forward_seconds"]
        steps["imatrix"].setdefault("ours", []).append(m)
        if tools:
            m = measure([str(tools / "llama-imatrix"), "-m", str(f16), "-f", str(text), "-o", str(theirs_imx),
                         "-c", str(args.chunk_size), "--chunks", str(chunks), "--no-ppl", "-t", str(args.threads)],
                        work / f"imatrix-llama-{i}.log")
            steps["imatrix"].setdefault("llama.cpp", []).append(m)
        for kind, extra in (("quantize_plain", []), ("quantize_imatrix", ["--imatrix", str(ours_imx)])):
            out = work / f"ours-{kind}.gguf"
            m = measure(_lora2gguf() + ["quantize", str(f16), str(out), "Q4_K_M", "--threads", str(args.threads), *extra],
                        work / f"{kind}-ours-{i}.log")
            m["in_call_s"] = json.loads(out.with_suffix(".json").read_text())["time_s"]
            steps[kind].setdefault("ours", []).append(m)
            if tools:
                tool_args = ["--imatrix", str(ours_imx)] if extra else []
                m = measure([str(tools / "llama-quantize"), *tool_args, str(f16), str(work / f"llama-{kind}.gguf"),
                             "Q4_K_M", str(args.threads)], work / f"{kind}-llama-{i}.log")
                steps[kind].setdefault("llama.cpp", []).append(m)

    result: dict[str, Any] = {
        "what": "calibration cost on a Qwen2-0.5B-shaped model: imatrix collection and Q4_K_M with/without it",
        "model": model_info,
        "calibration": {"text": "demo training split", "tokens": args.tokens, "chunk_size": args.chunk_size},
        "threads": args.threads,
        "llama_cpp_tools": str(tools) if tools else None,
        "llama_cpp_tools_missing_reason": None if tools else "LORA2GGUF_LLAMA_BIN not set (make llama-tools)",
        "steps": {step: {impl: _summary(runs) for impl, runs in by.items()} for step, by in steps.items()},
        "versions": package_versions(),
        "device": device_info(),
    }
    if tools:
        a, b = read_imatrix(ours_imx), read_imatrix(theirs_imx)
        cosines = []
        for name in a.entries:
            x, y = a.entries[name].importance(), b.entries[name].importance()
            cosines.append(float(x @ y / ((x @ x) ** 0.5 * (y @ y) ** 0.5)))
        result["imatrix_agreement"] = {
            "same_entries": set(a.entries) == set(b.entries),
            "entries": len(a.entries),
            "tokens_ours": float(next(iter(a.entries.values())).counts[0]),
            "tokens_llama_cpp": float(next(iter(b.entries.values())).counts[0]),
            "cosine_min": min(cosines),
            "cosine_median": statistics.median(cosines),
        }
        result["q4_k_m_imatrix_byte_identical"] = _sha256(work / "ours-quantize_imatrix.gguf") == _sha256(
            work / "llama-quantize_imatrix.gguf"
        )

    print(f"\nQwen2-0.5B shape, {args.tokens} calibration tokens, {args.threads} threads, median of {args.runs}\n")
    print("| step | lora2gguf s | llama.cpp s | ratio | peak RSS ours / llama.cpp MB |")
    print("|---|---|---|---|---|")
    for step, by in result["steps"].items():
        o, t = by["ours"], by.get("llama.cpp")
        ratio = f"{o['median_process_s'] / t['median_process_s']:.2f}" if t else "not measured"
        t_s = f"{t['median_process_s']:.1f}" if t else "not measured"
        t_mb = f"{t['max_peak_rss_mb']:.0f}" if t else "-"
        print(f"| {step} | {o['median_process_s']:.1f} | {t_s} | {ratio} | {o['max_peak_rss_mb']:.0f} / {t_mb} |")
    if tools:
        print(f"\nimatrix agreement: {result['imatrix_agreement']}")
        print(f"Q4_K_M --imatrix byte-identical to llama-quantize: {result['q4_k_m_imatrix_byte_identical']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
