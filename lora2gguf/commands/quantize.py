"""``lora2gguf quantize``: quantize a GGUF file like llama-quantize, in Python (no torch)."""

from __future__ import annotations

import argparse

from lora2gguf.errors import Lora2ggufError
from lora2gguf.quantize.quantize import QuantizeOptions, quantize_gguf
from lora2gguf.quantize.types import SUPPORTED

HELP = (
    "quantize a GGUF (F16/F32/BF16) file to Q8_0, Q4_0..Q5_1, Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K, "
    "IQ4_NL or IQ4_XS like llama-quantize"
)

_SUPPORTED = ", ".join(SUPPORTED)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN.gguf", help="GGUF file to quantize (normally F16)")
    parser.add_argument("output", metavar="OUT.gguf", help="quantized GGUF to write (atomically)")
    parser.add_argument("type", metavar="TYPE", help=f"file type: {_SUPPORTED} (case-insensitive)")
    parser.add_argument("--threads", type=int, default=None, help="worker threads (default: all CPU cores)")
    parser.add_argument(
        "--allow-requantize",
        action="store_true",
        help="accept an input that is already quantized (worse quality)",
    )
    parser.add_argument(
        "--output-tensor-type", metavar="T", default=None, help="type of output.weight (e.g. Q8_0, F16)"
    )
    parser.add_argument(
        "--token-embedding-type", metavar="T", default=None, help="type of token_embd.weight (e.g. Q8_0, F16)"
    )
    parser.add_argument(
        "--pure", action="store_true", help="no per-tensor mixture: every weight matrix gets the default type"
    )
    parser.add_argument(
        "--imatrix",
        metavar="FILE",
        default=None,
        help="importance matrix (llama.cpp imatrix GGUF, e.g. from lora2gguf imatrix): weight the "
        "quantization error of each column by it, as llama-quantize --imatrix",
    )
    parser.add_argument(
        "--sidecar",
        metavar="PATH",
        default=None,
        help="report JSON to write (default: OUT with .json suffix)",
    )


def run(args: argparse.Namespace) -> int:
    if args.threads is not None and args.threads < 1:
        raise Lora2ggufError(f"--threads must be at least 1, got {args.threads}")
    options = QuantizeOptions(
        file_type=args.type,
        threads=args.threads,
        allow_requantize=args.allow_requantize,
        output_tensor_type=args.output_tensor_type,
        token_embedding_type=args.token_embedding_type,
        pure=args.pure,
        imatrix=args.imatrix,
    )
    quantize_gguf(args.input, args.output, options, sidecar=args.sidecar)
    return 0
