"""The ``lora2gguf`` command: one subcommand per workflow step, usable without Snakemake."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

from lora2gguf import __version__
from lora2gguf.errors import Lora2ggufError

logger = logging.getLogger("lora2gguf")

# One module per subcommand, lora2gguf/commands/<name>.py, each exposing HELP, add_arguments(parser)
# and run(args). A command whose optional dependencies are missing is left out of the parser; the
# steps import torch, transformers and llama_cpp only where they run, so `--help` starts fast.
COMMANDS: tuple[str, ...] = (
    "rank",
    "merge",
    "convert",
    "imatrix",
    "quantize",
    "test",
    "compare",
    "plot",
    "manifest",
    "verify",
    "demo",
)


def _load(module_name: str) -> ModuleType | None:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora2gguf",
        description="Rank LoRA runs, merge, convert to GGUF, quantize and verify in llama.cpp.",
    )
    parser.add_argument("--version", action="version", version=f"lora2gguf {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--log-file", help="also append the log to this file")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = _load(f"lora2gguf.commands.{name}")
        if module is None:
            continue
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def _configure_logging(verbose: bool, log_file: str | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.log_file)
    try:
        return int(args._run(args) or 0)
    except Lora2ggufError as exc:
        logger.error("error: %s", exc)
        return 2
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
