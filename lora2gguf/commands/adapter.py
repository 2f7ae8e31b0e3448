"""``lora2gguf adapter``: a run's LoRA adapter -> llama.cpp LoRA GGUF (for the base's GGUF)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lora2gguf.adapter.export import OUTTYPES, AdapterOptions, export_adapter
from lora2gguf.archs import ARCHS

# The base architectures an adapter can be written for: those with a native conversion table.
_NATIVE = ", ".join(hf for spec in ARCHS.values() for hf in spec.hf_architectures)

HELP = "write a run's LoRA adapter as a llama.cpp LoRA GGUF (served on the base GGUF with --lora)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write a run's peft LoRA adapter (adapter_config.json, adapter_model.safetensors) as a llama.cpp LoRA "
        "GGUF, to load on the base model's GGUF (llama-cli/llama-server --lora, llama-cpp-python lora_path). "
        f"Tensor names and layout are the base architecture's (one lora2gguf converts natively: {_NATIVE}); a plain "
        "LoRA gives the same file "
        "as llama.cpp's convert_lora_to_gguf.py. rsLoRA and per-module ranks/alphas (rank_pattern, alpha_pattern) "
        "are folded into the written scale so llama.cpp computes what peft does. DoRA, modules_to_save, trained "
        "biases and LoRA on a tied embedding/head are refused (merge instead)."
    )
    parser.add_argument("run", metavar="RUN", type=Path, help="run folder with adapter_config.json")
    parser.add_argument("out", metavar="OUT.gguf", type=Path, help="adapter GGUF to write")
    parser.add_argument("--base", required=True, type=Path, help="the base model folder the run was trained on")
    parser.add_argument("--outtype", choices=tuple(OUTTYPES), default="f16",
                        help="type of lora_a / lora_b (default: f16; q8_0 keeps rank-wide lora_b rows in f16)")
    parser.add_argument("--report", metavar="JSON", type=Path,
                        help="also write a JSON report (pairs, ranks, alpha written, per-module scale "
                        "corrections, sha256)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept adapter_model.bin (pickle files can run code when loaded)")


def run(args: argparse.Namespace) -> int:
    options = AdapterOptions(
        run=args.run,
        base=args.base,
        out=args.out,
        outtype=args.outtype,
        report=args.report,
        allow_pickle=args.allow_pickle,
    )
    export_adapter(options)
    return 0
