"""Tests for `lora2gguf merge` on the tiny Qwen2 (tied embeddings) with adapters built here by peft.

Adapters are made with get_peft_model and random lora_B (so the delta is non-zero) rather than by
training: seconds instead of minutes, and every case (rsLoRA, DoRA, resized vocabulary, broken
weights) can be produced exactly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lora2gguf.cli import main
from lora2gguf.errors import Lora2ggufError
from lora2gguf.formats.safetensors import read_header
from lora2gguf.merge import verify as merge_verify
from lora2gguf.merge.merge import MergeOptions, merge_adapter, parse_size
from lora2gguf.merge.verify import TOLERANCES, check_tolerance, compare_logits

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EVAL_TEXT = (
    "I have an exam next week and I cannot sleep. Every time I open my notes my heart races. "
    "My roommate says I should talk to someone at the counselling centre, but I feel embarrassed. "
) * 8


def make_adapter(
    base: Path,
    out: Path,
    *,
    seed: int = 0,
    r: int = 4,
    alpha: int = 8,
    targets: list[str] | None = None,
    use_rslora: bool = False,
    use_dora: bool = False,
    modules_to_save: list[str] | None = None,
    ensure_weight_tying: bool = False,
    add_tokens: list[str] | None = None,
    safe_serialization: bool = True,
    save_embedding_layers: bool | str = "auto",
    save_tokenizer: bool = True,
    scale: float = 0.05,
    mutate: Callable[[Any], None] | None = None,
) -> Path:
    """Save a peft LoRA adapter for ``base`` with non-zero random weights (and the tokenizer, like LLaMA-Factory)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    if add_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": add_tokens}, replace_extra_special_tokens=False)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets or ALL_LINEAR,
        use_rslora=use_rslora,
        use_dora=use_dora,
        modules_to_save=modules_to_save,
        lora_dropout=0.0,
        **({"ensure_weight_tying": True} if ensure_weight_tying else {}),
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            # peft starts one factor at zero (lora_B; for embeddings lora_embedding_A): randomise it.
            if "lora_B" in name or "lora_embedding_B" in name:
                param.normal_(0.0, scale)
            elif "lora_embedding_A" in name:
                param.normal_(0.0, 1.0)
            elif "lora_magnitude_vector" in name:
                param.mul_(1.0 + 0.1 * torch.randn_like(param))
            elif "modules_to_save" in name:
                param.add_(scale * torch.randn_like(param))
        if mutate is not None:
            mutate(peft_model)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out, safe_serialization=safe_serialization, save_embedding_layers=save_embedding_layers)
    if save_tokenizer:
        tokenizer.save_pretrained(out)
    return out


def logits_of(model: Any, ids: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def peft_reference_logits(base: Path, adapter: Path, ids: Any, rows: int | None = None) -> Any:
    """Unmerged base+adapter logits, computed independently of lora2gguf."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, local_files_only=True)
    if rows is not None:
        model.resize_token_embeddings(rows, mean_resizing=False)
    return logits_of(PeftModel.from_pretrained(model, adapter).eval(), ids)


def merged_logits(out: Path, ids: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return logits_of(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True), ids)


def safetensors_names(folder: Path) -> list[str]:
    names: list[str] = []
    for shard in sorted(folder.glob("*.safetensors")):
        names += [entry.name for entry in read_header(shard)]
    return names


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(EVAL_TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def plain_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    return make_adapter(tiny_base, tmp_path_factory.mktemp("adapters") / "plain")


@pytest.fixture(scope="module")
def plain_merge(
    tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, plain_adapter: Path, eval_text: Path
) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("merged")
    out = root / "tiny-merged"
    options = MergeOptions(
        tiny_base, plain_adapter, out, report=root / "merge_report.json", eval_text=eval_text, device="cpu"
    )
    report = merge_adapter(options)
    return out, report


def assert_nothing_written(out: Path, report: Path | None = None) -> None:
    assert not out.exists(), f"{out} must not exist after a failed merge"
    leftovers = (
        [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] if out.parent.exists() else []
    )
    assert not leftovers, f"temporary folders left behind: {leftovers}"
    if report is not None:
        assert not report.exists()


# --- the ordinary merge --------------------------------------------------------------------------------


def test_plain_merge_writes_verified_folder(plain_merge: tuple[Path, dict], tiny_base: Path) -> None:
    out, report = plain_merge
    for name in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (out / name).is_file(), name
    ver = report["verification"]
    assert ver["passed"] and ver["finite"]
    assert ver["top1_agreement"] == 1.0
    assert ver["max_abs_logit_delta"] < 1e-3
    assert ver["mean_kl"] < 1e-8
    assert ver["batch"]["kind"].startswith("evaluation text")
    assert report["settings"]["dtype"] == "float32" and report["settings"]["device"] == "cpu"
    assert report["adapter"]["lora_tensors"] == 2 * 7 * 2  # 2 layers x 7 modules x (A, B)
    # The merge changed the model (the adapter is not a no-op) ...
    base_w = json.loads((tiny_base / "config.json").read_text())
    assert base_w["tie_word_embeddings"] is True
    # ... tied embeddings stay tied: no lm_head tensor written.
    assert not any(n.startswith("lm_head") for n in safetensors_names(out))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert report["output"]["tie_word_embeddings"]["output_tied"] is True
    # Provenance: versions, device, input hashes, memory and timing.
    assert report["versions"]["peft"] and report["versions"]["torch"]
    assert any(p.endswith("adapter_model.safetensors") for p in report["input_sha256"]["adapter"])
    assert any(p.endswith("adapter_config.json") for p in report["input_sha256"]["adapter"])
    assert any(p.endswith("model.safetensors") for p in report["input_sha256"]["base"])
    assert report["memory"]["peak_rss_mb"] > 0 and report["memory"]["cuda_peak_allocated_mb"] is None
    assert report["timing_s"]["total"] > 0
    assert report["output"]["sha256"]["model.safetensors"]
    mask = os.umask(0)
    os.umask(mask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask  # not the writer's 0600


def test_merged_weights_differ_from_base_and_match_peft(
    plain_merge: tuple[Path, dict], tiny_base: Path, plain_adapter: Path
) -> None:
    import torch

    out, _ = plain_merge
    ids = torch.arange(3, 67).reshape(2, 32)
    ref = peft_reference_logits(tiny_base, plain_adapter, ids)
    got = merged_logits(out, ids)
    base_only = merged_logits(tiny_base, ids)
    assert (ref - base_only).abs().max() > 1e-2, "test adapter must change the model"
    assert (ref - got).abs().max() < 1e-4


def test_tokenizer_and_chat_template_kept(plain_merge: tuple[Path, dict], plain_adapter: Path) -> None:
    from transformers import AutoTokenizer

    out, report = plain_merge
    # Copied byte for byte from the run folder (LLaMA-Factory puts the tokenizer there).
    assert report["output"]["tokenizer_source"] == str(plain_adapter)
    for name in report["output"]["tokenizer_files"]:
        assert (out / name).read_bytes() == (plain_adapter / name).read_bytes()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert report["output"]["chat_template"] is True
    gen = json.loads((out / "generation_config.json").read_text())
    eos = gen["eos_token_id"]
    assert tok.eos_token_id in (eos if isinstance(eos, list) else [eos])


def test_tokenizer_falls_back_to_base(tmp_path: Path, tiny_base: Path) -> None:
    adapter = make_adapter(tiny_base, tmp_path / "ad", save_tokenizer=False, targets=["q_proj"])
    report = merge_adapter(MergeOptions(tiny_base, adapter, tmp_path / "out"))
    assert report["output"]["tokenizer_source"] == str(tiny_base)
    assert report["verification"]["batch"]["kind"].startswith("pseudo-random")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tiny_base / "tokenizer.json").read_bytes()


def test_chat_template_from_base_when_run_tokenizer_lacks_one(tmp_path: Path, tiny_base: Path) -> None:
    from transformers import AutoTokenizer

    adapter = make_adapter(tiny_base, tmp_path / "ad", targets=["q_proj"])
    (adapter / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((adapter / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (adapter / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert AutoTokenizer.from_pretrained(adapter).chat_template is None
    report = merge_adapter(MergeOptions(tiny_base, adapter, tmp_path / "out"))
    assert (
        AutoTokenizer.from_pretrained(tmp_path / "out").chat_template
        == AutoTokenizer.from_pretrained(tiny_base).chat_template
    )
    assert report["output"]["chat_template"] is True and any("chat template" in w for w in report["warnings"])


def test_merge_is_byte_identical_across_runs(
    tmp_path: Path, plain_merge: tuple[Path, dict], tiny_base: Path, plain_adapter: Path, eval_text: Path
) -> None:
    out, first = plain_merge
    second = merge_adapter(MergeOptions(tiny_base, plain_adapter, tmp_path / "again-merged", eval_text=eval_text))
    assert second["output"]["sha256"] == first["output"]["sha256"]
    meta = first["output"]["weights"]["metadata"]["model.safetensors"]
    assert meta == {"format": "pt"}


def test_sharding_writes_index(tmp_path: Path, tiny_base: Path, plain_adapter: Path) -> None:
    out = tmp_path / "sharded"
    report = merge_adapter(MergeOptions(tiny_base, plain_adapter, out, shard_size="1MB"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and report["output"]["weights"]["sharded"]
    assert all((out / s).is_file() for s in shards)
    assert report["verification"]["top1_agreement"] == 1.0  # the sharded folder reloaded and verified
    # A sharded folder is also a valid base (weights found through the index, shapes read from every shard).
    again = merge_adapter(MergeOptions(out, plain_adapter, tmp_path / "from-sharded", shard_size="2GB"))
    assert any(p.endswith("model.safetensors.index.json") for p in again["input_sha256"]["base"])
    assert again["base_check"]["name_matches"] is False and again["verification"]["passed"]


def test_parse_size() -> None:
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500 MB") == 5 * 10**8
    assert parse_size("1GiB") == 2**30
    for bad in ("two GB", "-1GB", "0"):
        with pytest.raises(Lora2ggufError, match="shard size"):
            parse_size(bad)


# --- adapter trained against another base ------------------------------------------------------------


def test_different_recorded_base_name_warns(
    tmp_path: Path, tiny_base: Path, plain_adapter: Path, caplog: pytest.LogCaptureFixture
) -> None:
    adapter = tmp_path / "renamed"
    shutil.copytree(plain_adapter, adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "Qwen/Qwen2.5-0.5B-Instruct"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING, logger="lora2gguf"):
        report = merge_adapter(MergeOptions(tiny_base, adapter, tmp_path / "out"))
    assert "Qwen/Qwen2.5-0.5B-Instruct" in caplog.text
    assert report["base_check"]["name_matches"] is False
    assert report["warnings"] and report["verification"]["passed"]


def test_mismatched_shapes_fail_naming_tensor(tmp_path: Path, tiny_base: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    other = tmp_path / "other-base"
    cfg = json.loads((tiny_base / "config.json").read_text())
    torch.manual_seed(1)
    Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=cfg["vocab_size"], hidden_size=128, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        )  # fmt: skip
    ).save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_base / name, other / name)
    adapter = make_adapter(other, tmp_path / "ad-other", targets=["q_proj", "down_proj"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tiny_base)  # same name, different shapes: the shape check must catch it
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    with pytest.raises(Lora2ggufError) as err:
        merge_adapter(MergeOptions(tiny_base, adapter, out, report=tmp_path / "r.json"))
    msg = str(err.value)
    assert "adapter_model.safetensors" in msg and "lora_" in msg and "shape" in msg
    assert "model.layers.0.mlp.down_proj.weight" in msg or "model.layers.0.self_attn.q_proj.weight" in msg
    assert_nothing_written(out, tmp_path / "r.json")


# --- modules_to_save and a resized vocabulary --------------------------------------------------------


def test_modules_to_save_with_added_tokens(tmp_path: Path, tiny_base: Path, eval_text: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    added = ["<|user_tag|>", "<|counsel_tag|>", "<|extra_a|>", "<|extra_b|>", "<|extra_c|>"]
    adapter = make_adapter(
        tiny_base, tmp_path / "ad", modules_to_save=["embed_tokens", "lm_head"], add_tokens=added, seed=3
    )
    base_rows = json.loads((tiny_base / "config.json").read_text())["vocab_size"]
    out = tmp_path / "out"
    report = merge_adapter(MergeOptions(tiny_base, adapter, out, eval_text=eval_text))
    tok = AutoTokenizer.from_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    assert len(tok) == base_rows + len(added) == cfg["vocab_size"] == report["output"]["vocab_rows"]
    assert report["output"]["tokenizer_len"] == len(tok)
    assert sorted(report["adapter"]["modules_to_save"]) == ["embed_tokens", "lm_head"]
    assert report["adapter"]["full_weight_tensors"] == ["lm_head.weight", "model.embed_tokens.weight"]
    # Two separately trained copies of a tied matrix: the merge must untie them, not drop one.
    assert report["output"]["tie_word_embeddings"]["output_tied"] is False
    assert cfg["tie_word_embeddings"] is False and "lm_head.weight" in safetensors_names(out)
    ids = torch.tensor([[tok.convert_tokens_to_ids(t) for t in added] + list(range(10, 40))])
    ref = peft_reference_logits(tiny_base, adapter, ids, rows=len(tok))
    assert (ref - merged_logits(out, ids)).abs().max() < 1e-4


def test_modules_to_save_with_weight_tying_stays_tied(tmp_path: Path, tiny_base: Path, eval_text: Path) -> None:
    """peft's ensure_weight_tying trains one shared copy: the merged model must stay tied."""
    import torch

    adapter = make_adapter(
        tiny_base, tmp_path / "ad", modules_to_save=["embed_tokens", "lm_head"], ensure_weight_tying=True, seed=4
    )
    out = tmp_path / "out"
    report = merge_adapter(MergeOptions(tiny_base, adapter, out, eval_text=eval_text))
    assert report["output"]["tie_word_embeddings"]["output_tied"] is True
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in safetensors_names(out)
    ids = torch.arange(30, 94).reshape(2, 32)
    ref = peft_reference_logits(tiny_base, adapter, ids)
    assert (ref - merged_logits(out, ids)).abs().max() < 1e-4
    assert (ref - merged_logits(tiny_base, ids)).abs().max() > 1e-2


def test_adapter_with_saved_embedding_layers(tmp_path: Path, tiny_base: Path) -> None:
    """save_embedding_layers=True stores the (unchanged) embedding matrices too: still a valid adapter."""
    adapter = make_adapter(tiny_base, tmp_path / "ad", targets=["q_proj"], save_embedding_layers=True)
    report = merge_adapter(MergeOptions(tiny_base, adapter, tmp_path / "out"))
    assert "model.embed_tokens.weight" in report["adapter"]["full_weight_tensors"]
    assert report["verification"]["top1_agreement"] == 1.0


def test_added_tokens_without_trained_embeddings_fail(tmp_path: Path, tiny_base: Path) -> None:
    # The run's tokenizer has tokens the adapter has no embedding rows for (LLaMA-Factory #4195).
    adapter = make_adapter(tiny_base, tmp_path / "ad", targets=["q_proj"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter)
    tok.add_special_tokens(
        {"additional_special_tokens": ["<|new_a|>", "<|new_b|>"]}, replace_extra_special_tokens=False
    )
    tok.save_pretrained(adapter)
    out = tmp_path / "out"
    with pytest.raises(Lora2ggufError, match="tokenizer has .* tokens but the merged model only"):
        merge_adapter(MergeOptions(tiny_base, adapter, out))
    assert_nothing_written(out)


def test_lora_on_tied_embedding_keeps_trained_function(tmp_path: Path, tiny_base: Path, eval_text: Path) -> None:
    """LoRA on embed_tokens of a tied model: merged in place it would also change lm_head (peft #2244)."""
    import torch

    adapter = make_adapter(tiny_base, tmp_path / "ad", targets=["embed_tokens", "q_proj"], seed=11)
    out = tmp_path / "out"
    report = merge_adapter(MergeOptions(tiny_base, adapter, out, eval_text=eval_text))
    assert report["output"]["tie_word_embeddings"]["output_tied"] is False
    assert "lm_head.weight" in safetensors_names(out)
    ids = torch.arange(20, 84).reshape(2, 32)
    ref = peft_reference_logits(tiny_base, adapter, ids)
    assert (ref - merged_logits(out, ids)).abs().max() < 1e-4


# --- rsLoRA and DoRA ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["rslora", "dora"])
def test_rslora_and_dora_merge_match(tmp_path: Path, tiny_base: Path, eval_text: Path, variant: str) -> None:
    import torch

    adapter = make_adapter(
        tiny_base, tmp_path / "ad", r=8, alpha=16, use_rslora=variant == "rslora", use_dora=variant == "dora", seed=7
    )
    out = tmp_path / "out"
    report = merge_adapter(MergeOptions(tiny_base, adapter, out, eval_text=eval_text))
    assert report["adapter"]["use_rslora" if variant == "rslora" else "use_dora"] is True
    assert report["verification"]["top1_agreement"] == 1.0
    ids = torch.arange(5, 69).reshape(2, 32)
    ref = peft_reference_logits(tiny_base, adapter, ids)
    assert (ref - merged_logits(out, ids)).abs().max() < 1e-4
    assert (ref - merged_logits(tiny_base, ids)).abs().max() > 1e-2


def test_rslora_scaling_is_applied(tmp_path: Path, tiny_base: Path) -> None:
    """Same weights read as plain LoRA vs rsLoRA give different merged models (alpha/r vs alpha/sqrt(r))."""
    from safetensors.torch import load_file

    plain = make_adapter(tiny_base, tmp_path / "plain", r=16, alpha=16, targets=["q_proj"], seed=5)
    rs = tmp_path / "rs"
    shutil.copytree(plain, rs)
    cfg = json.loads((rs / "adapter_config.json").read_text())
    cfg["use_rslora"] = True
    (rs / "adapter_config.json").write_text(json.dumps(cfg))
    merge_adapter(MergeOptions(tiny_base, plain, tmp_path / "m-plain"))
    merge_adapter(MergeOptions(tiny_base, rs, tmp_path / "m-rs"))
    base_q = load_file(tiny_base / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    d_plain = load_file(tmp_path / "m-plain" / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"] - base_q
    d_rs = load_file(tmp_path / "m-rs" / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"] - base_q
    # scaling 16/16 = 1 vs 16/sqrt(16) = 4
    assert abs(float(d_rs.abs().sum() / d_plain.abs().sum()) - 4.0) < 1e-3


# --- broken merges and broken inputs -----------------------------------------------------------------


def _nan_in_lora_b(peft_model: Any) -> None:
    for name, param in peft_model.named_parameters():
        if "layers.1.mlp.down_proj.lora_B" in name:
            param.data[0, 0] = float("nan")


def _inf_in_embedding_lora(peft_model: Any) -> None:
    for name, param in peft_model.named_parameters():
        if "lora_embedding_A" in name:
            param.data[:, -1] = float("inf")


def _fp16_overflow_in_unused_row(peft_model: Any) -> None:
    # Large but finite LoRA factors in the row of a token the verification batch never uses: the
    # unmerged forward stays finite, only the merged float16 embedding row overflows (|x| > 65504).
    for name, param in peft_model.named_parameters():
        if "lora_embedding_A" in name:
            param.data[:, -1] = 300.0
        elif "lora_embedding_B" in name:
            param.data[:] = 300.0


@pytest.mark.parametrize(
    ("targets", "mutate", "dtype", "message"),
    [
        (["down_proj"], _nan_in_lora_b, "float32", r"layers\.1\.mlp\.down_proj\.lora_B.*NaN/Inf"),
        (["embed_tokens"], _inf_in_embedding_lora, "float32", r"lora_embedding_A.*NaN/Inf"),
        (["embed_tokens"], _fp16_overflow_in_unused_row, "float16", r"the merge produced \d+ NaN/Inf values"),
    ],
    ids=["nan-lora-b", "inf-embedding", "fp16-overflow"],
)
def test_non_finite_merge_fails_and_writes_nothing(
    tmp_path: Path,
    tiny_base: Path,
    eval_text: Path,
    targets: list[str],
    mutate: Callable,
    dtype: str,
    message: str,
) -> None:
    adapter = make_adapter(tiny_base, tmp_path / "ad", targets=targets, mutate=mutate)
    out, report = tmp_path / "models" / "bad-merged", tmp_path / "results" / "merge_report.json"
    with pytest.raises(Lora2ggufError, match=message) as err:
        merge_adapter(MergeOptions(tiny_base, adapter, out, report=report, eval_text=eval_text, dtype=dtype))
    assert "adapter_model.safetensors" in str(err.value)
    assert_nothing_written(out, report)


def test_pickle_adapter_refused_unless_allowed(tmp_path: Path, tiny_base: Path) -> None:
    adapter = make_adapter(tiny_base, tmp_path / "ad", targets=["q_proj"], safe_serialization=False)
    assert (adapter / "adapter_model.bin").is_file() and not (adapter / "adapter_model.safetensors").exists()
    out = tmp_path / "out"
    with pytest.raises(Lora2ggufError, match=r"adapter_model\.bin.*pickle"):
        merge_adapter(MergeOptions(tiny_base, adapter, out))
    assert_nothing_written(out)
    report = merge_adapter(MergeOptions(tiny_base, adapter, out, allow_pickle=True))
    assert report["adapter"]["weights_format"] == "pickle" and report["settings"]["allow_pickle"] is True


def test_pickle_base_refused(tmp_path: Path, tiny_base: Path, plain_adapter: Path) -> None:
    import torch
    from safetensors.torch import load_file

    base = tmp_path / "pickle-base"
    shutil.copytree(tiny_base, base)
    torch.save(load_file(base / "model.safetensors"), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    with pytest.raises(Lora2ggufError, match=r"pytorch_model\.bin.*refused"):
        merge_adapter(MergeOptions(base, plain_adapter, tmp_path / "out"))
    assert_nothing_written(tmp_path / "out")
    report = merge_adapter(MergeOptions(base, plain_adapter, tmp_path / "out", allow_pickle=True))
    assert report["base_check"]["weights_format"] == "pickle" and report["verification"]["passed"]
    assert (tmp_path / "out" / "model.safetensors").is_file()  # the output is always safetensors


def test_missing_adapter_config(tmp_path: Path, tiny_base: Path, plain_adapter: Path) -> None:
    adapter = tmp_path / "ad"
    shutil.copytree(plain_adapter, adapter)
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(Lora2ggufError, match=r"adapter_config\.json: file not found"):
        merge_adapter(MergeOptions(tiny_base, adapter, tmp_path / "out"))
    assert_nothing_written(tmp_path / "out")


def test_truncated_adapter_weights(tmp_path: Path, tiny_base: Path, plain_adapter: Path) -> None:
    adapter = tmp_path / "ad"
    shutil.copytree(plain_adapter, adapter)
    weights = adapter / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(Lora2ggufError, match=r"adapter_model\.safetensors: truncated") as err:
        merge_adapter(MergeOptions(tiny_base, adapter, tmp_path / "out"))
    assert str(weights) in str(err.value)
    assert_nothing_written(tmp_path / "out")
    weights.write_bytes(data[:5])  # not even a header
    with pytest.raises(Lora2ggufError, match=r"adapter_model\.safetensors: truncated"):
        merge_adapter(MergeOptions(tiny_base, adapter, tmp_path / "out"))


def test_tolerance_violation_fails(
    tmp_path: Path, tiny_base: Path, plain_adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A verification failure raises and leaves nothing, with the measured figures in the message."""
    strict = merge_verify.Tolerance(max_abs_logit_delta=0.0, mean_kl=0.0, min_top1_agreement=1.0)
    monkeypatch.setitem(merge_verify.TOLERANCES, "float32", strict)
    # Any rounding difference at all now fails: fp32 merge differs from the unmerged sum in the last bits.
    out = tmp_path / "out"
    with pytest.raises(Lora2ggufError, match=r"disagrees with base\+adapter .*max \|Δlogit\|"):
        merge_adapter(MergeOptions(tiny_base, plain_adapter, out))
    assert_nothing_written(out)


def test_existing_output_replaced_only_on_success(tmp_path: Path, tiny_base: Path, plain_adapter: Path) -> None:
    out = tmp_path / "m"
    out.mkdir()
    # a previous merge output (only files a merge writes): a failed merge keeps it, a good one replaces it
    (out / "config.json").write_text("old")
    (out / "model-00001-of-00002.safetensors").write_text("stale")
    adapter = tmp_path / "ad"
    shutil.copytree(plain_adapter, adapter)
    (adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(Lora2ggufError, match=r"adapter_config\.json: not valid JSON"):
        merge_adapter(MergeOptions(tiny_base, adapter, out))
    assert (out / "config.json").read_text() == "old"
    merge_adapter(MergeOptions(tiny_base, plain_adapter, out))
    assert (out / "config.json").read_text() != "old" and (out / "model.safetensors").is_file()
    assert not (out / "model-00001-of-00002.safetensors").exists()


# --- the command line --------------------------------------------------------------------------------


def test_cli_merge_and_error_exit(tmp_path: Path, tiny_base: Path, plain_adapter: Path, eval_text: Path) -> None:
    out, report = tmp_path / "models" / "x-merged", tmp_path / "results" / "x" / "merge_report.json"
    rc = main(
        ["merge", "--base", str(tiny_base), "--adapter", str(plain_adapter), "--out", str(out),
         "--dtype", "float32", "--device", "cpu", "--shard-size", "2GB", "--report", str(report),
         "--eval-text", str(eval_text)]
    )  # fmt: skip
    assert rc == 0 and (out / "model.safetensors").is_file()
    data = json.loads(report.read_text())
    assert data["verification"]["passed"] and data["schema"] == "lora2gguf/merge_report/1"
    rc = main(["merge", "--base", str(tiny_base), "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert rc == 2 and not (tmp_path / "o").exists()


def test_cli_module_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, argparse, lora2gguf.commands.merge as m; p = argparse.ArgumentParser(); m.add_arguments(p); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_half_precision_merge(tmp_path: Path, tiny_base: Path, plain_adapter: Path, eval_text: Path) -> None:
    import torch
    from safetensors import safe_open

    options = MergeOptions(tiny_base, plain_adapter, tmp_path / "bf16", dtype="bfloat16", eval_text=eval_text)
    report = merge_adapter(options)
    assert report["settings"]["dtype"] == "bfloat16" and report["verification"]["passed"]
    assert report["verification"]["tolerance"]["max_abs_logit_delta"] > 1e-2
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as handle:
        assert handle.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16


def test_trained_demo_run_merges(tmp_path: Path, tiny_base: Path, tiny_run: Path, eval_text: Path) -> None:
    """A real (short) peft training in LLaMA-Factory's run layout, as the workflow sees it."""
    out, report_path = tmp_path / "models" / "tiny-merged", tmp_path / "results" / "merge_report.json"
    report = merge_adapter(MergeOptions(tiny_base, tiny_run, out, report=report_path, eval_text=eval_text))
    assert json.loads(report_path.read_text()) == report
    assert report["verification"]["top1_agreement"] == 1.0
    tolerance = report["verification"]["tolerance"]
    assert report["verification"]["max_abs_logit_delta"] <= tolerance["effective_max_abs_logit_delta"]
    assert report["output"]["tokenizer_source"] == str(tiny_run)
    assert report["base_check"]["shapes_match"] is True


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_merge(tmp_path: Path, tiny_base: Path, plain_adapter: Path, eval_text: Path, dtype: str) -> None:
    from safetensors.torch import load_file

    cpu = merge_adapter(
        MergeOptions(tiny_base, plain_adapter, tmp_path / "cpu", device="cpu", dtype=dtype, eval_text=eval_text)
    )
    gpu = merge_adapter(
        MergeOptions(tiny_base, plain_adapter, tmp_path / "gpu", device="auto", dtype=dtype, eval_text=eval_text)
    )
    assert gpu["settings"]["device"] == "cuda" and gpu["verification"]["passed"]
    assert gpu["memory"]["cuda_peak_allocated_mb"] > 0 and cpu["memory"]["cuda_peak_allocated_mb"] is None
    assert gpu["device_info"]["gpu"]
    a, b = load_file(tmp_path / "cpu" / "model.safetensors"), load_file(tmp_path / "gpu" / "model.safetensors")
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < (1e-5 if dtype == "float32" else 2e-2)


def test_compare_logits_metrics() -> None:
    import math

    import torch

    torch.manual_seed(0)
    ref = torch.randn(2, 5, 11)
    same = compare_logits(ref, ref.clone())
    assert same["max_abs_logit_delta"] == 0 and same["mean_kl"] == 0 and same["top1_agreement"] == 1.0
    assert check_tolerance(same, "float32") == []
    # A constant shift changes no probability: KL 0, top-1 kept, but |Δlogit| sees it.
    shifted = compare_logits(ref, ref + 0.5)
    assert abs(shifted["max_abs_logit_delta"] - 0.5) < 1e-6 and shifted["mean_kl"] < 1e-12
    assert any("Δlogit" in p for p in check_tolerance(shifted, "float32"))
    assert check_tolerance(shifted, "bfloat16") == []
    # Swapping the top two logits at every position: top-1 agreement 0, KL as computed by hand.
    other = ref.clone().reshape(-1, 11)
    top2 = other.topk(2, dim=-1).indices
    rows = torch.arange(other.shape[0])
    a, b = other[rows, top2[:, 0]].clone(), other[rows, top2[:, 1]].clone()
    other[rows, top2[:, 0]], other[rows, top2[:, 1]] = b, a
    flipped = compare_logits(ref, other.reshape(ref.shape))
    assert flipped["top1_agreement"] == 0.0
    p = torch.softmax(ref.reshape(-1, 11).double(), -1)
    q = torch.softmax(other.double(), -1)
    assert math.isclose(flipped["mean_kl"], float((p * (p / q).log()).sum(-1).mean()), rel_tol=1e-9)
    assert any("top-1" in msg for msg in check_tolerance(flipped, "bfloat16"))
    bad = ref.clone()
    bad[0, 0, 0] = float("nan")
    nan = compare_logits(ref, bad)
    assert nan["finite"] is False and check_tolerance(nan, "float32")
    assert TOLERANCES["float32"].logit_bound(1000.0) == pytest.approx(0.1)


def test_killed_merge_leaves_no_output(tmp_path: Path, tiny_base: Path, plain_adapter: Path) -> None:
    """SIGKILL while the output is being written: the final folder never appears half-written."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "models" / "k-merged"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora2gguf.cli", "merge", "--base", str(tiny_base), "--adapter", str(plain_adapter),
         "--out", str(out), "--device", "cpu"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.parent.is_dir() and any(p.name.startswith(".k-merged.tmp-") for p in out.parent.iterdir()):
                break
            time.sleep(0.005)
        else:
            pytest.fail("the merge finished or stalled before its temporary folder could be observed")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not out.exists()
