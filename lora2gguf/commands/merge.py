"""``lora2gguf merge``: LoRA adapter + base model -> verified, merged Hugging Face folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from lora2gguf.merge.merge import DEVICES, DTYPES, QLORA_TARGETS, TRAINED_ON, MergeOptions, merge_adapter

HELP = "merge a LoRA adapter into its base model (peft), verify the logits, write an HF folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, type=Path, help="base model folder (Hugging Face layout)")
    parser.add_argument(
        "--adapter", required=True, type=Path, help="LoRA run folder with adapter_config.json (LLaMA-Factory output)"
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder for the merged model")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="weight dtype of the merge and output (auto: the base's)"
    )
    parser.add_argument("--device", choices=DEVICES, default="auto", help="where to merge (auto: cuda if available)")
    parser.add_argument(
        "--shard-size", default="2GB", help="largest weight file before sharding with an index (e.g. 2GB, 500MB)"
    )
    parser.add_argument("--report", type=Path, help="write the merge report JSON here")
    parser.add_argument(
        "--eval-text", type=Path, help="text for the verification batch (default: fixed pseudo-random token ids)"
    )
    parser.add_argument(
        "--allow-pickle", action="store_true", help="accept pickle (.bin) checkpoints (they can run code on load)"
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow model code shipped inside the base folder"
    )
    parser.add_argument(
        "--trained-on",
        choices=TRAINED_ON,
        help="the base the adapter was trained against (default: read from the run folder: LLaMA-Factory's "
        "training_args.yaml, else the adapter's README.md; float when neither records a quantization)",
    )
    parser.add_argument(
        "--qlora-target",
        choices=QLORA_TARGETS,
        default="auto",
        help="for a QLoRA (4-bit) run: merge into the dequantized base the adapter was trained on, the float "
        "base, or auto: build both and keep the one closer to the trained model (default: auto)",
    )


def run(args: argparse.Namespace) -> int:
    options = MergeOptions(
        base=args.base,
        adapter=args.adapter,
        out=args.out,
        dtype=args.dtype,
        device=args.device,
        shard_size=args.shard_size,
        report=args.report,
        eval_text=args.eval_text,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        trained_on=args.trained_on,
        qlora_target=args.qlora_target,
    )
    merge_adapter(options)
    return 0
