"""Benchmark: what domain calibration buys. KL divergence of plain vs imatrix quantizations, in llama.cpp.

For one merged model: reference logits of the evaluation text in PyTorch float32 (once), then for each
amount of calibration text (tokens of the training text) an importance matrix, quantized files with
and without it, and their mean KL divergence / perplexity against the reference, scored in llama.cpp
on the same token ids (lora2gguf.evaluate.compare.score_gguf). The evaluation text is never used for
calibration.

    .venv/bin/python benchmarks/imatrix.py                    # demo model, Q4_K_M, 256..all tokens
    .venv/bin/python benchmarks/imatrix.py --types Q4_K_M Q4_0 --budgets 1024 0 --out results.json

A budget of 0 means all of the calibration text. Prints a table; --out writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora2gguf import hf  # noqa: E402  (after the checkout is put on the path)
from lora2gguf.artifacts import sha256_file  # noqa: E402
from lora2gguf import metrics  # noqa: E402
from lora2gguf.evaluate.compare import score_gguf  # noqa: E402
from lora2gguf.formats.imatrix import Imatrix, ImatrixEntry, write_imatrix  # noqa: E402
from lora2gguf.imatrix.collect import collect  # noqa: E402
from lora2gguf.provenance import device_info, package_versions  # noqa: E402
from lora2gguf.quantize.quantize import QuantizeOptions, quantize_gguf  # noqa: E402

logger = logging.getLogger("benchmarks.imatrix")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models/smollm2-counsel-r8-merged")
    parser.add_argument("--gguf", type=Path, default=ROOT / "models/smollm2-counsel-r8-merged-gguf/model.gguf")
    parser.add_argument("--calibration", type=Path, default=ROOT / "resources/demo/data/train.txt")
    parser.add_argument("--eval-text", type=Path, default=ROOT / "resources/demo/data/eval.txt")
    parser.add_argument("--types", nargs="+", default=["Q4_K_M"])
    parser.add_argument("--budgets", nargs="+", type=int, default=[128, 512, 2048, 8192, 0])
    parser.add_argument(
        "--samples", type=int, default=3,
        help="for budgets smaller than the text: this many disjoint slices of it (spread of the result)",
    )
    parser.add_argument(
        "--uniform-control", action=argparse.BooleanOptionalAction, default=True,
        help="also quantize with an all-ones importance matrix: llama.cpp's weighted search without any "
        "calibration, to separate what the search itself gains from what the calibration text adds",
    )
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--max-eval-tokens", type=int, default=4096)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    torch.set_num_threads(args.threads)
    model, tokenizer = hf.load(args.model, "cpu", torch.float32)
    ids = hf.text_ids(tokenizer, args.eval_text.read_text(encoding="utf-8"), args.max_eval_tokens)
    windows = metrics.windows(ids, args.context)
    ref_logits = [hf.logits(model, w) for w in windows]
    ref = {"logits": ref_logits, "vocab": int(ref_logits[0].shape[1])}
    ref_nll = [x for w, lg in zip(windows, ref_logits) for x in metrics.window_nll(lg, w)]
    calibration = args.calibration.read_text(encoding="utf-8")

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="imatrix-bench-") as tmp:
        work = Path(tmp)
        for qtype in args.types:
            plain = work / f"plain-{qtype}.gguf"
            quantize_gguf(args.gguf, plain, QuantizeOptions(qtype, threads=args.threads))
            score = score_gguf(plain, ref, windows, args.context, args.threads)
            rows.append({"type": qtype, "calibration_tokens": None, **_figures(score)})
        n_calibration = len(tokenizer(calibration, verbose=False)["input_ids"])
        for budget in args.budgets:
            fits = n_calibration // budget if budget else 1
            for sample in range(min(args.samples, fits) if budget else 1):
                imx = work / f"imatrix-{budget}-{sample}.gguf"
                start = time.perf_counter()
                imatrix, stats = collect(
                    model, tokenizer, args.model, calibration, chunk_size=args.chunk_size,
                    max_tokens=budget or None, dataset=str(args.calibration), start_token=sample * budget,
                )
                write_imatrix(imx, imatrix)
                imatrix_s = time.perf_counter() - start
                for qtype in args.types:
                    out = work / f"imat-{budget}-{sample}-{qtype}.gguf"
                    quantize_gguf(args.gguf, out, QuantizeOptions(qtype, threads=args.threads, imatrix=str(imx)))
                    score = score_gguf(out, ref, windows, args.context, args.threads)
                    rows.append(
                        {
                            "type": qtype,
                            "calibration_tokens": stats.tokens_used,
                            "calibration_start_token": sample * budget,
                            "imatrix_seconds": round(imatrix_s, 1),
                            **_figures(score),
                        }
                    )
        if args.uniform_control:
            uniform = Imatrix(
                entries={
                    name: ImatrixEntry(np.ones_like(entry.sums), np.ones_like(entry.counts))
                    for name, entry in imatrix.entries.items()
                },
                datasets=["uniform (all ones)"],
                chunk_count=1,
                chunk_size=args.chunk_size,
            )
            imx = work / "imatrix-uniform.gguf"
            write_imatrix(imx, uniform)
            for qtype in args.types:
                out = work / f"uniform-{qtype}.gguf"
                quantize_gguf(args.gguf, out, QuantizeOptions(qtype, threads=args.threads, imatrix=str(imx)))
                score = score_gguf(out, ref, windows, args.context, args.threads)
                rows.append({"type": qtype, "calibration_tokens": 0, "uniform_control": True, **_figures(score)})
    plain_kl = {r["type"]: r["mean_kl"] for r in rows if r["calibration_tokens"] is None}
    for r in rows:
        r["kl_change_vs_plain"] = round(r["mean_kl"] / plain_kl[r["type"]] - 1, 4)
    print(f"\nreference perplexity {metrics.perplexity(ref_nll):.4f} on {len(ids)} evaluation tokens\n")
    print("| type | calibration tokens | from token | imatrix s | mean KL | KL vs plain | ppl | top-1 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        tokens = "plain (none)" if r["calibration_tokens"] is None else str(r["calibration_tokens"])
        if r.get("uniform_control"):
            tokens = "uniform weights (no text)"
        seconds = f"{r['imatrix_seconds']:.1f}" if "imatrix_seconds" in r else "-"
        print(
            f"| {r['type']} | {tokens} | {r.get('calibration_start_token', '-')} | {seconds} | {r['mean_kl']:.5f} "
            f"| {100 * r['kl_change_vs_plain']:+.1f}% | {r['perplexity']:.4f} | {r['top1']:.4f} |"
        )
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "what": "mean KL divergence (llama.cpp vs PyTorch float32) on the evaluation text, plain vs imatrix",
                    "model": str(args.model),
                    "gguf_sha256": sha256_file(args.gguf),
                    "calibration": {"path": str(args.calibration), "sha256": sha256_file(args.calibration)},
                    "evaluation": {"path": str(args.eval_text), "sha256": sha256_file(args.eval_text), "tokens": len(ids)},
                    "reference_perplexity": metrics.perplexity(ref_nll),
                    "chunk_size": args.chunk_size,
                    "rows": rows,
                    "versions": package_versions(),
                    "device": device_info(),
                },
                indent=2,
            )
            + "\n"
        )
    return 0


def _figures(score: dict[str, Any]) -> dict[str, Any]:
    return {
        "mean_kl": score["kl_divergence"]["mean"],
        "perplexity": score["perplexity"],
        "top1": score["top1_agreement"],
        "positions": score["positions"],
    }


if __name__ == "__main__":
    raise SystemExit(main())
