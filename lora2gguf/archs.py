"""Architecture facts, one table per supported architecture: how an HF config and its tensors map to GGUF.

Base module: read by the converter (convert/), the LoRA adapter export (adapter/) and the
importance-matrix collection (imatrix/), which names its entries with the GGUF tensor names.

Only decoder-only transformers whose tensors all map through gguf-py's ``TensorNameMap`` are here:
``Qwen2ForCausalLM`` (Qwen1.5, Qwen2, Qwen2.5) -> ``qwen2`` and ``LlamaForCausalLM`` (Llama,
SmolLM/SmolLM2) -> ``llama``. Anything else is refused by name rather than converted half right.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from lora2gguf.errors import Lora2ggufError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchSpec:
    """What differs between the supported architectures."""

    gguf_arch: gguf.MODEL_ARCH
    hf_architectures: tuple[str, ...]
    # llama.cpp's llama graph applies RoPE to interleaved (GPT-J style) pairs while HF Llama
    # checkpoints store q/k rows in "rotate_half" order, so q_proj/k_proj rows are permuted per
    # head. Qwen2 uses NEOX-style RoPE in llama.cpp, which matches HF's layout: no permutation.
    permute_qk: bool
    # llama.cpp's converter writes llama.vocab_size and llama.rope.dimension_count for llama only.
    write_vocab_size: bool
    write_rope_dimension_count: bool
    # For llama it copies tokenizer_config.json's add_prefix_space into tokenizer.ggml.add_space_prefix.
    write_add_space_prefix: bool

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


ARCHS: dict[str, ArchSpec] = {
    "qwen2": ArchSpec(
        gguf_arch=gguf.MODEL_ARCH.QWEN2,
        hf_architectures=("Qwen2ForCausalLM",),
        permute_qk=False,
        write_vocab_size=False,
        write_rope_dimension_count=False,
        write_add_space_prefix=False,
    ),
    "llama": ArchSpec(
        gguf_arch=gguf.MODEL_ARCH.LLAMA,
        hf_architectures=("LlamaForCausalLM",),
        permute_qk=True,
        write_vocab_size=True,
        write_rope_dimension_count=True,
        write_add_space_prefix=True,
    ),
}

# Tensors a checkpoint may carry that are not model weights (recomputed buffers).
SKIP_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")


def load_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Lora2ggufError(f"{path}: not found (is {model_dir} a Hugging Face model folder?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Lora2ggufError(f"{path}: cannot read: {exc}") from None
    if not isinstance(config, dict):
        raise Lora2ggufError(f"{path}: not a JSON object")
    return config


def spec_for(config: dict[str, Any], config_path: Path) -> ArchSpec:
    """The table for ``config['architectures'][0]``; an unsupported architecture fails by name."""
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise Lora2ggufError(f"{config_path}: key 'architectures' is missing or not a list of names")
    hf_arch = archs[0]
    for spec in ARCHS.values():
        if hf_arch in spec.hf_architectures:
            return spec
    supported = ", ".join(f"{a} ({s.name})" for s in ARCHS.values() for a in s.hf_architectures)
    raise Lora2ggufError(
        f"{config_path}: architecture {hf_arch!r} is not supported by lora2gguf convert (supported: {supported})"
    )


def _require(config: dict[str, Any], key: str, config_path: Path, kind: type = int) -> Any:
    value = config.get(key)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Lora2ggufError(f"{config_path}: key {key!r} is missing or not a number")
    if kind is int:
        if int(value) != value or value <= 0:
            raise Lora2ggufError(f"{config_path}: key {key!r} must be a positive integer, got {value!r}")
        return int(value)
    return float(value)


@dataclass(frozen=True)
class HParams:
    block_count: int
    context_length: int
    embedding_length: int
    feed_forward_length: int
    head_count: int
    head_count_kv: int | None
    head_dim: int | None
    rms_eps: float
    rope_theta: float | None
    rope_scaling: dict[str, Any]
    vocab_size: int
    tie_word_embeddings: bool

    @property
    def n_head_kv(self) -> int:
        return self.head_count_kv if self.head_count_kv is not None else self.head_count


def read_hparams(config: dict[str, Any], config_path: Path) -> HParams:
    """The hyperparameters llama.cpp needs, validated; RoPE variants we cannot express are refused."""
    # transformers >= 5 keeps rope_theta and the scaling type in "rope_parameters"; older
    # versions use top-level "rope_theta" and "rope_scaling".
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_theta = config.get("rope_theta", rope.get("rope_theta"))
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type not in (None, "default", "linear", "yarn"):
        key = "rope_parameters" if "rope_parameters" in config else "rope_scaling"
        raise Lora2ggufError(
            f"{config_path}: key {key!r} has RoPE type {rope_type!r}, which lora2gguf convert does not handle "
            "(supported: default, linear, yarn)"
        )
    head_count_kv = config.get("num_key_value_heads")
    hp = HParams(
        block_count=_require(config, "num_hidden_layers", config_path),
        context_length=_require(config, "max_position_embeddings", config_path),
        embedding_length=_require(config, "hidden_size", config_path),
        feed_forward_length=_require(config, "intermediate_size", config_path),
        head_count=_require(config, "num_attention_heads", config_path),
        head_count_kv=None if head_count_kv is None else _require(config, "num_key_value_heads", config_path),
        head_dim=None if config.get("head_dim") is None else _require(config, "head_dim", config_path),
        rms_eps=_require(config, "rms_norm_eps", config_path, float),
        rope_theta=None if rope_theta is None else float(rope_theta),
        rope_scaling={**rope, "rope_type": rope_type},
        vocab_size=_require(config, "vocab_size", config_path),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )
    if hp.head_count % hp.n_head_kv:
        raise Lora2ggufError(
            f"{config_path}: num_attention_heads ({hp.head_count}) is not a multiple of num_key_value_heads ({hp.n_head_kv})"
        )
    if hp.head_dim is None and hp.embedding_length % hp.head_count:
        raise Lora2ggufError(
            f"{config_path}: hidden_size ({hp.embedding_length}) is not a multiple of num_attention_heads ({hp.head_count})"
        )
    return hp


def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows (or bias entries) of each head from HF's rotate-half to llama.cpp's interleaved layout.

    Per head the rows are [first halves | second halves] of the rotary pairs in HF; llama.cpp wants
    the two members of each pair adjacent. Splitting each head into (2, half) and swapping those
    axes does exactly that.
    """
    rows = weights.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of rotary pairs")
    return np.ascontiguousarray(
        weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)
    )
