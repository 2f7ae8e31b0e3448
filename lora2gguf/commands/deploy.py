"""``lora2gguf deploy``: the Ollama Modelfile, deploy notes and report of a GGUF."""

from __future__ import annotations

import argparse
from pathlib import Path

from lora2gguf.deploy.modelfile import DeployOptions, deploy

HELP = "write an Ollama Modelfile (chat template as a Go template, stop tokens, context) and deploy.md for a GGUF"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("gguf", type=Path, help="the GGUF to deploy (e.g. model-q4_km.gguf)")
    parser.add_argument("--modelfile", type=Path, help="Modelfile to write (default: Modelfile next to the GGUF)")
    parser.add_argument("--notes", type=Path, help="deploy.md to write: the commands for each runtime")
    parser.add_argument("--report", type=Path, help="deploy.json to write: the template translation and stop tokens")
    parser.add_argument("--merged", type=Path, help="the merged Hugging Face folder (generation_config.json's "
                        "end-of-turn ids; the vLLM command)")
    parser.add_argument("--chat-template", type=Path, help="a Jinja chat template to carry instead of the GGUF's")
    parser.add_argument("--name", default="model", help="the model's name in the commands (ollama create NAME)")


def run(args: argparse.Namespace) -> int:
    options = DeployOptions(
        gguf=args.gguf,
        modelfile=args.modelfile or args.gguf.parent / "Modelfile",
        notes=args.notes,
        report=args.report,
        merged=args.merged,
        chat_template=args.chat_template,
        name=args.name,
    )
    deploy(options)
    return 0
