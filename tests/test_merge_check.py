"""The merge's verification catches what it claims to: each failure is planted and must be caught.

Two levels. The per-tensor check (lora2gguf.merge.algebra) is run on a copy of a good merge whose
weights file was altered -- a module scaled wrongly, transposed, left out or missing, a tensor the
adapter does not touch changed, the tied head moved, a NaN. And whole merges are run with peft's own
merge altered, to show `lora2gguf merge` refuses them and writes nothing.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lora2gguf.errors import Lora2ggufError
from lora2gguf.merge import algebra
from lora2gguf.merge.inputs import find_adapter_weights, find_base_weights, read_adapter_config
from lora2gguf.merge.merge import MergeOptions, merge_adapter
from test_merge import assert_nothing_written, make_adapter

Q = "model.layers.0.self_attn.q_proj.weight"
NORM = "model.layers.1.input_layernorm.weight"
K_UNTOUCHED = "model.layers.1.self_attn.k_proj.weight"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    # k_proj of layer 1 stays untouched: layers_to_transform would be simpler, but q/v on every layer
    # plus the MLP matches what LLaMA-Factory runs train.
    return make_adapter(tiny_base, tmp_path_factory.mktemp("check") / "ad", targets=["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, adapter: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("check") / "tiny-merged"
    report = merge_adapter(MergeOptions(tiny_base, adapter, out, device="cpu"))
    return out, report


def _check(folder: Path, base: Path, adapter: Path, dtype: str = "float32", tied: bool = True) -> dict[str, Any]:
    expected = algebra.expectations(
        find_base_weights(base, False), find_adapter_weights(adapter, False), read_adapter_config(adapter), tied
    )
    return algebra.check_merged_weights(folder, expected, dtype)


def _planted(merged: tuple[Path, dict], tmp_path: Path, plant: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of the good merge whose weights file went through ``plant`` (a dict of torch tensors)."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "planted"
    shutil.copytree(merged[0], folder)
    tensors = load_file(folder / "model.safetensors")
    plant(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _update(base: Path, written: dict[str, Any], name: str = Q) -> Any:
    from safetensors.torch import load_file

    return written[name] - load_file(base / "model.safetensors")[name]


def test_good_merge_passes_and_reports(merged: tuple[Path, dict], tiny_base: Path, adapter: Path) -> None:
    figures = merged[1]["verification"]["tensors"]
    assert figures["passed"] and figures == _check(merged[0], tiny_base, adapter)
    assert figures["tensors"]["lora"] == 2 * 3 and figures["tensors"]["copy"] == 0
    assert figures["tensors"]["unchanged"] > 0 and figures["elements"] > 0
    assert 0 <= figures["max_error_to_bound"] <= 1.0
    assert set(merged[1]["verification"]["config_keys_changed"]) <= {"dtype", "transformers_version"}


def test_wrong_scale_is_caught(merged: tuple[Path, dict], tmp_path: Path, tiny_base: Path, adapter: Path) -> None:
    def double(t: dict[str, Any]) -> None:
        t[Q] = t[Q] + _update(tiny_base, t)

    with pytest.raises(Lora2ggufError, match=rf"'{Q}' is not the base plus the adapter's update.*2 x the expected"):
        _check(_planted(merged, tmp_path, double), tiny_base, adapter)


def test_scale_read_from_the_config_not_from_peft(
    merged: tuple[Path, dict], tmp_path: Path, tiny_base: Path, adapter: Path
) -> None:
    """The same written weights against a config saying rsLoRA (alpha / sqrt(r)): the expectation moves."""
    other = tmp_path / "rs"
    shutil.copytree(adapter, other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["use_rslora"] = True
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(Lora2ggufError, match=r"0\.5 x the expected.*use_rslora"):
        _check(merged[0], tiny_base, other)  # r=4: alpha/r is half of alpha/sqrt(r)


def test_transposed_update_is_caught(merged: tuple[Path, dict], tmp_path: Path, tiny_base: Path, adapter: Path) -> None:
    def transpose(t: dict[str, Any]) -> None:
        update = _update(tiny_base, t)
        assert update.shape[0] == update.shape[1]
        t[Q] = t[Q] - update + update.T

    with pytest.raises(Lora2ggufError, match=r"applied transposed"):
        _check(_planted(merged, tmp_path, transpose), tiny_base, adapter)


def test_update_left_out_is_caught(merged: tuple[Path, dict], tmp_path: Path, tiny_base: Path, adapter: Path) -> None:
    def undo(t: dict[str, Any]) -> None:
        t[Q] = t[Q] - _update(tiny_base, t)

    with pytest.raises(Lora2ggufError, match=r"update was not applied"):
        _check(_planted(merged, tmp_path, undo), tiny_base, adapter)


def test_missing_tensor_is_caught(merged: tuple[Path, dict], tmp_path: Path, tiny_base: Path, adapter: Path) -> None:
    with pytest.raises(Lora2ggufError, match=rf"do not have the base's tensors \(missing \['{Q}'\]"):
        _check(_planted(merged, tmp_path, lambda t: t.pop(Q)), tiny_base, adapter)


@pytest.mark.parametrize("name", [NORM, K_UNTOUCHED])
def test_untouched_tensor_that_changed_is_caught(
    merged: tuple[Path, dict], tmp_path: Path, tiny_base: Path, adapter: Path, name: str
) -> None:
    import torch

    def nudge(t: dict[str, Any]) -> None:
        flat = t[name].view(-1)
        flat[3] = torch.nextafter(flat[3], torch.tensor(float("inf")))  # one ulp, one element

    with pytest.raises(Lora2ggufError, match=rf"'{name}' should be the base's .* 1 of \d+ values differ"):
        _check(_planted(merged, tmp_path, nudge), tiny_base, adapter)


def test_nan_is_caught(merged: tuple[Path, dict], tmp_path: Path, tiny_base: Path, adapter: Path) -> None:
    def poison(t: dict[str, Any]) -> None:
        t[Q][1, 2] = float("nan")

    with pytest.raises(Lora2ggufError, match=r"1 NaN/Inf values"):
        _check(_planted(merged, tmp_path, poison), tiny_base, adapter)
    with pytest.raises(Lora2ggufError, match=rf"'{NORM}' should be the base's"):
        _check(_planted(merged, tmp_path / "n", lambda t: t[NORM].__setitem__(0, float("nan"))), tiny_base, adapter)


def test_tied_head_that_moved_is_caught(
    merged: tuple[Path, dict], tmp_path: Path, tiny_base: Path, adapter: Path
) -> None:
    """Tied: a written lm_head is one tensor too many; untied without one, the head would be random."""

    def add_head(t: dict[str, Any]) -> None:
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone() * 1.01

    with pytest.raises(Lora2ggufError, match=r"not in the base or adapter: \['lm_head.weight'\]"):
        _check(_planted(merged, tmp_path, add_head), tiny_base, adapter)
    with pytest.raises(Lora2ggufError, match=r"missing \['lm_head.weight'\]"):
        _check(merged[0], tiny_base, adapter, tied=False)
    untied = _planted(merged, tmp_path / "u", add_head)
    with pytest.raises(Lora2ggufError, match=r"'lm_head.weight' should be the base's"):
        _check(untied, tiny_base, adapter, tied=False)


def test_tied_output_with_an_adapted_embedding_is_refused(tmp_path: Path, tiny_base: Path) -> None:
    """LoRA on embed_tokens of a tied model, written tied: the head would move with the input embedding."""
    adapter = make_adapter(tiny_base, tmp_path / "ad", targets=["embed_tokens"], seed=3)
    base, weights = find_base_weights(tiny_base, False), find_adapter_weights(adapter, False)
    with pytest.raises(Lora2ggufError, match=r"changes 'model.embed_tokens.weight' .* tied head moved"):
        algebra.expectations(base, weights, read_adapter_config(adapter), output_tied=True)


# --- whole merges with peft's merge altered -------------------------------------------------------------


def _scaled_delta(factor: float) -> Callable[[Any], Any]:
    from peft.tuners.lora.layer import Linear

    original = Linear.get_delta_weight

    def get_delta_weight(self: Any, adapter: str) -> Any:
        return original(self, adapter) * factor

    return get_delta_weight


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merge_with_a_wrong_scale_is_refused(
    tmp_path: Path, tiny_base: Path, adapter: Path, monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    from peft.tuners.lora.layer import Linear

    monkeypatch.setattr(Linear, "get_delta_weight", _scaled_delta(1.5))
    out, report = tmp_path / "m", tmp_path / "merge_report.json"
    with pytest.raises(Lora2ggufError, match=r"(disagrees with base\+adapter|1\.5 x the expected)"):
        merge_adapter(MergeOptions(tiny_base, adapter, out, report=report, dtype=dtype))
    assert_nothing_written(out, report)


def test_merge_that_changes_an_untouched_tensor_is_refused(
    tmp_path: Path, tiny_base: Path, adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change too small for the logits to notice is still caught, tensor by tensor."""
    import torch

    from lora2gguf.merge import merge as merge_module

    original = merge_module._merge

    def merge_and_nudge(peft_model: Any, inputs: Any, trace: Any) -> Any:
        merged, tying = original(peft_model, inputs, trace)
        with torch.no_grad():
            merged.get_parameter(NORM)[0] += 1e-6
        return merged, tying

    monkeypatch.setattr(merge_module, "_merge", merge_and_nudge)
    out = tmp_path / "m"
    with pytest.raises(Lora2ggufError, match=rf"'{NORM}' should be the base's"):
        merge_adapter(MergeOptions(tiny_base, adapter, out))
    assert_nothing_written(out)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dora_on_an_embedding_is_judged_by_columns(tmp_path: Path, tiny_base: Path, dtype: str) -> None:
    """peft's DoRA scales the columns of a [vocab, dim] embedding (one magnitude per dim, not per row):
    the check models that, passes peft's merge, and catches one column scaled 1 % off (10 % in bf16,
    whose bound for DoRA allows a few bf16 roundings of about 0.8 % each)."""
    embedding = "model.embed_tokens.weight"
    adapter = make_adapter(tiny_base, tmp_path / "ad", targets=["embed_tokens", "q_proj"], use_dora=True, seed=12)
    out = tmp_path / "out"
    report = merge_adapter(MergeOptions(tiny_base, adapter, out, device="cpu", dtype=dtype))
    figures = report["verification"]["tensors"]
    assert figures["tensors"]["dora"] >= 2 and figures["tensors"]["lora"] == 0
    assert 0 < figures["max_error_to_bound"] <= 1.0 and not figures["unchecked_rows"]

    def nudge_column(t: dict[str, Any]) -> None:
        t[embedding][:, 3] *= 1.01 if dtype == "float32" else 1.1

    with pytest.raises(Lora2ggufError, match=rf"'{embedding}' is not the base plus the adapter's update"):
        _check(_planted((out, report), tmp_path, nudge_column), tiny_base, adapter, dtype, tied=False)


def _merged_gpt2(tmp_path: Path, use_dora: bool) -> tuple[Path, Path, Path]:
    """A tiny GPT-2 (Conv1D weights, stored [in, out]) with a fan_in_fan_out adapter on c_attn, merged by
    peft itself: base, adapter and merged folders."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(5)
    base, adapter, merged = tmp_path / "gpt2", tmp_path / "ad", tmp_path / "merged"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64)).save_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=use_dora)
    peft_model = get_peft_model(GPT2LMHeadModel.from_pretrained(base), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
            elif "lora_magnitude_vector" in name:
                param.mul_(1.0 + 0.1 * torch.randn_like(param))
    peft_model.save_pretrained(adapter)
    peft_model.merge_and_unload(safe_merge=True).save_pretrained(merged)
    return base, adapter, merged


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_conv1d_weights_are_judged_transposed(tmp_path: Path, use_dora: bool) -> None:
    """GPT-2's Conv1D stores [in, out]: the update is (B @ A).T, and DoRA scales its columns."""
    base, adapter, merged = _merged_gpt2(tmp_path, use_dora)
    figures = _check(merged, base, adapter)
    assert figures["tensors"]["dora" if use_dora else "lora"] == 2 and 0 < figures["max_error_to_bound"] <= 1.0
    attention = "transformer.h.1.attn.c_attn.weight"

    def nudge_column(t: dict[str, Any]) -> None:
        t[attention][:, 5] *= 1.01

    with pytest.raises(Lora2ggufError, match=rf"'{attention}' is not the base plus the adapter's update"):
        _check(_planted((merged, {}), tmp_path, nudge_column), base, adapter)


def test_dora_embedding_magnitude_of_the_wrong_length_is_refused(tmp_path: Path, tiny_base: Path) -> None:
    """An embedding's DoRA magnitude has one value per column; a truncated one names the file and tensor."""
    from safetensors.torch import load_file, save_file

    adapter = make_adapter(tiny_base, tmp_path / "ad", targets=["embed_tokens"], use_dora=True, seed=13)
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if "embed_tokens.lora_magnitude_vector" in k)
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, weights, metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(Lora2ggufError, match=rf"adapter_model\.safetensors: tensor '{key}'.*one per column"):
        merge_adapter(MergeOptions(tiny_base, adapter, out, device="cpu"))
    assert_nothing_written(out)
