"""Faults: SIGKILL at random moments and a full disk never leave a partial file at a final path.

Each step (merge, convert, quantize) first runs once undisturbed; that run gives the reference bytes
and the duration T. Then ten subprocesses are killed with SIGKILL after seeded random delays, one in
each tenth of T (so the kills cover start-up, reading, computing and writing); a run that finishes
before its kill shortens T and does not count as one of the ten. After every kill the
final path must be absent or byte-identical to the reference (the steps are deterministic), and only
hidden ``.<name>.tmp-<pid>`` siblings may be left beside it. A rerun then completes with the
reference bytes.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lora2gguf.artifacts import sha256_file, sha256_tree

logger = logging.getLogger(__name__)

TRIALS = 10
SEED = 20261129


def lora2gguf_cmd(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "lora2gguf.cli", *map(str, args)]


def run_to_end(cmd: list[str]) -> float:
    start = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return time.monotonic() - start


def kill_after(cmd: list[str], delay: float) -> tuple[int, float]:
    """Start ``cmd``, SIGKILL it after ``delay`` seconds (if still running) -> (exit status, seconds)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
    return proc.wait(), time.monotonic() - start


def stray_files(folder: Path, finals: set[str]) -> list[str]:
    """Names in ``folder`` that are neither a final artifact nor a hidden temporary sibling of one."""
    allowed = tuple(f".{name}.tmp-" for name in finals) + tuple(f".{name}.old-" for name in finals)
    return [p.name for p in folder.iterdir() if p.name not in finals and not p.name.startswith(allowed)]


def check_kills(
    cmd: list[str],
    finals: dict[Path, Callable[[Path], object]],
    reference: dict[Path, object],
    duration: float,
    rng: random.Random,
) -> dict[str, int]:
    """Kill ``cmd`` TRIALS times; after each kill every final path is absent or equal to its reference."""
    outcome = {"killed": 0, "finished": 0, "absent": 0, "complete": 0}
    # Later runs are often faster than the measured one (warm caches, less load): a run that ends
    # before its kill lowers the duration estimate, and trials go on until TRIALS real kills happened.
    while outcome["killed"] < TRIALS and outcome["killed"] + outcome["finished"] < 3 * TRIALS:
        delay = duration * (outcome["killed"] + rng.random()) / TRIALS
        for path in finals:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        status, seconds = kill_after(cmd, delay)
        if status == -signal.SIGKILL:
            outcome["killed"] += 1
        else:
            assert status == 0, f"{cmd[3]} failed on its own (status {status})"
            outcome["finished"] += 1
            duration = min(duration, seconds)
        for path, digest in finals.items():
            if path.exists():
                assert digest(path) == reference[path], f"{path}: partial or different after a kill at {delay:.2f}s"
                outcome["complete"] += 1
            else:
                outcome["absent"] += 1
        for folder in {p.parent for p in finals}:
            assert not stray_files(folder, {p.name for p in finals}), f"kill at {delay:.2f}s left {stray_files(folder, set())}"
    leftovers = sorted(p.name for folder in {p.parent for p in finals} for p in folder.iterdir() if ".tmp-" in p.name)
    logger.info("%s: duration %.1fs, %s, temporary siblings left by kills: %d", cmd[3], duration, outcome, len(leftovers))
    return outcome


def report_digest(path: Path) -> object:
    """Reports carry timings, so 'complete' means: valid JSON with the same keys as the reference."""
    return sorted(json.loads(path.read_text(encoding="utf-8")))


@pytest.mark.slow  # ten torch start-ups: about 3-4 minutes on 2 busy cores
def test_sigkill_merge(tmp_path: Path, tiny_base: Path, tiny_run: Path) -> None:
    out, report = tmp_path / "models" / "m-merged", tmp_path / "results" / "merge_report.json"
    cmd = lora2gguf_cmd("merge", "--base", tiny_base, "--adapter", tiny_run, "--out", out, "--report", report,
                        "--device", "cpu")  # fmt: skip
    duration = run_to_end(cmd)
    finals = {out: sha256_tree, report: report_digest}
    reference = {path: fn(path) for path, fn in finals.items()}
    outcome = check_kills(cmd, finals, reference, duration, random.Random(SEED))
    assert outcome["killed"] == TRIALS, outcome
    run_to_end(cmd)
    assert sha256_tree(out) == reference[out]


@pytest.fixture(scope="module")
def f16_reference(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    out = tmp_path_factory.mktemp("f16") / "model.gguf"
    run_to_end(lora2gguf_cmd("convert", tiny_base, out, "--no-progress"))
    return out


def test_sigkill_convert(tmp_path: Path, tiny_base: Path) -> None:
    out = tmp_path / "gguf" / "model.gguf"
    cmd = lora2gguf_cmd("convert", tiny_base, out, "--no-progress")
    duration = run_to_end(cmd)
    reference = {out: sha256_file(out)}
    outcome = check_kills(cmd, {out: sha256_file}, reference, duration, random.Random(SEED + 1))
    assert outcome["killed"] == TRIALS, outcome
    run_to_end(cmd)
    assert sha256_file(out) == reference[out]


def test_sigkill_quantize(tmp_path: Path, f16_reference: Path) -> None:
    out, sidecar = tmp_path / "gguf" / "model-q8_0.gguf", tmp_path / "gguf" / "model-q8_0.json"
    cmd = lora2gguf_cmd("quantize", f16_reference, out, "Q8_0", "--threads", "1", "--sidecar", sidecar)
    duration = run_to_end(cmd)
    finals = {out: sha256_file, sidecar: report_digest}
    reference = {path: fn(path) for path, fn in finals.items()}
    outcome = check_kills(cmd, finals, reference, duration, random.Random(SEED + 2))
    assert outcome["killed"] == TRIALS, outcome
    run_to_end(cmd)
    assert sha256_file(out) == reference[out]


@pytest.fixture
def small_disk(tmp_path: Path) -> Callable[[int], Path]:
    """Mount tmpfs folders of a given size (root only; skipped where mounting is not allowed)."""
    mounts: list[Path] = []

    def mount(size_bytes: int) -> Path:
        point = tmp_path / f"disk{len(mounts)}"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(point)],
                                capture_output=True, text=True, check=False)  # fmt: skip
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in reversed(mounts):
        subprocess.run(["umount", "-l", str(point)], check=False)


def assert_clear_disk_full_error(result: subprocess.CompletedProcess[str], final: Path) -> None:
    assert result.returncode != 0
    log = result.stdout + result.stderr
    lines = [line for line in log.splitlines() if "error: " in line]
    assert lines, f"no one-line error message:\n{log[-3000:]}"
    assert "No space left on device" in lines[-1] or "no space left" in lines[-1].lower(), lines[-1]
    assert str(final.parent) in lines[-1], lines[-1]
    assert "Traceback" not in log, log[-3000:]
    assert not final.exists()


def test_full_disk_convert(small_disk: Callable[[int], Path], tiny_base: Path, f16_reference: Path) -> None:
    disk = small_disk(f16_reference.stat().st_size // 2)
    out = disk / "model.gguf"
    result = subprocess.run(lora2gguf_cmd("convert", tiny_base, out, "--no-progress"),
                            capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert_clear_disk_full_error(result, out)
    assert not os.listdir(disk), "the temporary file was left on the full disk"


def test_full_disk_quantize(small_disk: Callable[[int], Path], f16_reference: Path) -> None:
    disk = small_disk(f16_reference.stat().st_size // 4)
    out = disk / "model-q8_0.gguf"
    result = subprocess.run(lora2gguf_cmd("quantize", f16_reference, out, "Q8_0", "--threads", "1",
                                          "--sidecar", disk / "model-q8_0.json"),
                            capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert_clear_disk_full_error(result, out)
    assert not os.listdir(disk), "the temporary file was left on the full disk"


def test_full_disk_merge(small_disk: Callable[[int], Path], tiny_base: Path, tiny_run: Path) -> None:
    disk = small_disk((tiny_base / "model.safetensors").stat().st_size // 2)
    out = disk / "m-merged"
    result = subprocess.run(lora2gguf_cmd("merge", "--base", tiny_base, "--adapter", tiny_run, "--out", out,
                                          "--device", "cpu"),
                            capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert_clear_disk_full_error(result, out)
    assert not os.listdir(disk), "the temporary folder was left on the full disk"
