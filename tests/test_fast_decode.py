"""The fast decoding path of `lora2gguf test` (lora2gguf/evaluate/decode.py): the option and its
checks, the report fields, and the static-cache logic against eager generate().

On CPU the static cache runs its steps eagerly (``capture=False``): the cache, positions and masks
are those the CUDA graphs replay, so token identity here checks the logic. The CUDA tests (graph
capture, the command on a GPU) skip without one.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from conftest import one_error_message, run_cli

from lora2gguf.errors import Lora2ggufError
from lora2gguf import settings
from lora2gguf.evaluate import decode
from lora2gguf.evaluate import test as inference
from lora2gguf.settings import Generation

torch = pytest.importorskip("torch")
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

PROMPTS = json.dumps(
    [
        {"id": "exam-anxiety", "text": "我下周就要期末考试了，每天晚上都紧张得睡不着，总觉得自己会考砸，该怎么办？"},
        {"id": "english", "text": "I have three deadlines this week and I feel like I'm drowning. How can I cope?"},
        {"id": "short", "text": "Hi"},
    ],
    ensure_ascii=False,
)
GENERATION = json.dumps({"max_new_tokens": 8, "do_sample": False, "seed": 0})
LENGTHS = (7, 19, 3, 30)  # prompt lengths of the random-id prompts: rows of different lengths
NEW = 20


# ----------------------------------------------------------------------------------------------
# the option: values, precedence, what auto picks
# ----------------------------------------------------------------------------------------------
def test_decode_option_values_and_precedence(tmp_path: Path) -> None:
    assert settings.resolve_decode(None, None) == "auto"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"evaluation": {"decode": "eager"}}), encoding="utf-8")
    assert settings.resolve_decode(str(config), None) == "eager"
    assert settings.resolve_decode(str(config), "cuda-graph") == "cuda-graph"  # the command line wins
    config.write_text(yaml.safe_dump({"evaluation": {"decode": "graph"}}), encoding="utf-8")
    with pytest.raises(Lora2ggufError, match=r"evaluation\.decode: expected one of auto, eager, cuda-graph, got 'graph'"):
        settings.resolve_decode(str(config), None)
    with pytest.raises(Lora2ggufError, match="--decode: expected one of"):
        settings.resolve_decode(None, "fast")


def test_auto_is_eager_off_cuda_and_for_sampling() -> None:
    on_cpu = decode.check_request("auto", "cpu", Generation())
    assert on_cpu is not None and on_cpu.path == decode.EAGER and "cpu" in on_cpu.reason
    sampling = decode.check_request("auto", "cuda", Generation(do_sample=True))
    assert sampling is not None and sampling.path == decode.EAGER and "do_sample" in sampling.reason
    penalty = decode.check_request("auto", "cuda:0", Generation(repetition_penalty=1.1))
    assert penalty is not None and penalty.path == decode.EAGER and "repetition_penalty" in penalty.reason
    assert decode.check_request("eager", "cuda", Generation()).path == decode.EAGER
    # auto on CUDA with greedy settings: the model decides.
    assert decode.check_request("auto", "cuda", Generation()) is None


def test_explicit_fast_path_refused_where_it_cannot_run() -> None:
    with pytest.raises(Lora2ggufError, match="cuda-graph: cannot run here: device cpu"):
        decode.check_request("cuda-graph", "cpu", Generation())
    with pytest.raises(Lora2ggufError, match="do_sample"):
        decode.check_request("cuda-graph", "cuda", Generation(do_sample=True))


def _fake_model(**config: Any) -> Any:
    base = {"model_type": "qwen2", "_attn_implementation": "sdpa", "layer_types": ["full_attention"] * 2}
    return SimpleNamespace(config=SimpleNamespace(**(base | config)))


def test_model_support_decides_auto_and_refuses_explicit() -> None:
    assert decode.model_problem(_fake_model()) is None
    assert decode.choose("auto", "cuda", Generation(), _fake_model()).path == decode.FAST
    for model, words in (
        (_fake_model(model_type="gemma2"), "model type 'gemma2'"),
        (_fake_model(_attn_implementation="flash_attention_2"), "attention implementation"),
        (_fake_model(layer_types=["sliding_attention", "full_attention"]), "sliding-window"),
    ):
        choice = decode.choose("auto", "cuda", Generation(), model)
        assert choice.path == decode.EAGER and words in choice.reason
        with pytest.raises(Lora2ggufError, match=words):
            decode.choose("cuda-graph", "cuda", Generation(), model)


def test_cli_refuses_cuda_graph_on_cpu_before_loading(
    tmp_path: Path, tiny_base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.json"
    status, log = run_cli(capsys, "test", "--model", tiny_base, "--prompts", PROMPTS, "--generation", GENERATION,
                          "--device", "cpu", "--decode", "cuda-graph", "--out", out)
    assert status == 2
    assert "cuda-graph: cannot run here: device cpu" in one_error_message(log)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_rejects_an_unknown_decode_value(tmp_path: Path, tiny_base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        run_cli(capsys, "test", "--model", tiny_base, "--prompts", PROMPTS, "--decode", "graph", "--out", tmp_path / "r.json")
    assert exc.value.code == 2
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# the report on CPU: which path ran and why, set-up apart from the cases
# ----------------------------------------------------------------------------------------------
def test_cpu_report_names_the_eager_path_and_its_setup(
    tmp_path: Path, tiny_base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.json"
    status, log = run_cli(capsys, "test", "--model", tiny_base, "--prompts", PROMPTS, "--generation", GENERATION,
                          "--device", "cpu", "--threads", "2", "--out", out)
    assert status == 0, log[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    record = report["settings"]["decode"]
    assert record["requested"] == "auto" and record["path"] == "eager"
    assert "cpu" in record["reason"]
    summary = report["summary"]
    assert summary["decode_path"] == "eager"
    assert 0 < summary["setup_seconds"] == record["setup_seconds"] < summary["generation_seconds"]
    after = summary["generation_seconds"] - summary["setup_seconds"]
    assert summary["overall_tokens_per_s_after_setup"] == pytest.approx(summary["generated_tokens"] / after)
    assert summary["peak_memory_kind"] == "process_rss"
    for case in report["cases"]:
        assert 0 < case["time_to_first_token_s"] <= case["latency_s"]


# ----------------------------------------------------------------------------------------------
# the static cache against eager generate(), on small random models with varied greedy tokens
# ----------------------------------------------------------------------------------------------
def _random_model(kind: str, dtype: Any, device: str) -> Any:
    """A small random model whose generate() stops at nothing (its config's default eos is unset)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    # A large initializer spreads the logits: greedy replies change token by token instead of
    # repeating one token, so a wrong position, mask or cache row changes them.
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=300, initializer_range=0.3, max_position_embeddings=512)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True))
    elif kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**shape, head_dim=16, tie_word_embeddings=True))
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape))
    model.generation_config.eos_token_id = None
    return model.to(device=device, dtype=dtype).eval()


def _prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 300, (n,), generator=generator).tolist() for n in LENGTHS]


def _eager(model: Any, prompts: list[list[int]], new: int) -> list[list[int]]:
    """What the eager path answers, one prompt at a time (test.py's own generate() call)."""
    config = inference._generation_config(Generation(max_new_tokens=new), [], 0)
    return [inference._generate(model, [ids], config, 0, 0)[0][0] for ids in prompts]


def _static(model: Any, prompts: list[list[int]], new: int, batched: bool, capture: bool, prefill: str = "rows") -> list[list[int]]:
    rows = len(prompts) if batched else 1
    with torch.inference_mode():
        decoder = decode.GraphDecoder(model, rows, decode.cache_positions(prompts, new), capture=capture, prefill=prefill)
        assert decoder.setup(prompts, new) == (1 if capture else 0)
        if batched:
            return [r.tokens for r in decoder.decode(prompts, new, set())]
        return [decoder.decode([ids], new, set())[0].tokens for ids in prompts]


@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen3"])
def test_static_cache_matches_eager_on_cpu(kind: str) -> None:
    model = _random_model(kind, torch.float32, "cpu")
    prompts = _prompts()
    eager = _eager(model, prompts, NEW)
    assert len({t for reply in eager for t in reply}) > 20, "replies too uniform to test anything"
    assert _static(model, prompts, NEW, batched=False, capture=False) == eager
    # Rows of 3 to 30 tokens in one cache: each row sees its own positions only (no padding).
    assert _static(model, prompts, NEW, batched=True, capture=False) == eager
    # Prefilled in one right-padded pass: the padding after a prompt changes nothing.
    assert _static(model, prompts, NEW, batched=True, capture=False, prefill="batch") == eager


def test_stop_tokens_end_a_row_and_times_are_per_token() -> None:
    model = _random_model("qwen2", torch.float32, "cpu")
    prompts = _prompts()
    eager = _eager(model, prompts, NEW)
    stop = eager[1][5]  # the sixth token of the second reply ends it (and any earlier reply using it)
    with torch.inference_mode():
        decoder = decode.GraphDecoder(model, len(prompts), decode.cache_positions(prompts, NEW), capture=False)
        decoder.setup(prompts, NEW)
        rows = decoder.decode(prompts, NEW, {stop})
    for reply, row in zip(eager, rows):
        cut = reply[: reply.index(stop) + 1] if stop in reply else reply
        assert row.tokens == cut and row.stopped == (stop in reply)
        assert len(row.times) == len(row.tokens) and row.times == sorted(row.times)


def test_fast_cases_report_fields_on_cpu(tiny_base: Path) -> None:
    """The report's cases from the static path (run eagerly here): the same fields as the eager
    path's, and what the set-up built."""
    from lora2gguf import hf

    model, tokenizer = hf.load(tiny_base, "cpu", torch.float32)
    prompts = settings.parse_prompts(json.loads(PROMPTS), "prompts")
    ids = [hf.chat_prompt_ids(tokenizer, p.text)[0] for p in prompts]
    work = inference._Batch(prompts, ids, Generation(max_new_tokens=6), hf.stop_token_ids(model, tokenizer), True)
    eager, _ = inference._eager_cases(model, tokenizer, work)
    cases, built = inference._fast_cases(model, tokenizer, work, capture=False)
    assert built["cache_rows"] == 3 and built["cache_positions"] % decode.CACHE_ALIGN == 0 and built["setup_seconds"] > 0
    for fast, slow in zip(cases, eager):
        assert set(fast) == set(slow)
        assert (fast["response"], fast["generated_tokens"], fast["stopped_by"]) == (
            slow["response"], slow["generated_tokens"], slow["stopped_by"])
        assert 0 < fast["time_to_first_token_s"] <= fast["latency_s"]
        assert fast["tokens_per_s"] == pytest.approx(fast["generated_tokens"] / fast["latency_s"])


# ----------------------------------------------------------------------------------------------
# CUDA: the captured graphs
# ----------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_cuda_graph_matches_eager_one_prompt_at_a_time(kind: str, dtype: str) -> None:
    model = _random_model(kind, getattr(torch, dtype), "cuda")
    prompts = _prompts()
    assert _static(model, prompts, NEW, batched=False, capture=True) == _eager(model, prompts, NEW)


@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_cuda_graph_batch_matches_eager(kind: str, dtype: str) -> None:
    model = _random_model(kind, getattr(torch, dtype), "cuda")
    prompts = _prompts()
    assert _static(model, prompts, NEW, batched=True, capture=True) == _eager(model, prompts, NEW)


@needs_cuda
@pytest.mark.parametrize("batch", ["off", "on"])
def test_cli_on_cuda_runs_the_graphs_and_answers_like_eager(
    tmp_path: Path, tiny_base: Path, capsys: pytest.CaptureFixture[str], batch: str
) -> None:
    reports = {}
    for path in ("eager", "auto"):
        out = tmp_path / f"{path}.json"
        status, log = run_cli(capsys, "test", "--model", tiny_base, "--prompts", PROMPTS, "--generation", GENERATION,
                              "--device", "cuda", "--dtype", "float32", "--batch", batch, "--decode", path, "--out", out)
        assert status == 0, log[-3000:]
        reports[path] = json.loads(out.read_text(encoding="utf-8"))
    fast = reports["auto"]
    assert fast["settings"]["decode"]["path"] == "cuda-graph" and fast["summary"]["decode_path"] == "cuda-graph"
    assert fast["settings"]["decode"]["graphs_captured"] >= 1
    assert fast["summary"]["peak_memory_kind"] == "cuda_max_memory_allocated" and fast["summary"]["peak_memory_mb"] > 0
    for a, b in zip(reports["eager"]["cases"], fast["cases"]):
        assert (a["response"], a["generated_tokens"]) == (b["response"], b["generated_tokens"])
