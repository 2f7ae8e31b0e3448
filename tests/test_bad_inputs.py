"""Bad inputs through the `lora2gguf` command: exit status 2, one message naming the file and the
problem, and nothing at the output path (not even a hidden temporary sibling).

Cases already covered at the API level elsewhere are not repeated here (see docs/reliability.md):
truncated adapter weights, shape mismatch, missing adapter_config.json, NaN/Inf in the adapter and
pickle checkpoints (tests/test_merge.py), unsupported architecture, config vocab_size vs embedding
rows and pickle-only folders (tests/test_convert.py), truncated / non-GGUF input (tests/test_quant.py,
API), schema errors and a missing base path (tests/test_config.py).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from conftest import (
    assert_nothing_at,
    copy_with_bad_value,
    one_error_message,
    run_cli,
    run_snakemake,
    tiny_config,
    write_config,
)


def merge_argv(base: Path, adapter: Path, out: Path, report: Path, eval_text: Path) -> list[str]:
    return ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out),
            "--report", str(report), "--eval-text", str(eval_text), "--device", "cpu"]  # fmt: skip


def test_corrupt_adapter_header(
    tmp_path: Path, tiny_base: Path, tiny_run: Path, eval_text: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Full length, garbage header (a bit flip in transit, not a truncation): refused before loading."""
    adapter = shutil.copytree(tiny_run, tmp_path / "run")
    weights = adapter / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + min(header_len, 64)] = b"\xff" * min(header_len, 64)
    weights.write_bytes(bytes(data))
    out, report = tmp_path / "models" / "m-merged", tmp_path / "results" / "merge_report.json"
    status, log = run_cli(capsys, *merge_argv(tiny_base, adapter, out, report, eval_text))
    assert status == 2
    line = one_error_message(log)
    assert str(weights) in line and "corrupt" in line, line
    assert_nothing_at(out, report)


def test_nan_in_base_weights(
    tmp_path: Path, tiny_base: Path, tiny_run: Path, eval_text: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A NaN in the base (not the adapter): the merge must not hand over a model that computes NaN."""
    base, _ = copy_with_bad_value(tiny_base, tmp_path / "base", "layers.0.mlp.up_proj.weight", (3, 5), float("nan"))
    out, report = tmp_path / "models" / "m-merged", tmp_path / "results" / "merge_report.json"
    status, log = run_cli(capsys, *merge_argv(base, tiny_run, out, report, eval_text))
    assert status == 2
    line = one_error_message(log)
    assert f"{base / 'model.safetensors'}: base tensor" in line and "NaN/Inf" in line, line
    assert_nothing_at(out, report)


def test_inf_in_model_given_to_convert(tmp_path: Path, tiny_base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An Inf in a folder given straight to `convert` (no merge before it to catch it)."""
    model, name = copy_with_bad_value(
        tiny_base, tmp_path / "model", "layers.0.self_attn.q_proj.weight", (0, 0), float("inf")
    )
    out = tmp_path / "gguf" / "model.gguf"
    status, log = run_cli(capsys, "convert", str(model), str(out), "--no-progress")
    assert status == 2
    line = one_error_message(log)
    assert "model.safetensors" in line and name in line, line
    assert_nothing_at(out)


def test_tokenizer_larger_than_embedding(
    tmp_path: Path, tiny_base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """tokenizer.json has more ids than the embedding has rows (tests/test_convert.py covers
    config.json's vocab_size disagreeing instead): llama.cpp would index past the matrix."""
    model = shutil.copytree(tiny_base, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    rows = config["vocab_size"]
    tok = json.loads((model / "tokenizer.json").read_text())
    tok["added_tokens"] = list(tok.get("added_tokens", [])) + [
        {"id": rows + i, "content": f"<extra_{i}>", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i in range(3)
    ]  # fmt: skip
    (model / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    out = tmp_path / "gguf" / "model.gguf"
    status, log = run_cli(capsys, "convert", str(model), str(out), "--no-progress")
    assert status == 2
    line = one_error_message(log)
    assert "tokenizer.json" in line and str(rows) in line, line
    assert_nothing_at(out)


@pytest.mark.parametrize("damage", ["truncated", "not-gguf", "empty"])
def test_quantize_cli_refuses_damaged_gguf(
    tmp_path: Path, f16_gguf: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.gguf"
    data = f16_gguf.read_bytes()
    src.write_bytes(
        {"truncated": data[: len(data) * 2 // 3], "not-gguf": b"PK\x03\x04" + data[4:4096], "empty": b""}[damage]
    )
    out = tmp_path / "out" / "model-q8_0.gguf"
    sidecar = tmp_path / "out" / "model-q8_0.json"
    status, log = run_cli(capsys, "quantize", str(src), str(out), "Q8_0", "--threads", "1", "--sidecar", str(sidecar))
    assert status == 2
    line = one_error_message(log)
    assert str(src) in line, line
    assert_nothing_at(out, sidecar)


def _quick_config(tmp_path: Path, tiny_base: Path, tiny_runs: dict[str, Path]) -> dict:
    config = tiny_config(tiny_base, tiny_runs, tmp_path)
    config["evaluation"].setdefault("device", "cpu")
    config["evaluation"].setdefault("threads", 2)
    return config


@pytest.mark.parametrize("key", ["evaluation.text", "candidates.tiny-b.run"])
def test_missing_config_path_is_named(
    tmp_path: Path, tiny_base: Path, tiny_runs: dict[str, Path], key: str
) -> None:
    """tests/test_config.py covers a missing base; these are the other configured paths."""
    config = _quick_config(tmp_path, tiny_base, tiny_runs)
    missing = str(tmp_path / "nowhere" / "thing")
    if key == "evaluation.text":
        config["evaluation"]["text"] = missing
    else:
        config["candidates"]["tiny-b"]["run"] = missing
    write_config(tmp_path, config)
    result = run_snakemake(tmp_path, "-n", timeout=300)
    assert result.returncode != 0
    assert f"{key}: path '{missing}' does not exist" in result.stdout + result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "results").exists() and not (tmp_path / "models").exists()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", "calibration text not found"),
        ("not-utf8", "not UTF-8 text"),
        ("too-short", "calibration tokens, fewer than the 16 one pass needs"),
    ],
)
def test_imatrix_cli_refuses_bad_calibration_text(
    tmp_path: Path, tiny_base: Path, capsys: pytest.CaptureFixture[str], case: str, expected: str
) -> None:
    text = tmp_path / "calibration.txt"
    if case == "not-utf8":
        text.write_bytes("咨询".encode("gb18030") + b"\xff\xfe counselling")
    elif case == "too-short":
        text.write_text("hi", encoding="utf-8")
    out = tmp_path / "gguf" / "imatrix.gguf"
    status, log = run_cli(
        capsys, "imatrix", "--model", str(tiny_base), "--text", str(text), "--out", str(out), "--device", "cpu"
    )
    assert status == 2
    line = one_error_message(log)
    assert f"{text}: " in line and expected in line, line
    assert_nothing_at(out, out.with_suffix(".json"))
