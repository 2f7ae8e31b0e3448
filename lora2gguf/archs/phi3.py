"""Phi3ForCausalLM (Phi-3, Phi-3.5 mini, Phi-4 mini) -> ``phi3``.

The checkpoint fuses q, k and v into ``qkv_proj`` and gate and up into ``gate_up_proj``: llama.cpp
keeps them fused (``attn_qkv``, ``ffn_up`` of twice the feed-forward width), so they map by name
and a LoRA trained on them targets those fused names. llama.cpp's Phi-3 converter writes its own
hyperparameter keys (the original context length, the rotary width, the sliding window, 0 for
none), its own SentencePiece reading (added tokens typed by their special flag only, also from
tokenizer.json), or the byte-level BPE path for the Phi-4 tokenizer (GPT2Tokenizer); and, for the
LongRoPE variants (128k context), the long/short per-frequency factors as two tensors and the
attention factor as a key.
"""

from __future__ import annotations

import math

import gguf
import numpy as np

from lora2gguf.archs.base import BASE_ROPE_TYPES, ArchSpec, HParams, require
from lora2gguf.errors import Lora2ggufError


def _original_context(hp: HParams) -> int:
    value = hp.rope_scaling.get("original_max_position_embeddings", hp.config.get("original_max_position_embeddings"))
    return require({"original_max_position_embeddings": value}, "original_max_position_embeddings", hp.config_path)


def rope_dims(hp: HParams) -> int:
    """Rotated dimensions per head, as llama.cpp's converter computes them (partial_rotary_factor of hidden/heads)."""
    return int(float(hp.rope_scaling.get("partial_rotary_factor", 1.0)) * hp.embedding_length) // hp.head_count


def _hparams(writer: gguf.GGUFWriter, hp: HParams) -> None:
    writer.add_context_length(hp.context_length)
    writer.add_rope_scaling_orig_ctx_len(_original_context(hp))
    writer.add_embedding_length(hp.embedding_length)
    writer.add_feed_forward_length(hp.feed_forward_length)
    writer.add_block_count(hp.block_count)
    writer.add_head_count(hp.head_count)
    writer.add_head_count_kv(require(hp.config, "num_key_value_heads", hp.config_path))
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_rope_dimension_count(rope_dims(hp))
    if hp.rope_theta is None:
        raise Lora2ggufError(f"{hp.config_path}: key 'rope_theta' is missing")
    writer.add_rope_freq_base(hp.rope_theta)


def _extras(writer: gguf.GGUFWriter, hp: HParams) -> None:
    # 0 marks "no window" (Phi-4); Phi-3 mini states one.
    window = hp.config.get("sliding_window")
    writer.add_sliding_window(0 if window is None else require(hp.config, "sliding_window", hp.config_path))


def _long_rope(hp: HParams) -> tuple[list[float], list[float], float] | None:
    """(long factors, short factors, attention factor) for a LongRoPE config, else None."""
    rope = hp.rope_scaling
    long_factors, short_factors = rope.get("long_factor"), rope.get("short_factor")
    if not long_factors:
        return None
    if not isinstance(short_factors, list) or len(long_factors) != len(short_factors) or len(long_factors) * 2 != rope_dims(hp):
        raise Lora2ggufError(
            f"{hp.config_path}: rope long_factor/short_factor must both have {rope_dims(hp) // 2} entries "
            "(half the rotary dimensions)"
        )
    scale = hp.context_length / _original_context(hp)
    orig = _original_context(hp)
    kind = str(rope.get("rope_type") or "").lower()
    if kind in ("su", "longrope"):
        attn_factor = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
    else:
        raise Lora2ggufError(f"{hp.config_path}: rope long/short factors with rope_type {kind!r} are not supported")
    return [float(x) for x in long_factors], [float(x) for x in short_factors], attn_factor


def _write_first(writer: gguf.GGUFWriter, hp: HParams) -> None:
    # llama.cpp's converter sets this key while it generates the factor tensors, before any other.
    rope = _long_rope(hp)
    if rope is not None:
        writer.add_rope_scaling_attn_factors(rope[2])


def _extra_tensors(hp: HParams) -> list[tuple[str, np.ndarray]]:
    rope = _long_rope(hp)
    if rope is None:
        return []
    names = gguf.TENSOR_NAMES
    return [
        (names[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight", np.asarray(rope[0], dtype=np.float32)),
        (names[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight", np.asarray(rope[1], dtype=np.float32)),
    ]


def _check(hp: HParams) -> None:
    _original_context(hp)
    _long_rope(hp)
    act = hp.config.get("hidden_act", "silu")
    if act != "silu":
        raise Lora2ggufError(f"{hp.config_path}: key 'hidden_act' is {act!r}; llama.cpp's phi3 graph uses SiLU")


PHI3 = ArchSpec(
    gguf_arch=gguf.MODEL_ARCH.PHI3,
    hf_architectures=("Phi3ForCausalLM",),
    rope_types=BASE_ROPE_TYPES | {"longrope", "su"},
    vocab="spm-phi3",
    write_first=_write_first,
    write_hparams=_hparams,
    write_extras=_extras,
    extra_tensors=_extra_tensors,
    check=_check,
)
