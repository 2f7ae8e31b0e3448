"""Tests of the evaluation: metric maths, settings parsing, and both reports on the tiny Qwen2 model
(PyTorch reference vs GGUF files run in real llama.cpp), plus the comparison plots."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lora2gguf.errors import Lora2ggufError
from lora2gguf import metrics, settings

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


# ----------------------------------------------------------------------------------------------
# reports on the tiny model (PyTorch + real llama.cpp)
# ----------------------------------------------------------------------------------------------
PROMPTS = json.dumps(
    [
        {"id": "exam-anxiety", "text": "我下周就要期末考试了，每天晚上都紧张得睡不着，该怎么办？"},
        {"id": "english", "text": "I feel lonely at university. What can I do?"},
    ],
    ensure_ascii=False,
)
GENERATION = json.dumps({"max_new_tokens": 8, "do_sample": False, "seed": 1})


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LORA2GGUF, *args], capture_output=True, text=True, cwd=ROOT, check=False, timeout=900)


def _convert(model_dir: Path, out: Path) -> Path:
    result = _cli("convert", str(model_dir), str(out), "--outtype", "f16", "--no-progress")
    if "invalid choice: 'convert'" in result.stderr:
        pytest.skip("lora2gguf convert is not available yet")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _llama_quantize(src: Path, dst: Path, ftype_name: str) -> Path:
    """Quantize with llama.cpp itself, so these tests depend only on the evaluator and llama.cpp."""
    llama_cpp = pytest.importorskip("llama_cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    assert rc == 0 and dst.is_file()
    return dst


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> dict[str, Path]:
    pytest.importorskip("llama_cpp")
    folder = tmp_path_factory.mktemp("gguf")
    f16 = _convert(tiny_base, folder / "model.gguf")
    files = {"F16": f16}
    for name, tag in (("Q8_0", "q8_0"), ("Q4_0", "q4_0")):
        files[name] = _llama_quantize(f16, folder / f"model-{tag}.gguf", name)
    return files


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lora2gguf.demo.dataset import render_text

    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(render_text("eval"), encoding="utf-8")
    return path


def _assert_finite(obj: Any, where: str = "report") -> None:
    """Every number finite; a null only where a sibling *_reason / reason explains it."""
    if where.endswith(".versions"):
        return  # an absent optional package is reported as null: that is the fact
    if isinstance(obj, float):
        assert math.isfinite(obj), where
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if value is None:
                explained = any(k.endswith("reason") and obj.get(k) for k in obj) or key in {
                    "cuda_peak_allocated_mb", "sidecar", "sidecar_missing_reason", "sidecar_matches_file", "gpu", "cuda", "general_file_type",
                }
                assert explained, f"{where}.{key} is null without a reason"
            _assert_finite(value, f"{where}.{key}")
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            _assert_finite(value, f"{where}[{index}]")


@pytest.fixture(scope="module")
def test_report(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("test") / "merged_model_test.json"
    result = _cli(
        "test", "--model", str(tiny_base), "--prompts", PROMPTS, "--generation", GENERATION,
        "--device", "cpu", "--threads", "2", "--out", str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text(encoding="utf-8"))


def test_inference_report_fields_present_finite_consistent(test_report: dict[str, Any], tiny_base: Path) -> None:
    r = test_report
    _assert_finite(r)
    assert r["schema"] == "lora2gguf/merged_model_test/1"
    assert r["device"] == "cpu" and r["dtype"] == "float32"
    assert r["versions"]["torch"] and r["versions"]["transformers"]
    from lora2gguf.artifacts import sha256_tree

    assert r["model"]["sha256"] == sha256_tree(tiny_base)
    assert r["model"]["parameters"] > 0
    assert r["settings"]["chat_template_applied"] is True
    assert r["settings"]["generation"]["max_new_tokens"] == 8
    assert [c["id"] for c in r["cases"]] == ["exam-anxiety", "english"]
    for case in r["cases"]:
        assert set(case) >= {
            "id", "prompt", "response", "prompt_tokens", "generated_tokens", "stopped_by",
            "time_to_first_token_s", "latency_s", "tokens_per_s",
        }
        assert isinstance(case["response"], str)
        assert case["prompt_tokens"] > 0
        assert 1 <= case["generated_tokens"] <= 8
        assert case["stopped_by"] in ("eos", "max_new_tokens")
        assert (case["stopped_by"] == "max_new_tokens") == (case["generated_tokens"] == 8) or case["stopped_by"] == "eos"
        assert 0 < case["time_to_first_token_s"] <= case["latency_s"]
        assert case["tokens_per_s"] == pytest.approx(case["generated_tokens"] / case["latency_s"])
    s = r["summary"]
    assert s["cases"] == 2
    assert s["mean_latency_s"] == pytest.approx(sum(c["latency_s"] for c in r["cases"]) / 2)
    assert s["mean_tokens_per_s"] == pytest.approx(sum(c["tokens_per_s"] for c in r["cases"]) / 2)
    assert s["generated_tokens"] == sum(c["generated_tokens"] for c in r["cases"])
    assert s["load_seconds"] > 0 and s["peak_memory_mb"] > 0
    assert s["peak_memory_kind"] == "process_rss"


def test_inference_is_deterministic_under_greedy(test_report: dict[str, Any], tiny_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "again.json"
    result = _cli(
        "test", "--model", str(tiny_base), "--prompts", PROMPTS, "--generation", GENERATION,
        "--device", "cpu", "--batch", "on", "--out", str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads(out.read_text(encoding="utf-8"))
    assert again["settings"]["batched"] is True
    # Greedy replies do not depend on batching (left padding is masked out).
    assert [c["response"] for c in again["cases"]] == [c["response"] for c in test_report["cases"]]


def test_inference_refuses_missing_model_without_writing(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    result = _cli("test", "--model", str(tmp_path / "nope"), "--prompts", PROMPTS, "--out", str(out))
    assert result.returncode == 2
    assert "nope" in result.stderr and "not found" in result.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def compare_report(
    tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, gguf_files: dict[str, Path], eval_text: Path
) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("compare") / "compare_models.json"
    # A quantizer sidecar next to one file is carried into the report.
    sidecar = gguf_files["Q8_0"].with_suffix(".json")
    sidecar.write_text(json.dumps({"type": "Q8_0", "fallbacks": [], "bits_per_weight": 8.5}), encoding="utf-8")
    gguf_args = [a for name in ("F16", "Q8_0", "Q4_0") for a in ("--gguf", str(gguf_files[name]))]
    result = _cli(
        "compare", "--reference", str(tiny_base), *gguf_args, "--eval-text", str(eval_text),
        "--max-tokens", "96", "--context", "64", "--prompts", PROMPTS, "--generation", GENERATION,
        "--threads", "2", "--out", str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text(encoding="utf-8"))


def test_comparison_report_fields_present_finite_consistent(
    compare_report: dict[str, Any], gguf_files: dict[str, Path], eval_text: Path
) -> None:
    from lora2gguf.artifacts import sha256_file

    r = compare_report
    _assert_finite(r)
    assert r["schema"] == "lora2gguf/compare_models/1"
    assert r["versions"]["llama_cpp_python"]
    ref = r["reference"]
    assert ref["dtype"] == "float32" and ref["perplexity"] > 1
    st = r["settings"]
    assert st["eval_text_sha256"] == sha256_file(eval_text)
    assert st["tokens_scored"] == 96 and st["windows"] == 2 and st["positions_scored"] == 94
    assert st["threads"] == 2 and st["max_new_tokens"] == 8
    assert [m["label"] for m in r["models"]] == ["F16", "Q8_0", "Q4_0"]
    for m, name in zip(r["models"], ("F16", "Q8_0", "Q4_0")):
        path = gguf_files[name]
        assert m["sha256"] == sha256_file(path)
        assert m["size_bytes"] == path.stat().st_size
        assert m["perplexity_ratio"] == pytest.approx(m["perplexity"] / ref["perplexity"], rel=1e-12)
        kl = m["kl_divergence"]
        assert 0 <= kl["median"] <= kl["p99"] <= kl["max"] and 0 <= kl["mean"] <= kl["max"]
        assert 0 <= m["top1_agreement"] <= 1
        assert m["positions_scored"] == 94
        assert m["n_params"] == m["llama_cpp"]["llama_n_params"]
        # bits per weight from the header agree with llama.cpp's own size / parameter count.
        assert m["bits_per_weight"] == pytest.approx(8 * m["llama_cpp"]["llama_model_size_bytes"] / m["n_params"], rel=1e-6)
        assert sum(m["tensor_types"].values()) > 0
        g = m["generation"]
        assert len(g["cases"]) == 2
        assert g["identical_token_fraction"] == pytest.approx(sum(c["identical_fraction"] for c in g["cases"]) / 2)
        assert g["text_similarity"] == pytest.approx(sum(c["text_similarity"] for c in g["cases"]) / 2)
        for c in g["cases"]:
            assert 0 <= c["identical_fraction"] <= 1 and 0 <= c["text_similarity"] <= 1
            assert c["prefix_tokens"] <= c["identical_tokens"] <= min(c["reference_tokens"], c["candidate_tokens"])
        sp = m["speed"]
        assert sp["threads"] == 2
        assert sp["prompt_tokens"] == st["speed_prompt_tokens"] == 64
        assert sp["prompt_tokens_per_s"] > 0 and sp["generation_tokens_per_s"] > 0
        assert sp["generated_tokens"] > 0
    by = {m["label"]: m for m in r["models"]}
    assert by["F16"]["tensor_types"].get("F16", 0) > 0
    assert by["Q8_0"]["tensor_types"].get("Q8_0", 0) > 0
    assert by["Q8_0"]["sidecar"]["fallbacks"] == [] and by["Q8_0"]["sidecar"]["sha256"]
    assert by["F16"]["sidecar"] is None and by["F16"]["sidecar_missing_reason"]


def test_comparison_quality_order_on_tiny_model(compare_report: dict[str, Any]) -> None:
    """F16 tracks fp32 almost exactly; coarser quantization moves further away."""
    by = {m["label"]: m for m in compare_report["models"]}
    assert by["F16"]["kl_divergence"]["mean"] < 1e-4
    assert by["F16"]["top1_agreement"] > 0.98
    assert by["F16"]["kl_divergence"]["mean"] < by["Q8_0"]["kl_divergence"]["mean"] < by["Q4_0"]["kl_divergence"]["mean"]
    assert by["F16"]["size_bytes"] > by["Q8_0"]["size_bytes"] > by["Q4_0"]["size_bytes"]


def test_comparison_detects_a_different_model(
    tmp_path: Path, tiny_base: Path, eval_text: Path
) -> None:
    """A GGUF of another model (other random seed) must show up as far off: the metric can fail."""
    from lora2gguf.demo.tiny import build_tiny_qwen2

    other = build_tiny_qwen2(tmp_path / "other", seed=7)
    gguf = _convert(other, tmp_path / "other.gguf")
    out = tmp_path / "c.json"
    result = _cli(
        "compare", "--reference", str(tiny_base), "--gguf", str(gguf), "--eval-text", str(eval_text),
        "--max-tokens", "48", "--context", "48", "--prompts", PROMPTS, "--max-new-tokens", "4",
        "--threads", "2", "--out", str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    m = json.loads(out.read_text(encoding="utf-8"))["models"][0]
    assert m["kl_divergence"]["mean"] > 0.01
    assert m["top1_agreement"] < 0.9


def test_comparison_refuses_missing_gguf(tmp_path: Path, tiny_base: Path, eval_text: Path) -> None:
    out = tmp_path / "c.json"
    result = _cli(
        "compare", "--reference", str(tiny_base), "--gguf", str(tmp_path / "none.gguf"),
        "--eval-text", str(eval_text), "--prompts", PROMPTS, "--out", str(out),
    )
    assert result.returncode == 2 and "none.gguf" in result.stderr
    assert not out.exists()


def test_comparison_plots(compare_report: dict[str, Any], tmp_path: Path) -> None:
    report = tmp_path / "compare_models.json"
    report.write_text(json.dumps(compare_report, ensure_ascii=False), encoding="utf-8")
    result = _cli("plot", "comparison", "--compare", str(report), "--model", "tiny", "--out-dir", str(tmp_path / "plots"))
    assert result.returncode == 0, result.stderr[-3000:]
    for kind in ("size-vs-kl", "size-vs-perplexity", "speed"):
        png = tmp_path / "plots" / f"tiny-{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    broken = tmp_path / "broken.json"
    broken.write_text('{"models": [{"label": "F16"}]}', encoding="utf-8")
    result = _cli("plot", "comparison", "--compare", str(broken), "--out-dir", str(tmp_path / "p2"))
    assert result.returncode == 2 and "broken.json" in result.stderr


def test_comparison_reads_our_quantizer_sidecar(
    tmp_path: Path, tiny_base: Path, gguf_files: dict[str, Path], eval_text: Path
) -> None:
    """lora2gguf quantize's sidecar is carried and agrees with the tensor types read from the file."""
    out_gguf = tmp_path / "model-q4_km.gguf"
    result = _cli("quantize", str(gguf_files["F16"]), str(out_gguf), "Q4_K_M", "--threads", "2")
    if "invalid choice: 'quantize'" in result.stderr:
        pytest.skip("lora2gguf quantize is not available yet")
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "c.json"
    result = _cli(
        "compare", "--reference", str(tiny_base), "--gguf", str(out_gguf), "--eval-text", str(eval_text),
        "--max-tokens", "32", "--context", "32", "--prompts", PROMPTS, "--max-new-tokens", "2",
        "--threads", "2", "--speed-repeats", "1", "--out", str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    m = json.loads(out.read_text(encoding="utf-8"))["models"][0]
    assert m["label"] == "Q4_K_M"
    assert m["sidecar"]["type"] == "Q4_K_M"
    assert m["sidecar_matches_file"] is True
    # ffn_down rows of the tiny model are 320 long: not a multiple of 256, so K-quants fall back there.
    assert m["sidecar"]["fallback_count"] > 0
    assert m["sidecar"]["bits_per_weight"] == pytest.approx(m["bits_per_weight"], abs=1e-3)
