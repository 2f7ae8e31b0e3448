"""One ``lora2gguf demo`` subcommand: the dataset files, a base model or a LoRA run, written to a folder."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from lora2gguf.artifacts import HF_MODEL_FILES, HF_TOKENIZER_FILES, FolderShape, Output, atomic_dir, check_paths
from lora2gguf.demo.dataset import write_demo_data
from lora2gguf.demo.smollm2 import extract_smollm2
from lora2gguf.demo.tiny import DEFAULT_VOCAB_SIZE, build_tiny_qwen2
from lora2gguf.demo.train import TrainOptions, train_lora

logger = logging.getLogger(__name__)

DEMO_COMMANDS = ("data", "tiny-base", "smollm2-base", "train")

# What a previous output of each demo command holds: only such a folder is replaced by a rerun.
_BASE_SHAPE = (*HF_MODEL_FILES, "lora2gguf_provenance.json")
_RUN_SHAPE = (
    "adapter_config.json", "adapter_model.safetensors", "README.md", "all_results.json", "train_results.json",
    "eval_results.json", "trainer_state.json", "training_args.bin", "lora2gguf_demo_run.json", *HF_TOKENIZER_FILES,
)  # fmt: skip
OUTPUT_SHAPES = {
    "data": FolderShape("demo data", ("train.jsonl", "eval.jsonl", "train.txt", "eval.txt", "dataset_info.json")),
    "tiny-base": FolderShape("demo tiny-base", _BASE_SHAPE),
    "smollm2-base": FolderShape("demo smollm2-base", _BASE_SHAPE),
    "train": FolderShape("demo train", _RUN_SHAPE),
}


@dataclass(frozen=True)
class DemoOptions:
    """What to build (one of DEMO_COMMANDS) and where; the other fields serve one command each."""

    command: str
    out_dir: Path
    seed: int = 0  # tiny-base: weight initialisation seed
    vocab_size: int | None = None  # tiny-base: tokenizer size; None is DEFAULT_VOCAB_SIZE
    dtype: str = "float32"  # smollm2-base
    base: Path | None = None  # train: the base model folder
    train: TrainOptions = field(default_factory=TrainOptions)  # train
    threads: int | None = None  # train: torch CPU threads (None: torch's default)


def _check_paths(options: DemoOptions) -> None:
    """The output folder is replaced whole: it must hold no input and be new or a previous output."""
    if options.command not in OUTPUT_SHAPES:
        return  # build_demo refuses it
    label = "--out" if options.command == "train" else "OUT_DIR"
    inputs = [("--base", options.base), ("--data", options.train.dataset)] if options.command == "train" else []
    check_paths(inputs, [Output(label, options.out_dir, OUTPUT_SHAPES[options.command])])


def build_demo(options: DemoOptions) -> Path:
    """Build what ``options.command`` names into ``options.out_dir`` (replaced atomically); returns it."""
    _check_paths(options)
    command, out_dir = options.command, options.out_dir
    if command == "data":
        with atomic_dir(out_dir) as tmp:
            write_demo_data(tmp)
        logger.info("demo data written to %s", out_dir)
        return out_dir
    if command == "tiny-base":
        return build_tiny_qwen2(out_dir, seed=options.seed, vocab_size=options.vocab_size or DEFAULT_VOCAB_SIZE)
    if command == "smollm2-base":
        return extract_smollm2(out_dir, dtype=options.dtype)
    if command == "train":
        if options.base is None:
            raise AssertionError("demo train needs a base model folder")
        if options.threads:
            import torch

            torch.set_num_threads(options.threads)
        return train_lora(options.base, out_dir, options.train)
    raise AssertionError(f"unhandled demo command {command}")
