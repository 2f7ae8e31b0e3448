"""Tests of the evaluation: metric maths, settings parsing, and both reports on the tiny Qwen2 model
(PyTorch reference vs GGUF files run in real llama.cpp), plus the comparison plots."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lora2gguf.errors import Lora2ggufError
from lora2gguf.evaluate import metrics, settings

ROOT = Path(__file__).resolve().parents[1]
LORA2GGUF = [sys.executable, "-m", "lora2gguf.cli"]


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------
def test_log_softmax_normalises_and_is_shift_invariant() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 11)) * 30  # float64: adding 1000 to float32 inputs would round them
    lp = metrics.log_softmax(x)
    assert np.allclose(np.exp(lp).sum(axis=-1), 1.0)
    assert np.allclose(lp, metrics.log_softmax(x + 1000.0))


def test_kl_ppl_top1_against_hand_computed_values() -> None:
    # Two positions, vocabulary of 2. Reference p = softmax([0, 0]) = (0.5, 0.5);
    # candidate q = softmax([log 3, 0]) = (0.75, 0.25).
    ref = np.zeros((3, 2), dtype=np.float32)
    cand = np.tile(np.array([math.log(3.0), 0.0], dtype=np.float32), (3, 1))
    ids = [0, 1, 0]  # targets of rows 0 and 1 are tokens 1 and 0
    stats = metrics.PositionStats()
    stats.add_window(ref, cand, ids)
    expected_kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert stats.kl == pytest.approx([expected_kl, expected_kl], rel=1e-6)
    assert stats.nll == pytest.approx([-math.log(0.25), -math.log(0.75)], rel=1e-6)
    assert metrics.perplexity(stats.ref_nll) == pytest.approx(2.0)
    assert metrics.perplexity(stats.nll) == pytest.approx(math.exp((-math.log(0.25) - math.log(0.75)) / 2))
    # Reference argmax of a tie is index 0, the candidate's is 0 too.
    assert metrics.top1_agreement(stats.top1_same) == 1.0
    assert metrics.window_nll(ref, ids) == pytest.approx([math.log(2.0)] * 2)


def test_identical_logits_give_zero_kl_and_full_agreement() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(200, 50)).astype(np.float32)
    ids = rng.integers(0, 50, size=200).tolist()
    stats = metrics.PositionStats()
    stats.add_window(logits, logits.copy(), ids)
    summary = metrics.kl_summary(stats.kl)
    assert summary["max"] == 0.0
    assert metrics.top1_agreement(stats.top1_same) == 1.0
    assert metrics.perplexity(stats.nll) == pytest.approx(metrics.perplexity(stats.ref_nll))


def test_kl_summary_order_and_shape_errors() -> None:
    summary = metrics.kl_summary([0.0, 0.1, 0.2, 5.0])
    assert summary["median"] <= summary["p99"] <= summary["max"] == 5.0
    assert summary["mean"] == pytest.approx(5.3 / 4)
    stats = metrics.PositionStats()
    with pytest.raises(ValueError):
        stats.add_window(np.zeros((3, 4)), np.zeros((3, 5)), [0, 1, 2])
    with pytest.raises(ValueError):
        metrics.perplexity([])


def test_token_agreement_and_text_similarity() -> None:
    same = metrics.token_agreement([1, 2, 3], [1, 2, 3])
    assert same["identical_fraction"] == 1.0 and same["prefix_tokens"] == 3
    diverged = metrics.token_agreement([1, 2, 3, 4], [1, 9, 3])
    assert diverged["identical_fraction"] == pytest.approx(2 / 4)
    assert diverged["prefix_tokens"] == 1
    assert metrics.text_similarity("abcd", "abcd") == 1.0
    assert metrics.text_similarity("abcd", "abce") == pytest.approx(0.75)
    assert metrics.text_similarity("", "") == 1.0


def test_windows_split_without_overlap() -> None:
    assert metrics.windows(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert metrics.windows(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]


# ----------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------
def test_prompts_from_inline_json_file_and_config(tmp_path: Path) -> None:
    inline = json.dumps([{"id": "a", "text": "你好"}], ensure_ascii=False)
    assert settings.resolve_prompts(None, inline) == [settings.Prompt("a", "你好")]
    config = ROOT / "config.yaml"
    from_config = settings.resolve_prompts(str(config), None)
    assert [p.id for p in from_config][:5] == [
        "exam-anxiety", "insomnia", "loneliness", "family-pressure", "low-mood",
    ]
    path = tmp_path / "p.yaml"
    path.write_text("- {id: x, text: hello}\n", encoding="utf-8")
    assert settings.resolve_prompts(None, str(path))[0].text == "hello"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('[{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]', "duplicate id"),
        ('[{"id": "a"}]', ".text"),
        ('[{"id": "a", "text": "x", "extra": 1}]', "unknown key"),
        ("[]", "non-empty list"),
        ("[{", "inline JSON is invalid"),
        ("/nonexistent/prompts.json", "file not found"),
    ],
)
def test_bad_prompts_are_refused_with_a_clear_message(value: str, message: str) -> None:
    with pytest.raises(Lora2ggufError, match=message):
        settings.resolve_prompts(None, value)


def test_generation_settings_validated() -> None:
    gen = settings.resolve_generation(None, '{"max_new_tokens": 8, "do_sample": false}')
    assert gen.max_new_tokens == 8 and gen.repetition_penalty == 1.0
    with pytest.raises(Lora2ggufError, match="max_new_tokens"):
        settings.resolve_generation(None, '{"max_new_tokens": 0}')
    with pytest.raises(Lora2ggufError, match="top_p"):
        settings.resolve_generation(None, '{"top_p": 1.5}')
    with pytest.raises(Lora2ggufError, match="unknown key"):
        settings.resolve_generation(None, '{"beams": 2}')
    with pytest.raises(Lora2ggufError, match="do_sample"):
        settings.resolve_generation(None, '{"do_sample": "yes"}')


def test_evaluation_settings_need_an_existing_text(tmp_path: Path) -> None:
    with pytest.raises(Lora2ggufError, match="evaluation text not found"):
        settings.resolve_evaluation(None, str(tmp_path / "missing.txt"), None, None)
    text = tmp_path / "e.txt"
    text.write_text("hello", encoding="utf-8")
    ev = settings.resolve_evaluation(None, str(text), 64, 32)
    assert (ev.max_tokens, ev.context) == (64, 32)
