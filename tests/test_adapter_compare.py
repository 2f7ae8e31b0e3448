"""Several candidates on one base, for real: the tiny base's F16 GGUF served by llama-server with the
adapters of two LoRA runs (`lora2gguf adapter`), each request picking one adapter (llama-server's per-request
"lora" field), answers each merged model's greedy tokens, and the bare base's with both adapters off; and `lora2gguf adapter-compare` measures base + adapter equal to the merged GGUF.

Real peers only: two short LoRA trainings (conftest tiny_runs), peft's merge (`lora2gguf merge`), our
converter and quantizer, llama.cpp's llama-server (LORA2GGUF_LLAMA_BIN) and llama.cpp through
llama-cpp-python (adapter-compare).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import _root_logger_kept, refused

from lora2gguf.cli import main
from lora2gguf.deploy.server import RunningServer, ServeOptions
from lora2gguf.merge.merge import MergeOptions, merge_adapter

LLAMA_BIN = os.environ.get("LORA2GGUF_LLAMA_BIN")
LLAMA_SERVER = Path(LLAMA_BIN) / "llama-server" if LLAMA_BIN else None
needs_llama_server = pytest.mark.skipif(
    LLAMA_SERVER is None or not LLAMA_SERVER.is_file(),
    reason="set LORA2GGUF_LLAMA_BIN to a folder with llama.cpp's llama-server (make llama-tools)",
)

CTX = 256
NEW_TOKENS = 12
NAMES = ("tiny-a", "tiny-b")
# plain completions of the evaluation text's first lines, sent as token ids: the tiny runs (4 steps) change
# few argmax choices, so the test needs several prompts to find those where the three models part
PROMPT_CHARS, N_PROMPTS = 200, 20
# greedy, the generated token ids in the reply (llama-server: return_tokens -> "tokens")
GREEDY = {"temperature": 0.0, "top_k": 1, "n_predict": NEW_TOKENS, "return_tokens": True}


def _cli(*argv: Any) -> None:
    """`lora2gguf ARGV` in this process (module fixtures have no capsys: the log goes to the terminal)."""
    with _root_logger_kept():
        assert main([str(arg) for arg in argv]) == 0


@pytest.fixture(scope="module")
def candidates(
    tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, tiny_runs: dict[str, Path]
) -> dict[str, dict[str, Path]]:
    """Per run: its adapter GGUF (F16), its merged folder and the merged folder's F16 GGUF."""
    root = tmp_path_factory.mktemp("candidates")
    out: dict[str, dict[str, Path]] = {}
    for name in NAMES:
        run, folder = tiny_runs[name], root / name
        merged = folder / "merged"
        merge_adapter(MergeOptions(tiny_base, run, merged, device="cpu", verify_sequences=2, verify_seq_len=16))
        _cli("adapter", run, folder / "adapter.gguf", "--base", tiny_base)
        _cli("convert", merged, folder / "merged.gguf", "--no-progress")
        out[name] = {"adapter": folder / "adapter.gguf", "merged": merged, "merged_gguf": folder / "merged.gguf"}
    return out


def _served_ids(server: RunningServer, ids: list[int], **params: Any) -> list[int]:
    reply = server.post("/completion", {"prompt": ids, **GREEDY, **params})
    return [int(t) for t in reply["tokens"]]


@pytest.fixture(scope="module")
def prompts(tiny_base: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    from lora2gguf.demo.dataset import render_text

    tokenizer = AutoTokenizer.from_pretrained(tiny_base, local_files_only=True)
    text = render_text("eval")
    pieces = [text[i : i + PROMPT_CHARS] for i in range(0, PROMPT_CHARS * N_PROMPTS, PROMPT_CHARS)]
    return [[int(i) for i in tokenizer(piece)["input_ids"]] for piece in pieces]


def _serve(model: Path, loras: list[Path] | None = None) -> RunningServer:
    options = ServeOptions(model=model, loras=loras or [], ctx_size=CTX, threads=1, backend="llama-server")
    return RunningServer(options, startup_timeout=60, request_timeout=60)


@pytest.fixture(scope="module")
def merged_answers(
    candidates: dict[str, dict[str, Path]], f16_gguf: Path, prompts: list[list[int]]
) -> dict[str, list[list[int]]]:
    """Each merged F16 GGUF served alone (and the bare base): the greedy token ids of every prompt."""
    if LLAMA_SERVER is None or not LLAMA_SERVER.is_file():
        pytest.skip("set LORA2GGUF_LLAMA_BIN to a folder with llama.cpp's llama-server (make llama-tools)")
    answers = {}
    for name, model in [*((n, candidates[n]["merged_gguf"]) for n in NAMES), ("base", f16_gguf)]:
        with _serve(model) as server:
            answers[name] = [_served_ids(server, ids) for ids in prompts]
    return answers


def _parted(one: list[list[int]], other: list[list[int]]) -> int:
    return sum(1 for x, y in zip(one, other) if x != y)


@needs_llama_server
def test_one_server_switches_adapters_per_request(
    candidates: dict[str, dict[str, Path]], f16_gguf: Path, prompts: list[list[int]],
    merged_answers: dict[str, list[list[int]]],
) -> None:
    answers = merged_answers
    # the three models part on some prompts, or the switch would prove nothing
    assert _parted(answers["tiny-a"], answers["tiny-b"]) >= 1
    assert _parted(answers["tiny-a"], answers["base"]) >= 1 and _parted(answers["tiny-b"], answers["base"]) >= 1
    with _serve(f16_gguf, [candidates[name]["adapter"] for name in NAMES]) as server:
        listed = server.request("GET", "/lora-adapters").body
        assert [(a["id"], a["path"], a["scale"]) for a in listed] == [
            (i, str(candidates[name]["adapter"]), 1.0) for i, name in enumerate(NAMES)
        ]
        # in turn, twice: a request gets the adapter it picks, whatever the request before it picked
        for _ in range(2):
            for index, name in enumerate(NAMES):
                lora = [{"id": i, "scale": 1.0 if i == index else 0.0} for i in range(len(NAMES))]
                assert [_served_ids(server, ids, lora=lora) for ids in prompts] == answers[name], name
            off = [{"id": i, "scale": 0.0} for i in range(len(NAMES))]
            assert [_served_ids(server, ids, lora=off) for ids in prompts] == answers["base"]
        # per-request choice leaves the server's own scales (--lora: 1 each) as they were
        assert [a["scale"] for a in server.request("GET", "/lora-adapters").body] == [1.0, 1.0]


@pytest.fixture(scope="module")
def tiny_q4(
    tmp_path_factory: pytest.TempPathFactory, f16_gguf: Path, candidates: dict[str, dict[str, Path]]
) -> dict[str, Path]:
    """Q4_K_M of the tiny base and of tiny-a's merged F16 GGUF."""
    root = tmp_path_factory.mktemp("q4")
    sources = {"base": f16_gguf, "merged": candidates["tiny-a"]["merged_gguf"]}
    for role, source in sources.items():
        _cli("quantize", "--threads", "1", source, root / f"{role}-q4_k_m.gguf", "Q4_K_M")
    return {role: root / f"{role}-q4_k_m.gguf" for role in sources}


def _compare_argv(
    cand: dict[str, Path], merged: list[Path], base: list[Path], eval_text: Path, out: Path
) -> list[Any]:
    argv: list[Any] = ["adapter-compare", "--reference", cand["merged"], "--adapter", cand["adapter"]]
    for path in merged:
        argv += ["--merged-gguf", path]
    for path in base:
        argv += ["--base-gguf", path]
    return argv + ["--eval-text", eval_text, "--max-tokens", "128", "--context", "64", "--threads", "1", "--out", out]


def test_adapter_compare_on_the_tiny_model(
    tmp_path: Path, candidates: dict[str, dict[str, Path]], f16_gguf: Path, tiny_q4: dict[str, Path],
    eval_text: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    cand, out = candidates["tiny-a"], tmp_path / "adapter_compare.json"
    # given in another order than the merged files: paired by type, not by position
    argv = _compare_argv(cand, [cand["merged_gguf"], tiny_q4["merged"]], [tiny_q4["base"], f16_gguf], eval_text, out)
    _cli(*argv)
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["schema"] == "lora2gguf/adapter_compare/1" and "versions" in report and "device" in report
    rows = {row["label"]: row for row in report["rows"]}
    assert list(rows) == ["merged F16", "F16 base + adapter", "merged Q4_K_M", "Q4_K_M base + adapter"]
    direct = {d["type"]: d for d in report["direct"]}
    # F16: base + adapter in llama.cpp is the merged F16 model up to rounding
    assert direct["F16"]["kl_divergence"]["mean"] < 1e-4 and direct["F16"]["meets_target"] is True
    assert direct["F16"]["top1_agreement"] > 0.97
    assert "meets_target" not in direct["Q4_K_M"] and direct["Q4_K_M"]["kl_divergence"]["mean"] > 0
    for row in rows.values():
        assert row["positions"] == report["settings"]["positions_scored"] == 126
        assert row["size_bytes"] == sum(Path(f["file"]).stat().st_size for f in row["files"])
    assert rows["merged F16"]["kl_divergence"]["mean"] < 1e-3  # F16 vs the float32 reference
    adapter_bytes = cand["adapter"].stat().st_size
    sizes = {s["type"]: s for s in report["sizes"]}
    assert sizes["Q4_K_M"]["base_plus_adapter_bytes"] == tiny_q4["base"].stat().st_size + adapter_bytes
    assert sizes["F16"]["merged_bytes"] == cand["merged_gguf"].stat().st_size
    assert report["adapter"]["size_bytes"] == adapter_bytes and report["adapter"]["tensor_types"] == {"F16": 28}
    assert len(report["adapter"]["sha256"]) == 64 and report["reference"]["sha256"]["config.json"]


def test_adapter_compare_refuses_unpaired_types_and_non_adapters(
    tmp_path: Path, candidates: dict[str, dict[str, Path]], f16_gguf: Path, tiny_q4: dict[str, Path],
    eval_text: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    cand, out = candidates["tiny-a"], tmp_path / "out" / "adapter_compare.json"
    argv = _compare_argv(cand, [cand["merged_gguf"]], [tiny_q4["base"]], eval_text, out)
    message = refused(capsys, tmp_path, *argv)
    assert message == (
        f"{cand['merged_gguf']}: --merged-gguf of type F16 has no --base-gguf of that type (base types given: Q4_K_M)"
    )
    argv = _compare_argv(cand, [cand["merged_gguf"]], [f16_gguf, tiny_q4["base"]], eval_text, out)
    message = refused(capsys, tmp_path, *argv)
    assert message.startswith(f"{tiny_q4['base']}: --base-gguf of type Q4_K_M has no --merged-gguf")
    argv = _compare_argv({**cand, "adapter": f16_gguf}, [cand["merged_gguf"]], [f16_gguf], eval_text, out)
    message = refused(capsys, tmp_path, *argv)
    assert message.startswith(f"{f16_gguf}: general.type 'model'") and "not a llama.cpp LoRA adapter" in message
