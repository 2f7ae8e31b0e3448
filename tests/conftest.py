"""Shared fixtures: the tiny Qwen2 base, LoRA runs trained on it, and a workflow runner."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lora2gguf.demo.dataset import render_text
from lora2gguf.demo.tiny import build_tiny_qwen2
from lora2gguf.demo.train import train_lora

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen2(tmp_path_factory.mktemp("bases") / "tiny-qwen2", seed=0)


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> dict[str, Path]:
    """Two real (very short) LoRA trainings on the tiny base, in LLaMA-Factory's layout."""
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, r, lr in (("tiny-a", 4, 5e-3), ("tiny-b", 8, 1e-3)):
        runs[name] = train_lora(tiny_base, root / name, r=r, alpha=2 * r, lr=lr, steps=4, seed=0)
    return runs


@pytest.fixture(scope="session")
def tiny_run(tiny_runs: dict[str, Path]) -> Path:
    return tiny_runs["tiny-a"]


def tiny_config(tiny_base: Path, tiny_runs: dict[str, Path], workdir: Path, **overrides: Any) -> dict:
    """The project's config.yaml pointed at the tiny runs, with the demo switched off."""
    config = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    config["candidates"] = {name: {"base": str(tiny_base), "run": str(run)} for name, run in tiny_runs.items()}
    config["demo"] = {"enabled": False}
    eval_text = workdir / "eval.txt"
    eval_text.write_text(render_text("eval"), encoding="utf-8")
    config["evaluation"].update(text=str(eval_text), max_tokens=64, context=128)
    train_text = workdir / "train.txt"
    train_text.write_text(render_text("train"), encoding="utf-8")
    config["calibration"].update(text=str(train_text), max_tokens=256, chunk_size=128, device="cpu")
    config["quantize"]["types"] = ["Q8_0", "Q4_K_M"]
    config["generation"]["max_new_tokens"] = 8
    config["test_prompts"] = config["test_prompts"][:2]
    for key, value in overrides.items():
        config[key] = value
    return config


def write_config(workdir: Path, config: dict) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def run_snakemake(workdir: Path, *args: str, timeout: int = 1800) -> subprocess.CompletedProcess[str]:
    """Run the project's Snakefile in ``workdir`` (which holds its own config.yaml)."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = [str(BIN / "snakemake"), "-s", str(ROOT / "Snakefile"), "-d", str(workdir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)


@pytest.fixture
def snakemake_runner() -> Any:
    return run_snakemake


@pytest.fixture
def fresh_workdir(tmp_path: Path) -> Path:
    workdir = tmp_path / "work"
    workdir.mkdir()
    return workdir


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
