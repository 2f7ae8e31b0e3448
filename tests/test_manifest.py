"""`lora2gguf manifest` and `lora2gguf verify` on a small stand-in build (no workflow run needed;
tests/test_staleness.py checks the manifest the real workflow writes)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import ROOT

from lora2gguf.artifacts import sha256_file
from lora2gguf.cli import main
from lora2gguf.layout import BENCHMARKS, LOGS, RULE_OUTPUTS
from lora2gguf.manifest.build import RULE_PATTERNS, SCHEMA, rule_for
from lora2gguf.manifest.verify import verify_manifest

MODEL = "tiny-a"

OUTPUTS = {
    f"models/{MODEL}-merged/model.safetensors": b"weights" * 100,
    f"models/{MODEL}-merged/config.json": b'{"architectures": ["Qwen2ForCausalLM"]}',
    f"models/{MODEL}-merged/tokenizer.json": b"{}",
    f"results/{MODEL}/merge_report.json": b'{"verification": {"passed": true}}',
    f"models/{MODEL}-merged-gguf/model.gguf": b"GGUF" + bytes(range(256)) * 8,
    f"models/{MODEL}-merged-gguf/model-q8_0.gguf": b"GGUF" + bytes(range(200)),
    f"models/{MODEL}-merged-gguf/model-q8_0.json": b'{"type": "Q8_0"}',
    f"results/{MODEL}/merged_model_test.json": b'{"versions": {"llama_cpp_python": "0.3.36"}}',
    f"results/{MODEL}/compare_models.json": b'{"versions": {"llama_cpp_python": "0.3.36"}}',
    f"results/plots/{MODEL}-size-vs-kl.png": b"\x89PNG kl",
    f"results/plots/{MODEL}-size-vs-perplexity.png": b"\x89PNG ppl",
    f"results/plots/{MODEL}-speed.png": b"\x89PNG speed",
}
EXPECTED_RULES = {
    "merged/": "merge_adapter",
    "merge_report.json": "merge_adapter",
    "model.gguf": "convert_gguf",
    "model-q8_0.gguf": "quantize_gguf",
    "model-q8_0.json": "quantize_gguf",
    "merged_model_test.json": "test_merged_model",
    "compare_models.json": "compare_models",
    ".png": "plot_comparison",
}
CONFIG = {"quantize": {"types": ["Q8_0"], "threads": 2}, "generation": {"seed": 1234, "max_new_tokens": 8}}


@pytest.fixture
def build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory laid out like the workflow's, with inputs outside it (absolute paths)."""
    inputs = tmp_path / "inputs"
    for rel, data in {
        "base/config.json": b"{}",
        "base/model.safetensors": b"base weights",
        "run/adapter_config.json": b"{}",
        "run/adapter_model.safetensors": b"adapter",
        "eval.txt": "评估文本\n".encode(),
    }.items():
        (inputs / rel).parent.mkdir(parents=True, exist_ok=True)
        (inputs / rel).write_bytes(data)
    work = tmp_path / "work"
    for rel, data in {**OUTPUTS, "results/model_analysis.json": b'{"best": "tiny-a"}'}.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_bytes(data)
    monkeypatch.chdir(work)
    return work


def manifest_argv(inputs: Path, out: str = f"results/{MODEL}/manifest.json") -> list[str]:
    outputs = [f"models/{MODEL}-merged", *(p for p in OUTPUTS if not p.startswith(f"models/{MODEL}-merged/"))]
    return [
        "manifest", "--model", MODEL,
        "--input", f"base={inputs / 'base'}", "--input", f"run={inputs / 'run'}",
        "--input", f"eval_text={inputs / 'eval.txt'}", "--input", "ranking=results/model_analysis.json",
        *(arg for path in outputs for arg in ("--output", path)),
        "--config-json", json.dumps(CONFIG), "--out", out,
    ]  # fmt: skip


def test_manifest_lists_every_artifact(build: Path) -> None:
    inputs = build.parent / "inputs"
    assert main(manifest_argv(inputs)) == 0
    manifest = json.loads((build / f"results/{MODEL}/manifest.json").read_text(encoding="utf-8"))
    assert manifest["schema"] == SCHEMA and manifest["model"] == MODEL
    assert manifest["config"] == CONFIG
    assert manifest["root"] == str(build)
    assert {"python", "torch", "gguf", "numpy", "llama_cpp_python"} <= manifest["versions"].keys()
    assert manifest["llama_cpp"]["package"] == "llama_cpp_python"
    assert manifest["llama_cpp"]["recorded_by_reports"] == {
        f"results/{MODEL}/merged_model_test.json": "0.3.36",
        f"results/{MODEL}/compare_models.json": "0.3.36",
    }
    outputs = {e["path"]: e for e in manifest["outputs"]}
    assert set(outputs) == set(OUTPUTS)
    for rel, data in OUTPUTS.items():
        entry = outputs[rel]
        assert entry["size"] == len(data) and entry["sha256"] == sha256_file(build / rel)
        assert entry["rule"] == next(rule for key, rule in EXPECTED_RULES.items() if key in rel), rel
    inputs_by_path = {e["path"]: e for e in manifest["inputs"]}
    assert len(inputs_by_path) == 6
    assert inputs_by_path[(inputs / "run/adapter_model.safetensors").as_posix()]["role"] == "run"
    assert inputs_by_path[(inputs / "eval.txt").as_posix()]["sha256"] == sha256_file(inputs / "eval.txt")
    assert inputs_by_path["results/model_analysis.json"]["rule"] == "rank_candidates"
    assert inputs_by_path[(inputs / "base/model.safetensors").as_posix()]["rule"] is None  # a user input
    assert manifest["folders"]["outputs"][f"models/{MODEL}-merged"] == ["config.json", "model.safetensors", "tokenizer.json"]
    assert manifest["totals"]["output_bytes"] == sum(len(d) for d in OUTPUTS.values())


def test_verify_passes_then_reports_each_change(build: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inputs = build.parent / "inputs"
    manifest = f"results/{MODEL}/manifest.json"
    assert main(manifest_argv(inputs)) == 0
    assert main(["verify", manifest]) == 0

    # One flipped byte in a quantized file, same size.
    q8 = build / f"models/{MODEL}-merged-gguf/model-q8_0.gguf"
    data = bytearray(q8.read_bytes())
    data[10] ^= 1
    q8.write_bytes(bytes(data))
    (build / f"results/plots/{MODEL}-speed.png").unlink()
    (build / f"models/{MODEL}-merged/extra.safetensors").write_bytes(b"stray shard")
    (build / f"models/{MODEL}-merged/.snakemake_timestamp").touch()  # Snakemake bookkeeping, ignored
    (inputs / "run/adapter_model.safetensors").write_bytes(b"retrained adapter")
    capsys.readouterr()
    assert main(["verify", manifest, "--json", "verdict.json"]) == 1
    log = capsys.readouterr().err
    verdict = json.loads(Path("verdict.json").read_text())
    assert verdict["schema"] == "lora2gguf/verify/1"
    assert verdict["ok"] is False and verdict["checked"] == len(OUTPUTS) + 6
    assert [c["path"] for c in verdict["changed"]] == [
        (inputs / "run/adapter_model.safetensors").as_posix(),
        f"models/{MODEL}-merged-gguf/model-q8_0.gguf",
    ]
    assert verdict["changed"][1]["rule"] == "quantize_gguf"
    assert verdict["missing"] == [{"section": "outputs", "path": f"results/plots/{MODEL}-speed.png", "rule": "plot_comparison"}]
    assert verdict["added"] == [f"models/{MODEL}-merged/extra.safetensors"]
    assert f"changed: models/{MODEL}-merged-gguf/model-q8_0.gguf (output, made by quantize_gguf)" in log
    assert f"missing: results/plots/{MODEL}-speed.png" in log
    assert "1 missing, 1 added" in log

    # --outputs-only ignores the retrained adapter but still sees the outputs' problems.
    assert verify_manifest(Path(manifest), outputs_only=True)["changed"][0]["path"].endswith("model-q8_0.gguf")


def test_verify_after_moving_the_build(build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = build.parent / "inputs"
    assert main(manifest_argv(inputs)) == 0
    moved = shutil.move(str(build), str(tmp_path / "moved"))
    monkeypatch.chdir(tmp_path)
    manifest = Path(moved) / f"results/{MODEL}/manifest.json"
    # The recorded root is gone: relative paths resolve against the current folder -> all missing.
    assert main(["verify", str(manifest)]) == 1
    assert main(["verify", str(manifest), "--root", moved]) == 0


def test_bad_manifest_and_missing_output(build: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inputs = build.parent / "inputs"
    Path("broken.json").write_text('{"schema": ', encoding="utf-8")
    capsys.readouterr()
    assert main(["verify", "broken.json"]) == 2
    assert "broken.json: not valid JSON" in capsys.readouterr().err
    Path("other.json").write_text('{"best": "x"}', encoding="utf-8")
    assert main(["verify", "other.json"]) == 2
    assert "other.json: not a lora2gguf manifest" in capsys.readouterr().err

    (build / f"results/{MODEL}/compare_models.json").unlink()
    assert main(manifest_argv(inputs)) == 2
    assert f"results/{MODEL}/compare_models.json: output not found" in capsys.readouterr().err
    assert not (build / f"results/{MODEL}/manifest.json").exists()
    assert not list((build / f"results/{MODEL}").glob(".manifest.json.tmp-*"))


def test_rule_patterns_name_real_rules() -> None:
    """Every rule the manifest may name exists in rules/*.smk, and every artifact maps to one."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "rules").glob("*.smk"))
    defined = set(re.findall(r"^(?:rule|checkpoint)\s+(\w+):", text, flags=re.M))
    assert {rule for _, rule in RULE_PATTERNS} <= defined
    assert set(RULE_OUTPUTS) <= defined
    assert set(LOGS) == set(BENCHMARKS) == defined  # every rule's log and benchmark path comes from the layout
    for rel in OUTPUTS:
        assert rule_for(rel) is not None, rel
    assert rule_for("resources/demo/bases/x/model.safetensors") is None
    assert rule_for(f"/abs/work/models/{MODEL}-merged-gguf/model-q4_km.gguf") == "quantize_gguf"
