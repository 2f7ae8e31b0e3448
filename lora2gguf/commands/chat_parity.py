"""``lora2gguf chat-parity``: the served prompt token ids against training's, per renderer."""

from __future__ import annotations

import argparse
from pathlib import Path

from lora2gguf.deploy.parity import ParityOptions, chat_parity
from lora2gguf.settings import resolve_prompts

HELP = ("compare the chat prompt ids of Hugging Face, llama-cpp-python, llama-server and the Modelfile's "
        "Ollama template, then serve the file and check its greedy answers (chat_parity.json)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--merged", required=True, type=Path, help="the merged Hugging Face folder (the reference)")
    parser.add_argument("--gguf", required=True, type=Path, help="the deployed GGUF")
    parser.add_argument("--modelfile", required=True, type=Path, help="the Modelfile written by lora2gguf deploy")
    parser.add_argument("--out", required=True, type=Path, help="report path (chat_parity.json)")
    parser.add_argument("--config", help="config.yaml to read test_prompts from")
    parser.add_argument("--prompts", help="test prompts: JSON/YAML file or inline JSON list of {id, text}")
    parser.add_argument("--training-template", type=Path,
                        help="the Jinja chat template the run was trained with: the reference when given")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per served answer")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for llama.cpp and the server")
    parser.add_argument("--no-serve", action="store_true", help="compare renderings only; start no server")


def run(args: argparse.Namespace) -> int:
    options = ParityOptions(
        merged=args.merged,
        gguf=args.gguf,
        modelfile=args.modelfile,
        out=args.out,
        prompts=resolve_prompts(args.config, args.prompts),
        training_template=args.training_template,
        max_new_tokens=args.max_new_tokens,
        threads=args.threads,
        serve=not args.no_serve,
    )
    chat_parity(options)
    return 0
