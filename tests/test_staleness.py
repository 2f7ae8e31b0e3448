"""Staleness: after one complete run on the tiny config, each change schedules exactly what it should.

One workflow run builds a module-wide working directory (own copies of the base and runs, since
some tests edit them); every test after that is a dry run whose job-stats table is compared with the
expected rule set. The manifest the run wrote is verified against the files too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import BIN, ROOT, tiny_config, write_config
from test_workflow import planned_jobs

from lora2gguf.manifest.verify import verify_manifest

pytestmark = pytest.mark.slow

# What always follows a model's artifacts: the manifest hashes all of them, and "all" is the target.
FOLLOWERS = {"write_manifest", "all"}


class Workflow:
    def __init__(self, workdir: Path, snakefile: Path, config: dict[str, Any]) -> None:
        self.workdir, self.snakefile, self.config = workdir, snakefile, config
        self.best = ""

    def targets(self) -> list[str]:
        return ["all"]  # rule all asks for results/{best}/manifest.json too

    def run(self, *args: str, timeout: int = 1800) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        cmd = [str(BIN / "snakemake"), "-s", str(self.snakefile), "-d", str(self.workdir), *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)

    def plan(self, *targets: str, config: dict[str, Any] | None = None) -> dict[str, int]:
        """Jobs a dry run schedules, with ``config`` written for it (the built config is put back after)."""
        if config is not None:
            write_config(self.workdir, config)
        try:
            result = self.run("-n", *(targets or self.targets()), timeout=600)
        finally:
            write_config(self.workdir, self.config)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        self.last_output = result.stdout + result.stderr
        return planned_jobs(self.last_output)


@pytest.fixture(scope="module")
def workflow(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, tiny_runs: dict[str, Path]) -> Workflow:
    root = tmp_path_factory.mktemp("staleness")
    base = shutil.copytree(tiny_base, root / "bases" / tiny_base.name)
    runs = {name: shutil.copytree(run, root / "runs" / name) for name, run in tiny_runs.items()}
    workdir = root / "work"
    workdir.mkdir()
    config = tiny_config(base, runs, workdir)
    config["evaluation"].setdefault("device", "cpu")
    config["evaluation"].setdefault("threads", 2)
    config["quantize"]["types"] = ["Q8_0"]
    write_config(workdir, config)
    flow = Workflow(workdir, ROOT / "Snakefile", config)
    result = flow.run("--cores", "2", "all")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    flow.best = json.loads((workdir / "results/model_analysis.json").read_text())["best"]
    assert (workdir / f"results/{flow.best}/manifest.json").is_file()
    return flow


def changed(config: dict[str, Any], section: str, key: str, value: Any) -> dict[str, Any]:
    new = json.loads(json.dumps(config))
    new[section][key] = value
    return new


def test_complete_run_has_nothing_to_do(workflow: Workflow) -> None:
    assert workflow.plan() == {}, workflow.last_output[-3000:]


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        # A new quant type: its quantization, then what reads every quant file.
        ("quantize", "types", ["Q8_0", "Q4_0"], {"quantize_gguf", "compare_models", "plot_comparison",
                                                 "quantize_base_gguf"}),
        # Sampling settings are read only by the inference test.
        ("generation", "temperature", 0.5, {"test_merged_model"}),
        # The number of generated tokens is also used by the greedy comparison.
        ("generation", "max_new_tokens", 9, {"test_merged_model", "compare_models", "plot_comparison"}),
        # How much text the comparison scores.
        ("evaluation", "max_tokens", 48, {"compare_models", "plot_comparison", "compare_adapter"}),
        # The F16 file's type: conversion and everything made from it.
        ("convert", "outtype", "bf16", {"convert_gguf", "quantize_gguf", "compare_models", "plot_comparison",
                                        "deploy_model", "check_chat_parity", "convert_base_gguf",
                                        "quantize_base_gguf", "compare_adapter"}),
        # The merge's dtype: the whole chain of that model.
        ("merge", "dtype", "float32", {"merge_adapter", "convert_gguf", "quantize_gguf", "test_merged_model",
                                       "compare_models", "plot_comparison", "deploy_model", "check_chat_parity",
                                       "compare_adapter"}),
        # The deployed answers' length: only the served round trip.
        ("deploy", "max_new_tokens", 5, {"check_chat_parity"}),
        # Worker threads change speed, not results: nothing reruns.
        ("quantize", "threads", 1, set()),
        # An imatrix quantization: the importance matrix, that one file, then what reads every quant file.
        ("quantize", "types", ["Q8_0", {"type": "Q4_K_M", "imatrix": True}],
         {"compute_imatrix", "quantize_gguf", "compare_models", "plot_comparison"}),
        # Calibration settings matter only to imatrix quantizations; this build has none.
        ("calibration", "max_tokens", 128, set()),
    ],
    ids=["add-quant-type", "generation-temperature", "generation-max-new-tokens", "evaluation-max-tokens",
         "convert-outtype", "merge-dtype", "deploy-max-new-tokens", "quantize-threads", "add-imatrix-type",
         "calibration-unused"],
)  # fmt: skip
def test_config_change_reruns_only_dependents(
    workflow: Workflow, section: str, key: str, value: Any, expected: set[str]
) -> None:
    jobs = workflow.plan(config=changed(workflow.config, section, key, value))
    if not expected:
        assert jobs == {}, workflow.last_output[-4000:]
    scheduled = set(jobs) - FOLLOWERS
    assert scheduled == expected, workflow.last_output[-4000:]
    assert all(count == 1 for count in jobs.values()), jobs
    if expected:
        assert "write_manifest" in jobs, jobs  # the manifest records every artifact and config value


@pytest.fixture
def edited_adapter(workflow: Workflow) -> Iterator[Any]:
    """Rewrite a run's adapter weights (one value changed); put the original bytes and times back after."""
    saved: list[tuple[Path, bytes, os.stat_result]] = []

    def edit(model: str) -> Path:
        from safetensors.numpy import load_file, save_file

        path = Path(workflow.config["candidates"][model]["run"]) / "adapter_model.safetensors"
        saved.append((path, path.read_bytes(), path.stat()))
        tensors = load_file(path)
        name = sorted(tensors)[0]
        tensors[name] = tensors[name].copy()
        tensors[name].flat[0] += 0.25
        save_file(tensors, path, metadata={"format": "pt"})
        return path

    yield edit
    for path, data, stat in saved:
        path.write_bytes(data)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def model_of_jobs(dry_run_output: str) -> set[str]:
    return {line.split("model=", 1)[1].split(",")[0].strip() for line in dry_run_output.splitlines() if "wildcards: model=" in line}


def test_new_adapter_weights_rerun_that_model_only(workflow: Workflow, edited_adapter: Any) -> None:
    edited_adapter(workflow.best)
    jobs = workflow.plan()
    assert set(jobs) - FOLLOWERS == {
        "merge_adapter", "convert_gguf", "quantize_gguf", "test_merged_model", "compare_models", "plot_comparison",
        "deploy_model", "check_chat_parity", "export_adapter", "compare_adapter",
    }, workflow.last_output[-4000:]  # fmt: skip
    assert "rank_candidates" not in jobs  # the ranking reads metrics, not weights
    assert model_of_jobs(workflow.last_output) == {workflow.best}


def test_other_candidates_weights_rerun_only_its_adapter_export(workflow: Workflow, edited_adapter: Any) -> None:
    """The other candidate is never merged; it shares the base, so its adapter GGUF is all it has."""
    loser = next(name for name in workflow.config["candidates"] if name != workflow.best)
    edited_adapter(loser)
    jobs = workflow.plan()
    assert set(jobs) - {"all"} == {"export_adapter"} and jobs["export_adapter"] == 1, workflow.last_output[-3000:]
    assert model_of_jobs(workflow.last_output) == {loser}


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("models/{m}-merged-gguf/model-q8_0.gguf", {"merge_adapter": 1, "convert_gguf": 1, "quantize_gguf": 1}),
        ("results/{m}/merged_model_test.json", {"merge_adapter": 1, "test_merged_model": 1}),
        ("results/{m}/merge_report.json", {"merge_adapter": 1}),
    ],
    ids=["quantized-file", "inference-test", "merge-report"],
)
def test_one_artifact_builds_only_its_ancestors(
    workflow: Workflow, tmp_path: Path, target: str, expected: dict[str, int]
) -> None:
    """From an empty working directory with the same config: only the target's ancestors are planned."""
    empty = Workflow(tmp_path / "empty", workflow.snakefile, workflow.config)
    write_config(empty.workdir, workflow.config)
    assert empty.plan(target.format(m=workflow.best)) == expected, empty.last_output[-3000:]


def test_manifest_of_the_real_build_verifies(workflow: Workflow) -> None:
    manifest_path = workflow.workdir / f"results/{workflow.best}/manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    rules = {entry["rule"] for entry in manifest["outputs"]}
    assert rules == {"merge_adapter", "convert_gguf", "quantize_gguf", "test_merged_model", "compare_models",
                     "plot_comparison", "deploy_model", "check_chat_parity"}  # fmt: skip
    names = {Path(entry["path"]).name for entry in manifest["outputs"]}
    assert {"model.safetensors", "merge_report.json", "model.gguf", "model-q8_0.gguf", "model-q8_0.json",
            "merged_model_test.json", "compare_models.json", "Modelfile", "deploy.md", "chat_parity.json"} <= names  # fmt: skip
    roles = {entry["role"] for entry in manifest["inputs"]}
    assert roles == {"base", "run", "eval_text", "ranking"}
    assert manifest["config"]["quantize"]["types"] == ["Q8_0"]
    assert manifest["config"]["generation"]["seed"] == workflow.config["generation"]["seed"]
    assert manifest["llama_cpp"]["version"] is not None
    verdict = verify_manifest(manifest_path, root=workflow.workdir)
    assert verdict["ok"], verdict
    gguf = workflow.workdir / f"models/{workflow.best}-merged-gguf/model-q8_0.gguf"
    data = gguf.read_bytes()
    stat = gguf.stat()
    try:
        gguf.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        verdict = verify_manifest(manifest_path, root=workflow.workdir)
        assert [c["path"] for c in verdict["changed"]] == [f"models/{workflow.best}-merged-gguf/model-q8_0.gguf"]
    finally:
        gguf.write_bytes(data)
        os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns))
