"""``lora2gguf verify MANIFEST``: re-hash a build's artifacts against its manifest.

Exit 0 when everything matches, 1 (one log line per problem) otherwise, 2 when the manifest itself
cannot be read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lora2gguf.manifest.verify import VerifyOptions, verify

HELP = "re-hash the artifacts listed in a manifest.json and report any that changed or are missing"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", metavar="MANIFEST", type=Path, help="results/{model}/manifest.json")
    parser.add_argument(
        "--root",
        type=Path,
        help="folder the manifest's relative paths are resolved against "
        "(default: the folder it was written in, if it still exists, else the current folder)",
    )
    parser.add_argument("--outputs-only", action="store_true", help="check only the outputs, not the inputs")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the verdict as JSON here")


def run(args: argparse.Namespace) -> int:
    options = VerifyOptions(
        manifest=args.manifest, root=args.root, outputs_only=args.outputs_only, json_out=args.json
    )
    return verify(options)
