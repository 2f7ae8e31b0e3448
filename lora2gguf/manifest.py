"""``lora2gguf manifest``: one JSON file that says where every artifact of a model's build came from.

results/{model}/manifest.json lists every input (base and run files, evaluation text, the ranking)
and every output (merged folder, reports, GGUF files and sidecars, plots) with size and sha256, the
Snakemake rule that makes each output, the config values that shaped the build, package versions
and the llama.cpp version used for the checks. ``lora2gguf verify`` re-hashes against it.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any

HELP = "write results/{model}/manifest.json: sha256 of every input and output, config, versions"

logger = logging.getLogger(__name__)

SCHEMA = "lora2gguf.manifest/1"

# Which rule makes which artifact (paths relative to the workflow's working directory). Static on
# purpose: the manifest must be readable without Snakemake, and rules/*.smk names are fixed by contract.
RULE_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"(^|/)results/model_analysis\.json$", "rank_candidates"),
    (r"(^|/)results/plots/candidates\.png$", "plot_candidates"),
    (r"(^|/)models/[^/]+-merged/.+$", "merge_adapter"),
    (r"(^|/)models/[^/]+-merged$", "merge_adapter"),
    (r"(^|/)results/[^/]+/merge_report\.json$", "merge_adapter"),
    (r"(^|/)models/[^/]+-merged-gguf/model\.gguf$", "convert_gguf"),
    (r"(^|/)models/[^/]+-merged-gguf/model-[^/]+\.(gguf|json)$", "quantize_gguf"),
    (r"(^|/)models/[^/]+-merged-gguf/imatrix\.gguf$", "compute_imatrix"),
    (r"(^|/)results/[^/]+/imatrix\.json$", "compute_imatrix"),
    (r"(^|/)results/[^/]+/merged_model_test\.json$", "test_merged_model"),
    (r"(^|/)results/[^/]+/compare_models\.json$", "compare_models"),
    (r"(^|/)results/plots/[^/]+-(size-vs-kl|size-vs-perplexity|speed)\.png$", "plot_comparison"),
    (r"(^|/)results/[^/]+/manifest\.json$", "write_manifest"),
)


def rule_for(path: str) -> str | None:
    """The Snakemake rule that writes ``path`` (None for paths no rule makes, e.g. user inputs)."""
    posix = Path(path).as_posix()
    for pattern, rule in RULE_PATTERNS:
        if re.search(pattern, posix):
            return rule
    return None


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


# Snakemake's own marker inside directory() outputs: bookkeeping, not part of the artifact.
IGNORED_NAMES = frozenset({".snakemake_timestamp"})


def _files_of(path: Path) -> list[Path]:
    """A file, or every file of a folder (recursively, sorted). Hidden temp siblings are never inside."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.name not in IGNORED_NAMES)
    return [path]


def _entry(path: Path) -> dict[str, Any]:
    from lora2gguf.artifacts import sha256_file

    return {"path": path.as_posix(), "size": path.stat().st_size, "sha256": sha256_file(path)}


def describe(paths: list[tuple[str | None, Path]], what: str) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """Hash files and folders. Returns the flat entries and, per folder, the names it held (so that
    ``verify`` can also report files added to a folder later)."""
    from lora2gguf.errors import Lora2ggufError

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
    import importlib.metadata

    try:
        return {"package": "llama_cpp_python", "version": importlib.metadata.version("llama-cpp-python")}
    except importlib.metadata.PackageNotFoundError:
        return {"package": "llama_cpp_python", "version": None, "reason": "llama-cpp-python is not installed"}


def _reported_llama_cpp(outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """The llama.cpp versions the evaluation reports themselves recorded, when they say so."""
    import json

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


def build_manifest(
    model: str,
    inputs: list[tuple[str, Path]],
    outputs: list[Path],
    config: dict[str, Any],
) -> dict[str, Any]:
    import datetime
    import os

    from lora2gguf.provenance import package_versions

    input_entries, input_folders = describe([(role, path) for role, path in inputs], "input")
    output_entries, output_folders = describe([(None, path) for path in outputs], "output")
    for entry in output_entries:
        if entry["rule"] is None:
            logger.warning("%s: no rule of the workflow is known to write this output", entry["path"])
    llama = llama_cpp_version()
    reported = _reported_llama_cpp(output_entries)
    if reported:
        llama["recorded_by_reports"] = reported
    return {
        "schema": SCHEMA,
        "model": model,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        # Paths are stored as the workflow wrote them (relative to its working directory); verify
        # resolves them against this folder unless told otherwise.
        "root": os.getcwd(),
        "config": config,
        "versions": package_versions(),
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


def _parse_inputs(values: list[str]) -> list[tuple[str, Path]]:
    from lora2gguf.errors import Lora2ggufError

    parsed = []
    for value in values:
        role, sep, path = value.partition("=")
        if not sep or not role or not path:
            raise Lora2ggufError(f"--input {value!r}: expected ROLE=PATH")
        parsed.append((role, Path(path)))
    return parsed


def run(args: argparse.Namespace) -> int:
    import json

    from lora2gguf.artifacts import write_json
    from lora2gguf.errors import Lora2ggufError

    try:
        config = json.loads(args.config_json)
    except json.JSONDecodeError as exc:
        raise Lora2ggufError(f"--config-json: not valid JSON ({exc.msg})") from None
    if not isinstance(config, dict):
        raise Lora2ggufError("--config-json: expected a JSON object")
    manifest = build_manifest(args.model, _parse_inputs(args.input), [Path(p) for p in args.output], config)
    write_json(args.out, manifest)
    totals = manifest["totals"]
    logger.info(
        "%s: %d inputs, %d outputs (%.1f MB) hashed",
        args.out,
        totals["inputs"],
        totals["outputs"],
        totals["output_bytes"] / 1e6,
    )
    return 0
