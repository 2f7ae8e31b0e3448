"""Ranking of candidate runs from trainer outputs, including the malformed inputs users meet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora2gguf.cli import main
from lora2gguf.errors import Lora2ggufError
from lora2gguf.rank import rank, read_candidate


def make_run(folder: Path, eval_loss: object = 0.07, **extra: object) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 8,
                "lora_alpha": 16,
                "target_modules": ["q_proj", "v_proj"],
                "base_model_name_or_path": "bases/qwen2",
            }
        )
    )
    results = {"eval_loss": eval_loss, "eval_samples_per_second": 26.88, "eval_runtime": 3.2, "epoch": 3.0}
    results.update(extra)
    (folder / "eval_results.json").write_text(json.dumps(results))
    (folder / "train_results.json").write_text(json.dumps({"train_loss": 0.0845, "epoch": 3.0}))
    (folder / "trainer_state.json").write_text(
        json.dumps(
            {
                "global_step": 30,
                "log_history": [
                    {"step": 10, "loss": 1.2},
                    {"step": 20, "loss": 0.9, "eval_loss": 0.95},
                    {"step": 30, "loss": 0.7},
                ],
            }
        )
    )
    return folder


def rank_cli(tmp_path: Path, *runs: tuple[str, Path]) -> tuple[int, Path]:
    out = tmp_path / "results" / "model_analysis.json"
    argv = ["rank", "--out", str(out)]
    for name, run in runs:
        argv += ["--candidate", name, str(run), str(tmp_path / "bases" / "qwen2")]
    return main(argv), out


def test_export_guide_table(tmp_path: Path) -> None:
    """The export guide's three runs: best, then margins '0.000017 higher (0.02%)' and 3.3%."""
    runs = [
        ("mindchat-qwen2-05b", make_run(tmp_path / "a", 0.073324)),
        ("qwen15-05b", make_run(tmp_path / "b", 0.073341)),
        ("qwen25-05b", make_run(tmp_path / "c", 0.075774)),
    ]
    code, out = rank_cli(tmp_path, *reversed(runs))
    assert code == 0
    analysis = json.loads(out.read_text())
    assert list(analysis)[0] == "schema" and analysis["schema"] == "lora2gguf/model_analysis/1"
    assert list(analysis)[-1] == "versions" and "python" in analysis["versions"]
    assert analysis["best"] == "mindchat-qwen2-05b"
    assert analysis["ranking"] == ["mindchat-qwen2-05b", "qwen15-05b", "qwen25-05b"]
    second = analysis["candidates"]["qwen15-05b"]
    assert second["margin_to_best"]["absolute"] == pytest.approx(0.000017)
    assert second["margin_to_best"]["text"] == "0.000017 higher (0.02%)"
    third = analysis["candidates"]["qwen25-05b"]["margin_to_best"]
    assert third["absolute"] == pytest.approx(0.002450)
    assert third["relative_percent"] == pytest.approx(3.34, abs=0.01)
    best = analysis["candidates"]["mindchat-qwen2-05b"]
    assert best["sources"]["eval_loss"] == "eval_results.json"
    assert best["sources"]["train_loss"] == "train_results.json"
    assert best["metrics"]["global_step"] == 30
    assert best["lora"]["r"] == 8 and best["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert best["curves"]["loss"] == [[10, 1.2], [20, 0.9], [30, 0.7]]
    assert best["curves"]["eval_loss"] == [[20, 0.95]]


def test_tie_is_broken_by_name_whatever_the_order(tmp_path: Path) -> None:
    a = read_candidate("zeta", make_run(tmp_path / "z", 0.5), None, "eval_loss")
    b = read_candidate("alpha", make_run(tmp_path / "a", 0.5), None, "eval_loss")
    assert rank([a, b], "eval_loss", "min")["best"] == "alpha"
    assert rank([b, a], "eval_loss", "min")["best"] == "alpha"


def test_max_mode_prefers_higher(tmp_path: Path) -> None:
    a = read_candidate("a", make_run(tmp_path / "a", 0.5, eval_accuracy=0.8), None, "eval_accuracy")
    b = read_candidate("b", make_run(tmp_path / "b", 0.4, eval_accuracy=0.9), None, "eval_accuracy")
    assert rank([a, b], "eval_accuracy", "max")["best"] == "b"


def test_metric_falls_back_to_log_history(tmp_path: Path) -> None:
    run = make_run(tmp_path / "r")
    (run / "eval_results.json").unlink()
    cand = read_candidate("r", run, None, "eval_loss")
    assert cand.values["eval_loss"] == 0.95
    assert cand.sources["eval_loss"] == "trainer_state.json:log_history[-1]"


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("no_metrics", "has no metrics file"),
        ("missing_metric", "records no 'eval_loss'"),
        ("nan", "eval_results.json: key 'eval_loss' is nan"),
        ("string", "eval_results.json: key 'eval_loss' is not a number"),
        ("bad_adapter_json", "adapter_config.json: not valid JSON"),
        ("no_adapter_config", "adapter_config.json: file not found"),
        ("bad_results_json", "eval_results.json: not valid JSON"),
    ],
)
def test_bad_input_names_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], breakage: str, message: str
) -> None:
    good = make_run(tmp_path / "good", 0.1)
    bad = make_run(tmp_path / "bad", 0.2)
    if breakage == "no_metrics":
        for name in ("eval_results.json", "train_results.json", "trainer_state.json"):
            (bad / name).unlink()
    elif breakage == "missing_metric":
        (bad / "eval_results.json").write_text(json.dumps({"eval_runtime": 1.0}))
        (bad / "trainer_state.json").write_text(json.dumps({"log_history": []}))
    elif breakage == "nan":
        (bad / "eval_results.json").write_text('{"eval_loss": NaN}')
    elif breakage == "string":
        (bad / "eval_results.json").write_text('{"eval_loss": "0.07"}')
    elif breakage == "bad_adapter_json":
        (bad / "adapter_config.json").write_text("{not json")
    elif breakage == "no_adapter_config":
        (bad / "adapter_config.json").unlink()
    elif breakage == "bad_results_json":
        (bad / "eval_results.json").write_text('{"eval_loss": 0.07')
    code, out = rank_cli(tmp_path, ("good", good), ("bad", bad))
    assert code == 2
    assert not out.exists()
    errors = [line for line in capsys.readouterr().err.splitlines() if "ERROR" in line]
    assert any(message in e and str(bad) in e for e in errors), errors


def test_rank_rejects_unknown_mode(tmp_path: Path) -> None:
    cand = read_candidate("a", make_run(tmp_path / "a"), None, "eval_loss")
    with pytest.raises(Lora2ggufError, match="mode"):
        rank([cand], "eval_loss", "lowest")
