"""``lora2gguf verify MANIFEST``: re-hash a build's artifacts and report what changed since.

Exit 0 when every listed input and output still has its recorded size and sha256 and no file was
added to a recorded folder; exit 1 (and one log line per problem) otherwise; exit 2 when the
manifest itself cannot be read.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

HELP = "re-hash the artifacts listed in a manifest.json and report any that changed or are missing"

logger = logging.getLogger(__name__)


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


def _root(manifest: dict[str, Any], override: Path | None) -> Path:
    if override is not None:
        return override
    recorded = manifest.get("root")
    if isinstance(recorded, str) and Path(recorded).is_dir():
        return Path(recorded)
    return Path.cwd()


def _check_manifest_shape(path: Path, manifest: Any) -> None:
    from lora2gguf.errors import Lora2ggufError
    from lora2gguf.manifest import SCHEMA

    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise Lora2ggufError(f"{path}: not a lora2gguf manifest (schema must be {SCHEMA!r})")
    for key in ("inputs", "outputs"):
        entries = manifest.get(key)
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and {"path", "size", "sha256"} <= e.keys() for e in entries
        ):
            raise Lora2ggufError(f"{path}: key '{key}' must be a list of {{path, size, sha256}} entries")


def verify_manifest(path: Path, root: Path | None = None, outputs_only: bool = False) -> dict[str, Any]:
    """Compare the files on disk with the manifest. Returns {ok, checked, changed, missing, added}."""
    from lora2gguf.artifacts import read_json, sha256_file
    from lora2gguf.manifest import IGNORED_NAMES

    manifest = read_json(path)
    _check_manifest_shape(path, manifest)
    base = _root(manifest, root)
    sections = ("outputs",) if outputs_only else ("inputs", "outputs")
    changed: list[dict[str, Any]] = []
    missing: list[dict[str, Any]] = []
    checked = 0
    for section in sections:
        for entry in manifest[section]:
            file = base / entry["path"]
            checked += 1
            if not file.is_file():
                missing.append({"section": section, "path": entry["path"], "rule": entry.get("rule")})
                continue
            size = file.stat().st_size
            digest = sha256_file(file) if size == entry["size"] else None
            if size != entry["size"] or digest != entry["sha256"]:
                changed.append(
                    {
                        "section": section,
                        "path": entry["path"],
                        "rule": entry.get("rule"),
                        "recorded": {"size": entry["size"], "sha256": entry["sha256"]},
                        "found": {"size": size, "sha256": digest or sha256_file(file)},
                    }
                )
    # Files that appeared in a recorded folder since (a stray shard, an edited tokenizer added).
    listed = {e["path"] for section in sections for e in manifest[section]}
    added: list[str] = []
    folders = manifest.get("folders", {})
    for section in sections:
        for folder in folders.get(section, {}) if isinstance(folders, dict) else {}:
            on_disk = base / folder
            if not on_disk.is_dir():
                continue
            for file in sorted(on_disk.rglob("*")):
                rel = (Path(folder) / file.relative_to(on_disk)).as_posix()
                if file.is_file() and file.name not in IGNORED_NAMES and rel not in listed:
                    added.append(rel)
    return {
        "manifest": str(path),
        "root": str(base),
        "ok": not (changed or missing or added),
        "checked": checked,
        "changed": changed,
        "missing": missing,
        "added": added,
    }


def run(args: argparse.Namespace) -> int:
    from lora2gguf.artifacts import write_json

    verdict = verify_manifest(args.manifest, args.root, args.outputs_only)
    for item in verdict["changed"]:
        logger.error(
            "changed: %s (%s, made by %s): size %d -> %d, sha256 %s -> %s",
            item["path"],
            item["section"][:-1],
            item["rule"] or "user input",
            item["recorded"]["size"],
            item["found"]["size"],
            item["recorded"]["sha256"][:12],
            item["found"]["sha256"][:12],
        )
    for item in verdict["missing"]:
        logger.error("missing: %s (%s, made by %s)", item["path"], item["section"][:-1], item["rule"] or "user input")
    for rel in verdict["added"]:
        logger.error("added: %s (not in the manifest)", rel)
    if args.json:
        write_json(args.json, verdict)
    if verdict["ok"]:
        logger.info("%s: all %d files match (root %s)", args.manifest, verdict["checked"], verdict["root"])
        return 0
    logger.error(
        "%s: %d changed, %d missing, %d added of %d checked",
        args.manifest,
        len(verdict["changed"]),
        len(verdict["missing"]),
        len(verdict["added"]),
        verdict["checked"],
    )
    return 1
