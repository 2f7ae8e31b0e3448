"""``lora2gguf imatrix``: an importance matrix from calibration text, in llama.cpp's imatrix GGUF format.

The file can be given to ``lora2gguf quantize --imatrix`` and to llama.cpp's own
``llama-quantize --imatrix``.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

HELP = "compute an importance matrix (llama.cpp imatrix GGUF) by running the merged model over calibration text"

logger = logging.getLogger(__name__)

SCHEMA = "lora2gguf/imatrix/1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="merged Hugging Face model folder")
    parser.add_argument(
        "--text", required=True, type=Path, help="calibration text (UTF-8); keep it apart from evaluation text"
    )
    parser.add_argument("--out", required=True, type=Path, help="imatrix GGUF to write (atomically)")
    parser.add_argument("--report", type=Path, help="JSON report (default: OUT with .json suffix)")
    parser.add_argument("--chunk-size", type=int, default=512, help="tokens per forward pass (llama-imatrix -c)")
    parser.add_argument("--max-tokens", type=int, default=None, help="use at most this many tokens of the text")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="PyTorch CPU threads")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the folder")
    parser.add_argument("--allow-pickle", action="store_true", help="allow pytorch_model.bin weights")


def run(args: argparse.Namespace) -> int:
    import torch

    from lora2gguf.artifacts import atomic_file, sha256_file, sha256_tree, write_json
    from lora2gguf.errors import Lora2ggufError
    from lora2gguf.evaluate import reference
    from lora2gguf.imatrix.collect import collect
    from lora2gguf.imatrix.fileformat import write_imatrix
    from lora2gguf.provenance import PeakMemory, device_info, package_versions

    if args.max_tokens is not None and args.max_tokens < 1:
        raise Lora2ggufError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if not args.text.is_file():
        raise Lora2ggufError(f"{args.text}: calibration text not found")
    try:
        text = args.text.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise Lora2ggufError(f"{args.text}: not UTF-8 text ({exc})") from exc
    device = reference.select_device(args.device)
    torch.set_num_threads(args.threads)
    with PeakMemory() as mem:
        model, tokenizer = reference.load(
            args.model, device, torch.float32,
            trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
        )
        imatrix, stats = collect(
            model, tokenizer, args.model, text,
            chunk_size=args.chunk_size, max_tokens=args.max_tokens, dataset=str(args.text),
        )
        del model
    with atomic_file(args.out) as tmp:
        write_imatrix(tmp, imatrix)
    logger.info(
        "%s: %d matrices from %d tokens in %d chunks of %d (%.1f s on %s)",
        args.out, len(imatrix.entries), stats.tokens_used, stats.chunks, args.chunk_size, stats.seconds, stats.device,
    )
    report = {
        "schema": SCHEMA,
        "output": {"path": str(args.out), "sha256": sha256_file(args.out), "entries": len(imatrix.entries)},
        "model": {"path": str(args.model), "sha256": sha256_tree(args.model)},
        "calibration": {
            "text": str(args.text),
            "sha256": sha256_file(args.text),
            "tokens_in_text": stats.tokens_available,
            "tokens_used": stats.tokens_used,
            "max_tokens": args.max_tokens,
            "chunk_size": args.chunk_size,
            "chunks": stats.chunks,
        },
        "measured": {
            "what": "sum over tokens of the squared input of every blk.* linear layer, and the token count",
            "forward_seconds": round(stats.seconds, 3),
            "tokens_per_second": round(stats.tokens_used / stats.seconds, 1) if stats.seconds > 0 else None,
            "peak_rss_mb": mem.peak_rss_mb,
            **({"cuda_peak_mb": mem.cuda_peak_mb} if mem.cuda_peak_mb is not None else {}),
            "precision": "float32 model, float64 accumulation, stored float32",
        },
        "versions": package_versions(),
        "device_info": device_info(stats.device),
    }
    write_json(args.report or args.out.with_suffix(".json"), report)
    return 0
