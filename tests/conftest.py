"""Shared fixtures: the tiny Qwen2 base, LoRA runs trained on it, a workflow runner, and the helpers
of the bad-input tests (run `lora2gguf` in this process, check a refusal left everything as it was)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from lora2gguf.cli import main
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


# --- the `lora2gguf` command on bad inputs --------------------------------------------------------------


@contextlib.contextmanager
def _root_logger_kept() -> Iterator[None]:
    """main() points the root logger at the current (captured) stderr; put the handlers back
    afterwards so that later tests do not log into a closed stream."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str | os.PathLike[str]) -> tuple[int, str]:
    """Run `lora2gguf ARGV` in this process (torch loads once for the whole session) -> (status, log)."""
    capsys.readouterr()
    with _root_logger_kept():
        status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def one_error_message(log: str) -> str:
    """The message after `error: ` of the log's only `error:` line: fails on none, on several and on
    a traceback."""
    lines = [line for line in log.splitlines() if "error: " in line]
    assert len(lines) == 1, f"expected one 'error:' line, got {len(lines)}:\n{log[-3000:]}"
    assert "Traceback" not in log, log[-3000:]
    return lines[0].split("error: ", 1)[1]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def tree_state(*roots: Path) -> dict[str, str]:
    """Every file, folder and link at and below ``roots`` (files or folders): a file by its sha256 and
    mode, a folder by its mode, a link by its target. A changed input, a new empty folder and a hidden
    temporary sibling left behind all show as a difference."""
    state: dict[str, str] = {}
    for root in roots:
        for path in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                state[str(path)] = f"link -> {os.readlink(path)}"
            elif stat.S_ISDIR(mode):
                state[str(path)] = f"folder {oct(mode)}"
            elif stat.S_ISREG(mode):
                state[str(path)] = f"{_sha256(path)} {oct(mode)}"
            else:
                state[str(path)] = f"other {oct(mode)}"
    return state


def refused(
    capsys: pytest.CaptureFixture[str], roots: Path | Sequence[Path], *argv: str | os.PathLike[str]
) -> str:
    """Run `lora2gguf ARGV` and check the refusal: exit status 2, exactly one `error:` line and no
    traceback, every file, folder and link at and below ``roots`` as before (nothing changed, added
    or left behind). Returns the error message (the text after `error: `)."""
    roots = [roots] if isinstance(roots, Path) else list(roots)
    before = tree_state(*roots)
    status, log = run_cli(capsys, *argv)
    assert status == 2, log[-3000:]
    message = one_error_message(log)
    assert tree_state(*roots) == before, "the command changed, added or left files"
    return message


def assert_nothing_at(*paths: Path) -> None:
    """No output at ``paths``, and no hidden temporary sibling (`.NAME.*`) next to one."""
    for path in paths:
        assert not path.exists(), f"{path} was written"
        if path.parent.is_dir():
            leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]
            assert not leftovers, f"temporary files left next to {path}: {leftovers}"


def copy_with_bad_value(
    src: Path, dst: Path, tensor_suffix: str, index: tuple[int, ...], value: float
) -> tuple[Path, str]:
    """Copy the model folder ``src`` to ``dst`` with one element of the tensor ending in
    ``tensor_suffix`` set to ``value`` (NaN/Inf); returns the copy and the tensor's name."""
    from safetensors.numpy import load_file, save_file

    model = shutil.copytree(src, dst)
    tensors = load_file(model / "model.safetensors")
    name = next(n for n in sorted(tensors) if n.endswith(tensor_suffix))
    tensors[name] = tensors[name].copy()
    tensors[name][index] = value
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    return model, name


@pytest.fixture(scope="session")
def f16_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    """The tiny base converted by `lora2gguf convert` (F16). Shared: copy it before damaging it."""
    out = tmp_path_factory.mktemp("f16") / "model.gguf"
    with _root_logger_kept():
        assert main(["convert", str(tiny_base), str(out), "--no-progress"]) == 0
    return out


@pytest.fixture
def eval_text(tmp_path: Path) -> Path:
    """The demo's evaluation text, in the test's own ``inputs`` folder (which this creates), so that a
    tree check of ``tmp_path`` covers it."""
    path = tmp_path / "inputs" / "eval.txt"
    path.parent.mkdir(exist_ok=True)
    path.write_text(render_text("eval"), encoding="utf-8")
    return path
