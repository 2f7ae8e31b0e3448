"""``lora2gguf manifest``: one JSON file that says where every artifact of a model's build came from.

results/{model}/manifest.json lists every input (base and run files, evaluation text, the ranking)
and every output (merged folder, reports, GGUF files and sidecars, plots) with size and sha256, the
Snakemake rule that makes each output, the config values that shaped the build, package versions
and the llama.cpp version used for the checks. ``lora2gguf verify`` re-hashes against it.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora2gguf.artifacts import Output, check_paths, sha256_file, write_json
from lora2gguf.errors import Lora2ggufError
from lora2gguf.layout import COMPARISON_PLOTS, FOLDER_OUTPUTS, RULE_OUTPUTS
from lora2gguf.provenance import SCHEMA_VERSION, build_report

logger = logging.getLogger(__name__)

REPORT_KIND = "manifest"
SCHEMA = f"lora2gguf/{REPORT_KIND}/{SCHEMA_VERSION}"

# What each wildcard of a layout pattern may stand for in a path (any one path segment by default).
_WILDCARD_REGEX = {"kind": "(" + "|".join(re.escape(kind) for kind in COMPARISON_PLOTS) + ")"}


def _pattern_regex(pattern: str, folder: bool) -> str:
    """A regex that finds a layout pattern at the end of a path, absolute or relative; a folder
    output also matches every file below it."""
    parts = re.split(r"\{(\w+)\}", pattern)
    regex = "".join(
        re.escape(part) if i % 2 == 0 else _WILDCARD_REGEX.get(part, "[^/]+") for i, part in enumerate(parts)
    )
    return rf"(^|/){regex}(/.+)?$" if folder else rf"(^|/){regex}$"


# Which rule makes which artifact, from the layout the rules use. Static on purpose: the manifest
# must be readable without Snakemake, and rules/*.smk names are fixed by contract.
RULE_PATTERNS: tuple[tuple[str, str], ...] = tuple(
    (_pattern_regex(pattern, pattern in FOLDER_OUTPUTS), rule)
    for rule, patterns in RULE_OUTPUTS.items()
    for pattern in patterns
)


def rule_for(path: str) -> str | None:
    """The Snakemake rule that writes ``path`` (None for paths no rule makes, e.g. user inputs)."""
    posix = Path(path).as_posix()
    for pattern, rule in RULE_PATTERNS:
        if re.search(pattern, posix):
            return rule
    return None


# Snakemake's own marker inside directory() outputs: bookkeeping, not part of the artifact.
IGNORED_NAMES = frozenset({".snakemake_timestamp"})


def _files_of(path: Path) -> list[Path]:
    """A file, or every file of a folder (recursively, sorted). Hidden temp siblings are never inside."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.name not in IGNORED_NAMES)
    return [path]


def _entry(path: Path) -> dict[str, Any]:
    return {"path": path.as_posix(), "size": path.stat().st_size, "sha256": sha256_file(path)}


def describe(paths: list[tuple[str | None, Path]], what: str) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """Hash files and folders. Returns the flat entries and, per folder, the names it held (so that
    ``verify`` can also report files added to a folder later)."""
    entries: list[dict[str, Any]] = []
    folders: dict[str, list[str]] = {}
    seen: set[str] = set()
    for role, path in paths:
        if not path.exists():
            raise Lora2ggufError(f"{path}: {what} not found (manifest cannot hash it)")
        if path.is_dir():
            folders[path.as_posix()] = [p.relative_to(path).as_posix() for p in _files_of(path)]
        for file in _files_of(path):
            key = file.as_posix()
            if key in seen:
                continue
            seen.add(key)
            entry = _entry(file)
            if role is not None:
                entry["role"] = role
            entry["rule"] = rule_for(key)
            entries.append(entry)
    return entries, folders


def llama_cpp_version() -> dict[str, Any]:
    """Version of the llama.cpp bindings the inference test and comparison ran with (metadata only,
    so the native library is not loaded just to write a manifest)."""
    try:
        return {"package": "llama_cpp_python", "version": importlib.metadata.version("llama-cpp-python")}
    except importlib.metadata.PackageNotFoundError:
        return {"package": "llama_cpp_python", "version": None, "reason": "llama-cpp-python is not installed"}


def _reported_llama_cpp(outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """The llama.cpp versions the evaluation reports themselves recorded, when they say so."""
    found: dict[str, Any] = {}
    for entry in outputs:
        if entry["rule"] not in ("compare_models", "test_merged_model") or not entry["path"].endswith(".json"):
            continue
        try:
            report = json.loads(Path(entry["path"]).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        versions = report.get("versions") if isinstance(report, dict) else None
        if isinstance(versions, dict) and "llama_cpp_python" in versions:
            found[entry["path"]] = versions["llama_cpp_python"]
    return found


@dataclass
class ManifestOptions:
    """What ``lora2gguf manifest`` was asked: the model, its inputs by role, its outputs, the config."""

    model: str
    inputs: list[tuple[str, Path]]
    outputs: list[Path]
    config: dict[str, Any]
    out: Path


def build_manifest(
    model: str,
    inputs: list[tuple[str, Path]],
    outputs: list[Path],
    config: dict[str, Any],
) -> dict[str, Any]:
    input_entries, input_folders = describe(list(inputs), "input")
    output_entries, output_folders = describe([(None, path) for path in outputs], "output")
    for entry in output_entries:
        if entry["rule"] is None:
            logger.warning("%s: no rule of the workflow is known to write this output", entry["path"])
    llama = llama_cpp_version()
    reported = _reported_llama_cpp(output_entries)
    if reported:
        llama["recorded_by_reports"] = reported
    body = {
        "model": model,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        # Paths are stored as the workflow wrote them (relative to its working directory); verify
        # resolves them against this folder unless told otherwise.
        "root": os.getcwd(),
        "config": config,
        "llama_cpp": llama,
        "inputs": input_entries,
        "outputs": output_entries,
        "folders": {"inputs": input_folders, "outputs": output_folders},
        "totals": {
            "inputs": len(input_entries),
            "outputs": len(output_entries),
            "output_bytes": sum(e["size"] for e in output_entries),
        },
    }
    return build_report(REPORT_KIND, body)


def _check_paths(options: ManifestOptions) -> None:
    """The manifest must not overwrite, or land inside, a file or folder it hashes, nor be a folder."""
    hashed = [(f"--input {role}", path) for role, path in options.inputs]
    hashed += [("--output", path) for path in options.outputs]
    check_paths(hashed, [Output("--out", options.out)])


def write_manifest(options: ManifestOptions) -> dict[str, Any]:
    """Hash the build, write the manifest atomically and log its totals."""
    _check_paths(options)
    manifest = build_manifest(options.model, options.inputs, options.outputs, options.config)
    write_json(options.out, manifest)
    totals = manifest["totals"]
    logger.info(
        "%s: %d inputs, %d outputs (%.1f MB) hashed",
        options.out,
        totals["inputs"],
        totals["outputs"],
        totals["output_bytes"] / 1e6,
    )
    return manifest
