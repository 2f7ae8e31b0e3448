"""``lora2gguf adapter-compare``: base GGUF + LoRA adapter against the merged GGUF, both against the float
reference (adapter_compare.json)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lora2gguf.adapter.compare import AdapterCompareOptions, compare_adapter

HELP = "base GGUF + LoRA adapter vs the merged GGUF of each type, against the float reference (adapter_compare.json)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Score two ways to ship a run in llama.cpp on the evaluation text, against the merged Hugging Face model "
        "in float32: the merged GGUF of each type, and the base GGUF of the same type (paired by general.file_type) "
        "with the adapter GGUF applied at scale 1. Reports perplexity, KL divergence, top-1 agreement, the direct "
        "KL(merged || base+adapter) (target mean < 1e-4 for F16) and the size on disk of each way."
    )
    parser.add_argument("--reference", required=True, type=Path, help="merged Hugging Face model folder")
    parser.add_argument("--merged-gguf", required=True, action="append", type=Path,
                        help="a GGUF of the merged model (repeat: F16, Q4_K_M, ...)")
    parser.add_argument("--base-gguf", required=True, action="append", type=Path,
                        help="a GGUF of the base model, one per type of --merged-gguf (repeat)")
    parser.add_argument("--adapter", required=True, type=Path, help="the run's LoRA adapter GGUF (lora2gguf adapter)")
    parser.add_argument("--config", help="config.yaml to read evaluation.text / max_tokens / context from")
    parser.add_argument("--eval-text", help="held-out text for perplexity / KL")
    parser.add_argument("--max-tokens", type=int, help="tokens of the text scored (default 512)")
    parser.add_argument("--context", type=int, help="window / llama.cpp context size (default 512)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp and torch threads")
    parser.add_argument("--device", default="cpu", help="device of the PyTorch reference: cpu, cuda, auto")
    parser.add_argument("--out", required=True, type=Path, help="report path (adapter_compare.json)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the folder")
    parser.add_argument("--allow-pickle", action="store_true", help="allow pytorch_model.bin weights")


def run(args: argparse.Namespace) -> int:
    options = AdapterCompareOptions(
        reference=args.reference,
        merged_ggufs=tuple(args.merged_gguf),
        base_ggufs=tuple(args.base_gguf),
        adapter=args.adapter,
        out=args.out,
        config=args.config,
        eval_text=args.eval_text,
        max_tokens=args.max_tokens,
        context=args.context,
        threads=args.threads,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
    )
    compare_adapter(options)
    return 0
