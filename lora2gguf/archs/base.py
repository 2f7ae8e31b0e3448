"""What every architecture table shares: the spec type, the validated hyperparameters, config reading.

A family module (``qwen2.py``, ``llama.py``, ...) builds one :class:`ArchSpec` per GGUF architecture
it converts; the optional hooks on the spec carry what only that family does (its own hyperparameter
keys, a transform of some tensors, tensors llama.cpp's converter generates, the vocabulary kind).
Every hook left at its default gives the behaviour of a plain Llama/Qwen2-style model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from lora2gguf.errors import Lora2ggufError

logger = logging.getLogger(__name__)

# Tensors a checkpoint may carry that are not model weights (recomputed buffers).
SKIP_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")
# RoPE variants every architecture handles (llama.cpp's generic hyperparameter code).
BASE_ROPE_TYPES = frozenset({None, "default", "linear", "yarn"})
# Where llama.cpp's converter looks for the global and the sliding-window RoPE base (TextModel.__init__).
_GLOBAL_THETA_KEYS = ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base")
_LOCAL_THETA_KEYS = ("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta", "rope_local_base_freq")


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
    # RoPE base of the sliding-window layers, when the config gives one (Gemma 3).
    rope_theta_swa: float | None = None
    # The whole config.json and its path, for the keys only one family reads (through its hooks).
    config: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    config_path: Path = field(default=Path("config.json"), compare=False)

    @property
    def n_head_kv(self) -> int:
        return self.head_count_kv if self.head_count_kv is not None else self.head_count

    @property
    def n_embd_head(self) -> int:
        """Per-head width: head_dim when the config gives it, else hidden_size / heads."""
        return self.head_dim if self.head_dim is not None else self.embedding_length // self.head_count


# Hook signatures (see ArchSpec).
WriterHook = Callable[[gguf.GGUFWriter, HParams], None]
TensorHook = Callable[[str, np.ndarray], np.ndarray]
ExtraTensorsHook = Callable[[HParams], list[tuple[str, np.ndarray]]]
CheckHook = Callable[[HParams], None]


@dataclass(frozen=True)
class ArchSpec:
    """What differs between the supported architectures."""

    gguf_arch: gguf.MODEL_ARCH
    hf_architectures: tuple[str, ...]
    # llama.cpp's llama graph applies RoPE to interleaved (GPT-J style) pairs while HF Llama
    # checkpoints store q/k rows in "rotate_half" order, so q_proj/k_proj rows are permuted per
    # head. Qwen2 uses NEOX-style RoPE in llama.cpp, which matches HF's layout: no permutation.
    permute_qk: bool = False
    # llama.cpp's converter writes llama.vocab_size and llama.rope.dimension_count for llama only.
    write_vocab_size: bool = False
    write_rope_dimension_count: bool = False
    # For llama it copies tokenizer_config.json's add_prefix_space into tokenizer.ggml.add_space_prefix.
    write_add_space_prefix: bool = False
    # RoPE types (config rope_type) the family converts; anything else is refused by name.
    rope_types: frozenset[str | None] = BASE_ROPE_TYPES
    # Vocabulary: "bpe" (tokenizer.json, byte-level BPE), "spm" (tokenizer.model, SentencePiece),
    # "spm-or-bpe" (SentencePiece when tokenizer.model exists, as llama.cpp's Llama converter tries), or
    # "spm-phi3" (Phi-3's own SentencePiece reading; byte-level BPE for a GPT2Tokenizer, Phi-4).
    vocab: str = "bpe"
    # tokenizer.ggml.add_space_prefix written after the vocabulary with this value (Gemma: False).
    forced_add_space_prefix: bool | None = None
    # Checkpoint tensors llama.cpp's converter drops whatever the config says (Gemma 2: lm_head).
    skip_names: tuple[str, ...] = ()
    # Keys llama.cpp's converter sets while generating tensors, i.e. before general.type (Phi-3 LongRoPE).
    write_first: WriterHook | None = None
    # Replaces the generic hyperparameter block (keys before general.file_type), for families whose
    # converter writes its own keys in its own order.
    write_hparams: WriterHook | None = None
    # Keys written after general.file_type (softcapping, sliding window, ...).
    write_extras: WriterHook | None = None
    # (HF tensor name, data as read, bf16 widened to f32) -> data to write (Gemma: norm weights + 1).
    transform: TensorHook | None = None
    # Tensors llama.cpp's converter generates from the config, written before the checkpoint's.
    extra_tensors: ExtraTensorsHook | None = None
    # Family-specific validation of the config (what llama.cpp would silently compute differently).
    check: CheckHook | None = None

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


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


def require(config: Mapping[str, Any], key: str, config_path: Path, kind: type = int) -> Any:
    """config[key] as a positive int (kind=int) or a float; a clear error naming the file and key otherwise."""
    value = config.get(key)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Lora2ggufError(f"{config_path}: key {key!r} is missing or not a number")
    if kind is int:
        if int(value) != value or value <= 0:
            raise Lora2ggufError(f"{config_path}: key {key!r} must be a positive integer, got {value!r}")
        return int(value)
    return float(value)


def optional_number(config: Mapping[str, Any], key: str, config_path: Path, kind: type = float) -> Any:
    """config[key] checked like :func:`require`, or None when absent/null."""
    return None if config.get(key) is None else require(config, key, config_path, kind)


def _rope(config: dict[str, Any], config_path: Path) -> tuple[dict[str, Any], float | None, float | None]:
    """(the global RoPE parameters with rope_type, the global base, the sliding-window base).

    transformers >= 5 keeps them in "rope_parameters" (per layer type for Gemma 3: "full_attention" /
    "sliding_attention"); older versions use "rope_theta" / "rope_scaling" at the top level.
    """
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise Lora2ggufError(f"{config_path}: key 'rope_parameters'/'rope_scaling' is not an object")
    rope = dict(params.get("full_attention", params))
    theta = rope.get("rope_theta")
    if theta is None:
        theta = next((config[k] for k in _GLOBAL_THETA_KEYS if config.get(k) is not None), None)
    if "full_attention" in params or "sliding_attention" in params:
        theta_swa = (params.get("sliding_attention") or {}).get("rope_theta")
    else:
        theta_swa = next((config[k] for k in _LOCAL_THETA_KEYS if config.get(k) is not None), None)
    rope["rope_type"] = rope.get("rope_type", rope.get("type"))
    for value, key in ((theta, "rope_theta"), (theta_swa, "sliding-window rope_theta")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise Lora2ggufError(f"{config_path}: {key} is not a number: {value!r}")
    return rope, None if theta is None else float(theta), None if theta_swa is None else float(theta_swa)


def read_hparams(config: dict[str, Any], config_path: Path, spec: ArchSpec | None = None) -> HParams:
    """The hyperparameters llama.cpp needs, validated; RoPE variants the family cannot express are refused."""
    rope, rope_theta, rope_theta_swa = _rope(config, config_path)
    rope_type = rope["rope_type"]
    allowed = spec.rope_types if spec is not None else BASE_ROPE_TYPES
    if rope_type not in allowed:
        key = "rope_parameters" if "rope_parameters" in config else "rope_scaling"
        names = ", ".join(sorted(str(t) for t in allowed if t is not None))
        raise Lora2ggufError(
            f"{config_path}: key {key!r} has RoPE type {rope_type!r}, which lora2gguf convert does not handle "
            f"for this architecture (supported: {names})"
        )
    head_count_kv = config.get("num_key_value_heads")
    hp = HParams(
        block_count=require(config, "num_hidden_layers", config_path),
        context_length=require(config, "max_position_embeddings", config_path),
        embedding_length=require(config, "hidden_size", config_path),
        feed_forward_length=require(config, "intermediate_size", config_path),
        head_count=require(config, "num_attention_heads", config_path),
        head_count_kv=None if head_count_kv is None else require(config, "num_key_value_heads", config_path),
        head_dim=optional_number(config, "head_dim", config_path, int),
        rms_eps=require(config, "rms_norm_eps", config_path, float),
        rope_theta=rope_theta,
        rope_scaling=rope,
        vocab_size=require(config, "vocab_size", config_path),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_theta_swa=rope_theta_swa,
        config=config,
        config_path=config_path,
    )
    if hp.head_count % hp.n_head_kv:
        raise Lora2ggufError(
            f"{config_path}: num_attention_heads ({hp.head_count}) is not a multiple of num_key_value_heads ({hp.n_head_kv})"
        )
    if hp.head_dim is None and hp.embedding_length % hp.head_count:
        raise Lora2ggufError(
            f"{config_path}: hidden_size ({hp.embedding_length}) is not a multiple of num_attention_heads ({hp.head_count})"
        )
    if spec is not None and spec.check is not None:
        spec.check(hp)
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
