"""``lora2gguf convert``: merged HF model folder -> GGUF (F16 by default)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lora2gguf.archs import ARCHS
from lora2gguf.convert.convert import ConvertOptions, run_convert
from lora2gguf.convert.external import BACKENDS, ENV_LLAMA_CPP

HELP = "convert a merged Hugging Face model folder to a GGUF file (natively, or with llama.cpp's converter)"

# In the order --help lists them; the step checks the value against its OUTTYPES table.
_OUTTYPES = ("f16", "bf16", "f32", "q8_0")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    native = ", ".join(f"{hf} ({spec.name})" for spec in ARCHS.values() for hf in spec.hf_architectures)
    parser.description = (
        "Convert a merged Hugging Face model folder (config.json, tokenizer files, *.safetensors) to one GGUF "
        f"file that llama.cpp loads. Converted natively: {native}; tensors are streamed one at a time from "
        "memory-mapped safetensors, without torch. Other architectures go through llama.cpp's own "
        "convert_hf_to_gguf.py, from the sources of the installed llama-cpp-python (`make llama-tools` downloads "
        "them; nothing is downloaded at run time), in a process that never runs code shipped with the model. "
        "Either way the output is written to a temporary file and renamed when complete."
    )
    parser.add_argument("in_dir", metavar="IN_DIR", type=Path, help="merged model folder (Hugging Face layout)")
    parser.add_argument("out", metavar="OUT.gguf", type=Path, help="GGUF file to write")
    parser.add_argument(
        "--outtype",
        choices=_OUTTYPES,
        default="f16",
        help="type of the weight matrices (default: f16; norms and biases stay f32). f16 fails with a "
        "message if a tensor exceeds the float16 range: use bf16 then. q8_0 is llama.cpp's 8-bit type.",
    )
    parser.add_argument("--base-model", metavar="NAME", help="base model name, recorded as general.basename and general.base_model.0.name")
    parser.add_argument("--adapter", metavar="NAME", help="LoRA adapter / run name, recorded as general.finetune")
    parser.add_argument("--name", metavar="NAME", help="model name for general.name (default: from the folder)")
    parser.add_argument("--chat-template", metavar="JINJA", type=Path,
                        help="carry this chat template (e.g. the one the run was trained with) instead of the folder's")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="auto (default): lora2gguf's converter where it knows the architecture, llama.cpp's "
        "convert_hf_to_gguf.py otherwise; native: lora2gguf's only (fails on other architectures); llama.cpp: "
        "llama.cpp's converter always (also a cross-check of the native one)",
    )
    parser.add_argument(
        "--llama-cpp",
        metavar="DIR",
        type=Path,
        help=f"a llama.cpp source folder whose convert_hf_to_gguf.py runs instead of the pinned one "
        f"(default: ${ENV_LLAMA_CPP}, else the installed llama-cpp-python's sources)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no per-tensor progress bar")
    parser.add_argument(
        "--report",
        metavar="JSON",
        type=Path,
        help="also write a JSON report (tensor types, sizes, time, peak memory, versions, input/output sha256)",
    )


def run(args: argparse.Namespace) -> int:
    options = ConvertOptions(
        in_dir=args.in_dir,
        out=args.out,
        outtype=args.outtype,
        base_model=args.base_model,
        adapter=args.adapter,
        name=args.name,
        progress=not args.no_progress,
        report=args.report,
        chat_template=args.chat_template,
        backend=args.backend,
        llama_cpp=args.llama_cpp,
    )
    run_convert(options)
    return 0
