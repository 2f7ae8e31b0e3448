"""``lora2gguf serve FILE.gguf``: an OpenAI-compatible server on a GGUF with its own chat template.

llama.cpp's ``llama-server --jinja`` when it is built (``make llama-tools``, found through
$LORA2GGUF_LLAMA_BIN or PATH), else llama-cpp-python's server. Prints the URL and the equivalent plain
command, then becomes the server: Ctrl-C or SIGTERM stops it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lora2gguf.deploy.server import API_KEY_ENV, BACKENDS, DEFAULT_CTX, ServeOptions, serve

HELP = "serve a GGUF over an OpenAI-compatible API (llama-server --jinja, else llama-cpp-python's server)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="FILE.gguf", type=Path, help="the GGUF to serve")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)"
    )
    parser.add_argument("--port", type=int, default=8080, help="TCP port (default: 8080)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: the backend's)")
    parser.add_argument(
        "--ctx-size",
        type=int,
        default=None,
        metavar="N",
        help=f"context size in tokens (default: {DEFAULT_CTX}, or the model's training context if smaller)",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help=f"require this key (Authorization: Bearer KEY); default: ${API_KEY_ENV}, else no key. "
        f"Prefer ${API_KEY_ENV}: a command line is visible to every user of the machine",
    )
    parser.add_argument(
        "--lora",
        dest="loras",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="a LoRA adapter GGUF to apply at scale 1 (repeatable; llama-cpp-python's server takes one)",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="which server (default: auto)")
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="N",
        help="llama-server slots decoding at once (default: 1, so that every answer equals the one the "
        "request gets alone; with more, batched decoding can change a greedy answer at a close call)",
    )
    parser.add_argument(
        "--cache-prompt",
        action="store_true",
        help="let llama-server reuse the previous prompt's common prefix (faster multi-turn chats; an "
        "answer's logits then depend in their last bits on the request before it)",
    )


def run(args: argparse.Namespace) -> int:
    options = ServeOptions(
        model=args.model,
        host=args.host,
        port=args.port,
        threads=args.threads,
        ctx_size=args.ctx_size,
        api_key=args.api_key,
        loras=list(args.loras),
        backend=args.backend,
        parallel=args.parallel,
        cache_prompt=args.cache_prompt,
    )
    serve(options)
