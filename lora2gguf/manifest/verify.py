"""``lora2gguf verify MANIFEST``: re-hash a build's artifacts and report what changed since.

Exit 0 when every listed input and output still has its recorded size and sha256 and no file was
added to a recorded folder; exit 1 (and one log line per problem) otherwise; exit 2 when the
manifest itself cannot be read.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora2gguf.artifacts import Output, check_paths, read_json, sha256_file, write_json
from lora2gguf.errors import Lora2ggufError
from lora2gguf.manifest.build import IGNORED_NAMES, SCHEMA
from lora2gguf.provenance import build_report

logger = logging.getLogger(__name__)

REPORT_KIND = "verify"


@dataclass
class VerifyOptions:
    """What ``lora2gguf verify`` was asked."""

    manifest: Path
    root: Path | None = None
    outputs_only: bool = False
    json_out: Path | None = None


def _root(manifest: dict[str, Any], override: Path | None) -> Path:
    if override is not None:
        return override
    recorded = manifest.get("root")
    if isinstance(recorded, str) and Path(recorded).is_dir():
        return Path(recorded)
    return Path.cwd()


def _check_manifest_shape(path: Path, manifest: Any) -> None:
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise Lora2ggufError(f"{path}: not a lora2gguf manifest (schema must be {SCHEMA!r})")
    for key in ("inputs", "outputs"):
        entries = manifest.get(key)
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and {"path", "size", "sha256"} <= e.keys() for e in entries
        ):
            raise Lora2ggufError(f"{path}: key '{key}' must be a list of {{path, size, sha256}} entries")
        for index, entry in enumerate(entries):
            _check_entry(path, f"{key}[{index}]", entry)


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_entry(path: Path, where: str, entry: dict[str, Any]) -> None:
    """One listed file: a relative path, a byte count and a sha256 that can be compared (a null or
    a truncated checksum would otherwise crash the comparison or match nothing)."""
    name = entry["path"]
    if not isinstance(name, str) or not name:
        raise Lora2ggufError(f"{path}: {where}.path must be a non-empty string, got {name!r}")
    size = entry["size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise Lora2ggufError(f"{path}: {where}.size ({name}) must be a byte count, got {size!r}")
    digest = entry["sha256"]
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise Lora2ggufError(f"{path}: {where}.sha256 ({name}) must be 64 lowercase hex digits, got {digest!r}")


def _compare_files(
    manifest: dict[str, Any], base: Path, sections: tuple[str, ...]
) -> tuple[int, list[dict[str, Any]], list[dict[str, Any]]]:
    """Re-hash every listed file: (how many were checked, the changed ones, the missing ones)."""
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
    return checked, changed, missing


def _added_files(manifest: dict[str, Any], base: Path, sections: tuple[str, ...]) -> list[str]:
    """Files that appeared in a recorded folder since (a stray shard, an edited tokenizer added)."""
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
    return added


def verify_manifest(path: Path, root: Path | None = None, outputs_only: bool = False) -> dict[str, Any]:
    """Compare the files on disk with the manifest. Returns {ok, checked, changed, missing, added}."""
    manifest = read_json(path)
    _check_manifest_shape(path, manifest)
    base = _root(manifest, root)
    sections = ("outputs",) if outputs_only else ("inputs", "outputs")
    checked, changed, missing = _compare_files(manifest, base, sections)
    added = _added_files(manifest, base, sections)
    return {
        "manifest": str(path),
        "root": str(base),
        "ok": not (changed or missing or added),
        "checked": checked,
        "changed": changed,
        "missing": missing,
        "added": added,
    }


def _log_problems(verdict: dict[str, Any]) -> None:
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


def _check_json_out(options: VerifyOptions) -> None:
    """--json must not overwrite the manifest or a file it lists, nor land in a listed folder."""
    if options.json_out is None:
        return
    check_paths([("MANIFEST", options.manifest)], [Output("--json", options.json_out)])
    manifest = read_json(options.manifest)
    _check_manifest_shape(options.manifest, manifest)
    base = _root(manifest, options.root)
    listed = [(f"listed in the manifest's {section}", base / e["path"]) for section in ("inputs", "outputs")
              for e in manifest[section]]  # fmt: skip
    folders = manifest.get("folders")
    for section, by_folder in folders.items() if isinstance(folders, dict) else ():
        if isinstance(by_folder, dict):
            listed += [(f"a folder of the manifest's {section}", base / folder) for folder in by_folder]
    check_paths([("MANIFEST", options.manifest), *listed], [Output("--json", options.json_out)])


def verify(options: VerifyOptions) -> int:
    """Check a build against its manifest, log every problem, write the verdict report when asked.
    Returns the exit status: 0 when everything matches, 1 otherwise."""
    _check_json_out(options)
    verdict = verify_manifest(options.manifest, options.root, options.outputs_only)
    _log_problems(verdict)
    if options.json_out:
        write_json(options.json_out, build_report(REPORT_KIND, verdict))
    if verdict["ok"]:
        logger.info("%s: all %d files match (root %s)", options.manifest, verdict["checked"], verdict["root"])
        return 0
    logger.error(
        "%s: %d changed, %d missing, %d added of %d checked",
        options.manifest,
        len(verdict["changed"]),
        len(verdict["missing"]),
        len(verdict["added"]),
        verdict["checked"],
    )
    return 1
