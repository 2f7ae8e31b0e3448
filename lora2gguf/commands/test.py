"""``lora2gguf test``: the export guide's inference test of a merged Hugging Face model."""

from __future__ import annotations

import argparse
from pathlib import Path

from lora2gguf.settings import DECODE_CHOICES
from lora2gguf.evaluate.test import TestOptions, run_test

HELP = "inference test of a merged Hugging Face model on the test prompts (merged_model_test.json)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="merged Hugging Face model folder")
    parser.add_argument("--config", help="config.yaml to read test_prompts and generation from")
    parser.add_argument("--prompts", help="test prompts: JSON/YAML file or inline JSON list of {id, text}")
    parser.add_argument("--generation", help="generation settings: JSON/YAML file or inline JSON object")
    parser.add_argument("--out", required=True, type=Path, help="report path (merged_model_test.json)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "float16", "bfloat16"),
        help="auto: the checkpoint's dtype on CUDA, float32 on CPU",
    )
    parser.add_argument(
        "--batch",
        default="auto",
        choices=("auto", "on", "off"),
        help="answer all prompts in one batch (eager: left-padded; cuda-graph: one static cache, each row at its "
        "own length); auto: batch on CUDA, one by one on CPU",
    )
    parser.add_argument(
        "--decode",
        choices=DECODE_CHOICES,
        help="auto (default; the config's evaluation.decode if --config gives one): cuda-graph on CUDA for greedy "
        "decoding, eager elsewhere; eager: transformers' generate(); cuda-graph: static KV cache, decode steps "
        "captured once as CUDA graphs and replayed",
    )
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the folder")
    parser.add_argument("--allow-pickle", action="store_true", help="allow pytorch_model.bin weights")


def run(args: argparse.Namespace) -> int:
    options = TestOptions(
        model=args.model,
        out=args.out,
        config=args.config,
        prompts=args.prompts,
        generation=args.generation,
        device=args.device,
        dtype=args.dtype,
        batch=args.batch,
        decode=args.decode,
        threads=args.threads,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
    )
    run_test(options)
    return 0
