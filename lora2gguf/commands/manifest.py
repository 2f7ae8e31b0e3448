"""``lora2gguf manifest``: write results/{model}/manifest.json for one model's build."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lora2gguf.errors import Lora2ggufError
from lora2gguf.manifest.build import ManifestOptions, write_manifest

HELP = "write results/{model}/manifest.json: sha256 of every input and output, config, versions"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="candidate name ({model} of the artifact paths)")
    parser.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="ROLE=PATH",
        help="an input file or folder and its role (base, run, eval_text, ranking); repeatable",
    )
    parser.add_argument(
        "--output",
        action="append",
        default=[],
        metavar="PATH",
        help="an output file or folder of the build; repeatable (folders are listed file by file)",
    )
    parser.add_argument(
        "--config-json",
        default="{}",
        metavar="JSON",
        help="the config values that shaped this model's build, as a JSON object",
    )
    parser.add_argument("--out", required=True, type=Path, help="manifest JSON to write (atomically)")


def _parse_inputs(values: list[str]) -> list[tuple[str, Path]]:
    parsed = []
    for value in values:
        role, sep, path = value.partition("=")
        if not sep or not role or not path:
            raise Lora2ggufError(f"--input {value!r}: expected ROLE=PATH")
        parsed.append((role, Path(path)))
    return parsed


def _parse_config(text: str) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise Lora2ggufError(f"--config-json: not valid JSON ({exc.msg})") from None
    if not isinstance(config, dict):
        raise Lora2ggufError("--config-json: expected a JSON object")
    return config


def run(args: argparse.Namespace) -> int:
    # ROLE=PATH pairs and the JSON object are checked here: argparse cannot express either.
    config = _parse_config(args.config_json)
    options = ManifestOptions(
        model=args.model,
        inputs=_parse_inputs(args.input),
        outputs=[Path(p) for p in args.output],
        config=config,
        out=args.out,
    )
    write_manifest(options)
    return 0
