"""The whole workflow on the tiny config: it builds, then has nothing to do, then reruns only what is stale."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from conftest import copy_tree, run_snakemake, tiny_config, write_config

pytestmark = pytest.mark.slow


def planned_jobs(dry_run_output: str) -> dict[str, int]:
    """Rule -> job count from the job-stats table of a dry run."""
    table = dry_run_output.split("Job stats:", 1)
    if len(table) < 2:
        return {}
    jobs: dict[str, int] = {}
    for line in table[1].splitlines():
        match = re.match(r"^(\w+)\s+(\d+)\s*$", line.strip())
        if match and match.group(1) != "total":
            jobs[match.group(1)] = int(match.group(2))
    return jobs


@pytest.fixture(scope="module")
def own_runs(tmp_path_factory: pytest.TempPathFactory, tiny_runs: dict[str, Path]) -> dict[str, Path]:
    """Copies of the session's runs: a test here rewrites a metrics file (dated 5 s ahead), which must
    not reach the other modules' workflows (Snakemake refuses an input newer than its output)."""
    root = tmp_path_factory.mktemp("workflow-runs")
    return {name: copy_tree(run, root / name) for name, run in tiny_runs.items()}


@pytest.fixture(scope="module")
def built_workdir(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, own_runs: dict[str, Path]) -> Path:
    workdir = tmp_path_factory.mktemp("workflow")
    write_config(workdir, tiny_config(tiny_base, own_runs, workdir))
    result = run_snakemake(workdir, "--cores", "2")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    return workdir


def test_complete_run_builds_every_artifact(built_workdir: Path, own_runs: dict[str, Path]) -> None:
    analysis = json.loads((built_workdir / "results/model_analysis.json").read_text())
    assert set(analysis["ranking"]) == set(own_runs)
    best = analysis["best"]
    losses = {n: analysis["candidates"][n]["metrics"]["eval_loss"] for n in own_runs}
    assert losses[best] == min(losses.values())
    gguf = built_workdir / f"models/{best}-merged-gguf"
    for path in (
        built_workdir / f"models/{best}-merged/model.safetensors",
        built_workdir / f"results/{best}/merge_report.json",
        gguf / "model.gguf",
        gguf / "model-q8_0.gguf",
        gguf / "model-q4_km.gguf",
        gguf / "model-q4_km.json",
        built_workdir / f"results/{best}/merged_model_test.json",
        built_workdir / f"results/{best}/compare_models.json",
        built_workdir / "results/plots/candidates.png",
        gguf / "Modelfile",
        built_workdir / f"results/{best}/deploy.md",
        built_workdir / f"results/{best}/chat_parity.json",
    ):
        assert path.is_file() and path.stat().st_size > 0, path
    parity = json.loads((built_workdir / f"results/{best}/chat_parity.json").read_text())
    assert parity["gguf"]["path"].endswith("model-q4_km.gguf")
    assert all(r["identical"] == r["of"] for r in parity["renderers"].values() if r["measured"]), parity["summary"]
    loser = next(n for n in own_runs if n != best)
    assert not (built_workdir / f"models/{loser}-merged").exists()
    # Snakemake's benchmark tables go next to the job logs; benchmarks/ is for benchmark code only.
    assert (built_workdir / f"logs/benchmarks/merge_adapter/{best}.tsv").is_file()
    assert (built_workdir / f"logs/benchmarks/quantize_gguf/{best}-q4_km.tsv").is_file()
    assert not (built_workdir / "benchmarks").exists()


def test_second_dry_run_has_nothing_to_do(built_workdir: Path) -> None:
    result = run_snakemake(built_workdir, "-n", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert planned_jobs(result.stdout + result.stderr) == {}, result.stdout[-3000:]


def test_rewritten_metrics_rerun_only_the_ranking(built_workdir: Path, own_runs: dict[str, Path]) -> None:
    """A trainer that rewrites all_results.json reruns the ranking and nothing else.

    Snakemake 9 compares the checksum of small inputs, so a bare `touch` with identical bytes is
    (rightly) not a change; a rewrite with other bytes is, even when the numbers are the same.
    """
    results_file = next(iter(own_runs.values())) / "all_results.json"
    data = json.loads(results_file.read_text())
    results_file.write_text(json.dumps(data, indent=4, sort_keys=True) + "\n")
    later = time.time() + 5
    os.utime(results_file, (later, later))
    result = run_snakemake(built_workdir, "-n", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = planned_jobs(result.stdout + result.stderr)
    assert jobs.get("rank_candidates") == 1, result.stdout[-3000:]
    assert "merge_adapter" not in jobs and "quantize_gguf" not in jobs, jobs
