"""``lora2gguf compare``: GGUF files in llama.cpp against the merged float model in PyTorch."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lora2gguf.evaluate.compare import CompareOptions, compare_models

HELP = "compare GGUF files in llama.cpp against the merged float model in PyTorch (compare_models.json)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reference", required=True, type=Path, help="merged Hugging Face model folder")
    parser.add_argument(
        "--gguf", required=True, action="append", type=Path, help="a GGUF file to compare (repeat the flag)"
    )
    parser.add_argument("--config", help="config.yaml to read evaluation, test_prompts and generation from")
    parser.add_argument("--eval-text", help="held-out text for perplexity / KL")
    parser.add_argument("--max-tokens", type=int, help="tokens of the text scored (default 512)")
    parser.add_argument("--context", type=int, help="window / llama.cpp context size (default 512)")
    parser.add_argument("--prompts", help="test prompts: JSON/YAML file or inline JSON list of {id, text}")
    parser.add_argument("--generation", help="generation settings (only max_new_tokens is used: decoding is greedy)")
    parser.add_argument("--max-new-tokens", type=int, help="override generation.max_new_tokens")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp threads")
    parser.add_argument(
        "--speed-repeats", type=int, default=3, help="prompt-processing timing runs per file (median reported)"
    )
    parser.add_argument("--device", default="cpu", help="device of the PyTorch reference: cpu, cuda, auto")
    parser.add_argument("--out", required=True, type=Path, help="report path (compare_models.json)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the folder")
    parser.add_argument("--allow-pickle", action="store_true", help="allow pytorch_model.bin weights")


def run(args: argparse.Namespace) -> int:
    options = CompareOptions(
        reference=args.reference,
        ggufs=tuple(args.gguf),
        out=args.out,
        config=args.config,
        eval_text=args.eval_text,
        max_tokens=args.max_tokens,
        context=args.context,
        prompts=args.prompts,
        generation=args.generation,
        max_new_tokens=args.max_new_tokens,
        threads=args.threads,
        speed_repeats=args.speed_repeats,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
    )
    compare_models(options)
    return 0
