"""``lora2gguf imatrix``: an importance matrix from calibration text, in llama.cpp's imatrix GGUF format.

The file can be given to ``lora2gguf quantize --imatrix`` and to llama.cpp's own
``llama-quantize --imatrix``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lora2gguf.imatrix.compute import ImatrixOptions, compute_imatrix

HELP = "compute an importance matrix (llama.cpp imatrix GGUF) by running the merged model over calibration text"


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
    options = ImatrixOptions(
        model=args.model,
        text=args.text,
        out=args.out,
        report=args.report,
        chunk_size=args.chunk_size,
        max_tokens=args.max_tokens,
        device=args.device,
        threads=args.threads,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
    )
    compute_imatrix(options)
    return 0
