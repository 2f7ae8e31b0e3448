"""Gemma2ForCausalLM -> ``gemma2`` and Gemma3ForCausalLM (text) -> ``gemma3``.

What llama.cpp's Gemma converters do beyond a plain decoder: every RMSNorm weight is stored as
``w + 1`` (Gemma's norm multiplies by ``1 + w``; llama.cpp's by ``w``), the head is always the
embedding matrix (Gemma 2's converter drops a saved ``lm_head``), the vocabulary is SentencePiece
(``tokenizer.model``) with ``add_space_prefix`` false, and the hyperparameters carry the head
width, logit softcapping and the sliding window. llama.cpp fixes some things the HF config states
(which layers use the window, the attention scale, Gemma 2's RoPE base); a config that disagrees
with them would convert into a model that computes something else, so it is refused by key.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import gguf
import numpy as np

from lora2gguf.archs.base import ArchSpec, HParams, optional_number, require
from lora2gguf.errors import Lora2ggufError

def norm_plus_one(name: str, data: np.ndarray) -> np.ndarray:
    """Gemma's RMSNorm scales by (1 + w): llama.cpp's converter stores w + 1 (in the source's precision)."""
    return data + data.dtype.type(1) if name.endswith("norm.weight") else data


def _head_dim(hp: HParams, default: int | None = None) -> int:
    if hp.head_dim is not None:
        return hp.head_dim
    if default is None:
        raise Lora2ggufError(f"{hp.config_path}: key 'head_dim' is missing")
    return default


def _put(writer: gguf.GGUFWriter, key: str, add: Callable[[Any], None], value: Any) -> None:
    """Set a key the way llama.cpp's Gemma 3 converter re-sets it after the generic block: a key
    already holding the value is left alone (gguf-py would overwrite it in place, same bytes)."""
    held = writer.kv_data[0].get(key.format(arch=writer.arch))
    if held is None or held.value != value:
        add(value)


# ---------------------------------------------------------------------------------------------
# checks shared by both generations


def _layer_types(hp: HParams) -> list[str] | None:
    types = hp.config.get("layer_types")
    if types is None:
        return None
    if not isinstance(types, list) or len(types) != hp.block_count:
        raise Lora2ggufError(f"{hp.config_path}: key 'layer_types' must list one type per layer ({hp.block_count})")
    return types


def _check_swa_pattern(hp: HParams, period: int) -> None:
    """llama.cpp gives every layer i with i % period < period - 1 the sliding window (it does not read
    HF's layer_types): the config must say the same."""
    types = _layer_types(hp)
    if types is None:
        return
    expected = ["sliding_attention" if i % period < period - 1 else "full_attention" for i in range(hp.block_count)]
    if types != expected:
        raise Lora2ggufError(
            f"{hp.config_path}: key 'layer_types' is {types}, but llama.cpp's {hp.config.get('model_type')} graph uses "
            f"the sliding window on every layer but each {period}th ({expected}); the GGUF would attend differently"
        )


def _check_attention_scale(hp: HParams, big_layers: int) -> None:
    """llama.cpp scales queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 27B sizes, which it
    recognises by their layer count), whatever query_pre_attn_scalar says."""
    scalar = optional_number(hp.config, "query_pre_attn_scalar", hp.config_path)
    if scalar is None:
        return
    used = hp.embedding_length // hp.head_count if hp.block_count == big_layers else _head_dim(hp, 256)
    if not math.isclose(scalar, used):
        raise Lora2ggufError(
            f"{hp.config_path}: key 'query_pre_attn_scalar' is {scalar:g}, but llama.cpp scales attention by "
            f"1/sqrt({used}) for this model; the GGUF would compute different attention"
        )


def _check_activation(hp: HParams) -> None:
    act = hp.config.get("hidden_activation", hp.config.get("hidden_act", "gelu_pytorch_tanh"))
    if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        raise Lora2ggufError(
            f"{hp.config_path}: key 'hidden_activation' is {act!r}; llama.cpp's Gemma graph uses the tanh GELU"
        )


# ---------------------------------------------------------------------------------------------
# Gemma 2


def _gemma2_hparams(writer: gguf.GGUFWriter, hp: HParams) -> None:
    writer.add_context_length(hp.context_length)
    writer.add_embedding_length(hp.embedding_length)
    writer.add_block_count(hp.block_count)
    writer.add_feed_forward_length(hp.feed_forward_length)
    writer.add_head_count(hp.head_count)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_key_length(_head_dim(hp))
    writer.add_value_length(_head_dim(hp))


def _gemma2_extras(writer: gguf.GGUFWriter, hp: HParams) -> None:
    writer.add_attn_logit_softcapping(require(hp.config, "attn_logit_softcapping", hp.config_path, float))
    writer.add_final_logit_softcapping(require(hp.config, "final_logit_softcapping", hp.config_path, float))
    writer.add_sliding_window(require(hp.config, "sliding_window", hp.config_path))


def _gemma2_check(hp: HParams) -> None:
    _head_dim(hp)
    for key in ("attn_logit_softcapping", "final_logit_softcapping", "sliding_window"):
        require(hp.config, key, hp.config_path, int if key == "sliding_window" else float)
    if hp.rope_theta is not None and hp.rope_theta != 10000.0:
        # llama.cpp's Gemma 2 converter writes no RoPE base, so llama.cpp uses its default 10000.
        raise Lora2ggufError(f"{hp.config_path}: key 'rope_theta' is {hp.rope_theta:g}; llama.cpp's gemma2 uses 10000")
    if not hp.tie_word_embeddings:
        raise Lora2ggufError(
            f"{hp.config_path}: key 'tie_word_embeddings' is false, but llama.cpp's gemma2 always uses the "
            "embeddings as the output head (its converter drops lm_head)"
        )
    _check_swa_pattern(hp, 2)
    _check_attention_scale(hp, 46)
    _check_activation(hp)


GEMMA2 = ArchSpec(
    gguf_arch=gguf.MODEL_ARCH.GEMMA2,
    hf_architectures=("Gemma2ForCausalLM",),
    vocab="spm",
    forced_add_space_prefix=False,
    skip_names=("lm_head.weight",),
    write_hparams=_gemma2_hparams,
    write_extras=_gemma2_extras,
    transform=norm_plus_one,
    check=_gemma2_check,
)


# ---------------------------------------------------------------------------------------------
# Gemma 3 (text)


def _gemma3_extras(writer: gguf.GGUFWriter, hp: HParams) -> None:
    """After the generic keys, llama.cpp's Gemma 3 converter sets these again, with its defaults."""
    config = hp.config
    _put(writer, gguf.Keys.LLM.CONTEXT_LENGTH, writer.add_context_length, hp.context_length)
    _put(writer, gguf.Keys.Attention.HEAD_COUNT, writer.add_head_count, hp.head_count)
    _put(writer, gguf.Keys.Attention.LAYERNORM_RMS_EPS, writer.add_layer_norm_rms_eps, hp.rms_eps)
    _put(writer, gguf.Keys.Attention.KEY_LENGTH, writer.add_key_length, _head_dim(hp, 256))
    _put(writer, gguf.Keys.Attention.VALUE_LENGTH, writer.add_value_length, _head_dim(hp, 256))
    theta = hp.rope_theta if hp.rope_theta is not None else 1_000_000.0
    _put(writer, gguf.Keys.Rope.FREQ_BASE, writer.add_rope_freq_base, theta)
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(require(config, "final_logit_softcapping", hp.config_path, float))
    if config.get("sliding_window_pattern") != 1:
        writer.add_sliding_window(require(config, "sliding_window", hp.config_path))
    _put(writer, gguf.Keys.Attention.HEAD_COUNT_KV, writer.add_head_count_kv, config.get("num_key_value_heads", 4))


def _gemma3_check(hp: HParams) -> None:
    if hp.config.get("attn_logit_softcapping") is not None:
        raise Lora2ggufError(f"{hp.config_path}: key 'attn_logit_softcapping' is set; Gemma 3 has no attention softcapping")
    if hp.config.get("sliding_window_pattern") != 1:
        require(hp.config, "sliding_window", hp.config_path)
        _check_swa_pattern(hp, 6)
    _check_attention_scale(hp, 62)
    _check_activation(hp)


GEMMA3 = ArchSpec(
    gguf_arch=gguf.MODEL_ARCH.GEMMA3,
    hf_architectures=("Gemma3ForCausalLM",),
    vocab="spm",
    forced_add_space_prefix=False,
    write_extras=_gemma3_extras,
    transform=norm_plus_one,
    check=_gemma3_check,
)
