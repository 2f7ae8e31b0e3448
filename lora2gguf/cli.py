"""The ``lora2gguf`` command: one subcommand per workflow step, usable without Snakemake."""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

from lora2gguf import __version__
from lora2gguf.errors import Lora2ggufError

logger = logging.getLogger("lora2gguf")

# One module per subcommand, lora2gguf/commands/<name>.py (chat-parity: chat_parity.py), each exposing HELP, add_arguments(parser)
# and run(args). A command whose optional dependencies are missing is left out of the parser; the
# steps import torch, transformers and llama_cpp only where they run, so `--help` starts fast.
COMMANDS: tuple[str, ...] = (
    "rank",
    "merge",
    "convert",
    "adapter",
    "adapter-compare",
    "imatrix",
    "quantize",
    "test",
    "compare",
    "plot",
    "manifest",
    "verify",
    "serve",
    "deploy",
    "chat-parity",
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
        module = _load(f"lora2gguf.commands.{name.replace('-', '_')}")
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


# Failures of the input or the environment raised by libraries we call, matched by (module, class)
# and only when that module is already loaded: the CLI must not import them just to look.
_FOREIGN_ERRORS: tuple[tuple[str, str, str], ...] = (
    ("safetensors", "SafetensorError", "a safetensors file cannot be read"),
    ("jinja2", "TemplateError", "a chat template cannot be rendered"),
)

BUG_LINE = (
    "this is a bug in lora2gguf {version}, not a problem with your input: please report it to the "
    "lora2gguf maintainers with the traceback above and the command line (see docs/development.md)"
)


def _os_error_message(exc: OSError) -> str | None:
    """``<path>: <strerror>`` for an OSError that names a file, the bare strerror (a full disk, a
    closed pipe) when it names none; None when it carries no errno either (then it is ours)."""
    if exc.filename is None:
        return f"{exc.strerror} ({errno.errorcode.get(exc.errno, exc.errno)})" if exc.errno else None
    where = str(exc.filename) + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
    return f"{where}: {exc.strerror or exc}"


def expected_error(exc: BaseException) -> str | None:
    """The one-line message for a failure of the user's input or environment, None for a bug.

    Steps convert these where they happen (so that the message names the file); this is the net
    for the ones that slip through.
    """
    if isinstance(exc, Lora2ggufError):
        return str(exc)
    if isinstance(exc, OSError):
        return _os_error_message(exc)
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
    for module_name, class_name, what in _FOREIGN_ERRORS:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return f"{what}: {type(exc).__name__}: {exc}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. Exit status: 0 done, 1 a bug (traceback), 2 bad input or environment
    (one ``error:`` line), 130 interrupted; a subcommand may return 1 for a negative verdict."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _configure_logging(args.verbose, args.log_file)
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns exceptions into an exit status
        message = expected_error(exc)
        if message is not None:
            logger.debug("details", exc_info=True)
            logger.error("error: %s", message)
            return 2
        logger.critical("unexpected %s", type(exc).__name__, exc_info=True)
        logger.critical(BUG_LINE.format(version=__version__))
        return 1


if __name__ == "__main__":
    sys.exit(main())
