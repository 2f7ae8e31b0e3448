"""Two from-scratch runs of merge -> convert -> quantize on the same inputs give the same bytes.

Both runs write to the same paths (the reports record paths), the first one's outputs are moved
aside before the second starts. Weights and GGUF files must be byte-identical; JSON reports must be
identical once timing and memory fields are dropped.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from lora2gguf.artifacts import sha256_file, sha256_tree

# Keys whose values are measurements of this run (wall time, memory, machine load), not results.
VOLATILE = re.compile(r"^(timing_s|time_s|seconds|memory|load_average|created_utc)$|_s$|_seconds$|_mb$")


def strip_volatile(obj: Any, dropped: list[str], where: str = "") -> Any:
    if isinstance(obj, dict):
        kept = {}
        for key, value in obj.items():
            if VOLATILE.search(key):
                dropped.append(f"{where}.{key}")
            else:
                kept[key] = strip_volatile(value, dropped, f"{where}.{key}")
        return kept
    if isinstance(obj, list):
        return [strip_volatile(v, dropped, f"{where}[{i}]") for i, v in enumerate(obj)]
    return obj


def build(work: Path, base: Path, run: Path, eval_text: Path) -> dict[str, Path]:
    merged = work / "models" / "m-merged"
    report = work / "results" / "merge_report.json"
    f16 = work / "models" / "m-merged-gguf" / "model.gguf"
    quants = {t: work / "models" / "m-merged-gguf" / f"model-{t.lower()}.gguf" for t in ("Q8_0", "Q4_K_M")}
    steps = [
        ["merge", "--base", base, "--adapter", run, "--out", merged, "--report", report, "--eval-text", eval_text,
         "--device", "cpu"],
        ["convert", merged, f16, "--no-progress", "--name", "m"],
        *(["quantize", f16, out, qtype, "--threads", "2", "--sidecar", out.with_suffix(".json")]
          for qtype, out in quants.items()),
    ]  # fmt: skip
    for step in steps:
        result = subprocess.run([sys.executable, "-m", "lora2gguf.cli", *map(str, step)],
                                capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
        assert result.returncode == 0, f"{step[0]}: {result.stderr[-3000:]}"
    return {
        "merged": merged,
        "merge_report": report,
        "f16": f16,
        **{f"quant_{t}": out for t, out in quants.items()},
        **{f"sidecar_{t}": out.with_suffix(".json") for t, out in quants.items()},
    }


def test_two_runs_give_identical_bytes(tmp_path: Path, tiny_base: Path, tiny_run: Path) -> None:
    from lora2gguf.demo.dataset import render_text

    eval_text = tmp_path / "eval.txt"
    eval_text.write_text(render_text("eval"), encoding="utf-8")
    work = tmp_path / "work"
    first = build(work, tiny_base, tiny_run, eval_text)
    hashes = {
        "merged": sha256_tree(first["merged"]),
        **{k: sha256_file(p) for k, p in first.items() if k == "f16" or k.startswith("quant_")},
    }
    reports = {k: json.loads(p.read_text()) for k, p in first.items() if k == "merge_report" or k.startswith("sidecar_")}
    shutil.move(str(work), str(tmp_path / "first"))

    second = build(work, tiny_base, tiny_run, eval_text)
    assert sha256_tree(second["merged"]) == hashes["merged"]
    assert any(name.endswith(".safetensors") for name in hashes["merged"])
    for key in ("f16", "quant_Q8_0", "quant_Q4_K_M"):
        assert sha256_file(second[key]) == hashes[key], key
    for key, before in reports.items():
        after = json.loads(second[key].read_text())
        dropped_before: list[str] = []
        dropped_after: list[str] = []
        assert strip_volatile(after, dropped_after) == strip_volatile(before, dropped_before), key
        assert dropped_before == dropped_after and dropped_before, key  # same fields, and timings exist
    # The sidecars and the merge report record the hashes the files really have.
    assert reports["sidecar_Q8_0"]["output"]["sha256"] == hashes["quant_Q8_0"]
    assert reports["merge_report"]["output"]["sha256"]["model.safetensors"] == hashes["merged"]["model.safetensors"]
