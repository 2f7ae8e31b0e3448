"""Which ggml type each tensor gets: llama.cpp's per-tensor recipe for a file type.

Written from a reading of llama.cpp's ``src/llama-quant.cpp`` (``tensor_allows_quantization``,
``llama_tensor_get_type_impl``, ``tensor_type_fallback``, the tensor order of
``llama_model_loader``), restricted to the file types in :mod:`lora2gguf.quantize.types` and the
non-imatrix path. The plan is pure data: no tensor bytes are read here.

The rules that matter for the models this project makes:

* only tensors with at least two (non-trivial) dimensions whose name ends in ``weight`` are
  quantized; norms, biases and other 1-D tensors keep their type (F32);
* the output head (``output.weight``, or ``token_embd.weight`` when there is no
  ``output.weight``: tied embeddings) gets Q6_K, or Q8_0 when its row length is not a multiple
  of the default type's block size (or when the file type is Q8_0 already);
* ``attn_v`` and ``ffn_down`` get Q6_K in the layers where ``use_more_bits`` holds for
  Q4_K_M / Q5_K_M, Q5_K in the first layers for Q4_K_S;
* the low-bit file types raise ``attn_v``, ``ffn_down`` and ``attn_output``: Q2_K to Q3_K (attn_v
  Q4_K with grouped-query attention of 4+ heads per KV head), Q3_K_M to Q4_K/Q5_K, Q3_K_L to
  Q5_K; IQ4_NL / IQ4_XS give attn_v Q5_K at 4+ heads per KV head and, without an imatrix only,
  the first eighth of the ffn_down layers Q5_K;
* a tensor whose row length (ne[0]) is not a multiple of the chosen type's block size falls
  back: Q2_K / Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS and the IQ1 / IQ2 /
  IQ3 types -> IQ4_NL, and to F16 when 32 does not divide it either.

Architecture conditions: falcon's and the 70B / 8-expert ones are transcribed; glm5-next's (tensors
never quantized, tensors never below Q8_0) are not, so a tensor that would meet one is refused by
name rather than given a type that differs from llama-quantize's.

None of these file types needs an importance matrix in llama.cpp (``tensor_requires_imatrix``
holds only for the IQ1/IQ2/IQ3_XXS tensor types and for Q2_K inside a Q2_K_S file).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import gguf

from lora2gguf.errors import Lora2ggufError
from lora2gguf.quantize.types import FILE_TYPES, TENSOR_TYPES, canonical_type

logger = logging.getLogger(__name__)

# ggml block size (weights per block) and bytes per block of every type we read or write, from
# gguf-py's table; other ggml types are refused.
BLOCK: dict[str, tuple[int, int]] = {
    name: gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
    for name in (
        "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K",
        "IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M",
    )
}
FLOAT_TYPES = frozenset({"F32", "F16", "BF16", "F64"})
# Types that are neither float nor quantized (integer tensors): never requantized, just copied.
INTEGER_TYPES = frozenset({"I8", "I16", "I32", "I64"})

# What a K-quant that does not fit a row length becomes (llama.cpp's tensor_type_fallback).
_FALLBACK = {
    "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q2_K": "Q4_0", "Q3_K": "Q4_0",
    "IQ4_XS": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL", "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL",
    "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL",
}

# llama.cpp's tensor_requires_imatrix: tensors of these types (other than token_embd / output) need
# importance data; llama-quantize refuses the file without an imatrix.
IMATRIX_TENSOR_TYPES = frozenset({"IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S"})
# The file types of the IQ2 / IQ1 family branch of llama_tensor_get_type_impl.
_IQ2_FAMILY = frozenset({"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M"})
# File types whose output head is Q5_K instead of Q6_K.
_Q5_K_HEAD = _IQ2_FAMILY | {"IQ3_XXS"}

# Architectures and layer counts for which llama.cpp's loader reports a 70B model; only that
# size changes the recipe (attn_v Q4_K -> Q5_K). "llama" needs grouped-query attention too.
_SEVENTY_B_LAYERS = {"llama": 80, "qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}

# Substrings of tensor names that llama.cpp never quantizes (small or index-like tensors).
_NEVER_QUANTIZED_PARTS = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "time_mix_first.weight",
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)
_NEVER_QUANTIZED_NAMES = frozenset({"position_embd.weight", "token_types.weight"})

# llama.cpp rules tied to one architecture that this recipe does not transcribe (src/llama-quant.cpp),
# by name part: tensors it never quantizes (tensor_allows_quantization) and tensors it never puts below
# Q8_0 (llama_tensor_get_type_impl). A file that meets one is refused, naming the tensor and the rule,
# rather than quantized differently from llama-quantize.
_UNTRANSCRIBED_KEEP = {
    "glm5-next": (
        "hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
        "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight", "ssm_g_b.weight",
        "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight", "attn_v_b.weight",
    ),
}  # fmt: skip
_UNTRANSCRIBED_Q8_0_FLOOR = {"glm5-next": ("attn_q_a", "attn_q_b", "nextn.eh_proj")}

_LAYER_RE = re.compile(r"^blk\.(-?\d+)\.")


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as the recipe sees it: name, ggml shape (ne[0] = row length first) and type."""

    name: str
    shape: tuple[int, ...]
    src_type: str

    @property
    def n_dims(self) -> int:
        # ggml_n_dims: trailing dimensions of size 1 do not count.
        dims = 1
        for i, n in enumerate(self.shape):
            if n > 1:
                dims = i + 1
        return dims

    @property
    def n_elements(self) -> int:
        total = 1
        for n in self.shape:
            total *= int(n)
        return total


@dataclass(frozen=True)
class ModelInfo:
    """The few hyper-parameters the recipe depends on, read from the GGUF metadata."""

    arch: str
    n_layer: int
    n_expert: int = 0
    n_head: int = 0
    n_head_kv: int = 0

    @property
    def n_gqa(self) -> int:
        """llama_hparams::n_gqa(0): query heads per KV head (integer division; 0 without heads). A
        file without head_count_kv has one KV head per head, as llama.cpp's loader defaults it."""
        n_head_kv = self.n_head_kv or self.n_head
        return self.n_head // n_head_kv if n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        if _SEVENTY_B_LAYERS.get(self.arch) != self.n_layer:
            return False
        if self.arch == "llama":
            return self.n_expert != 8 and self.n_head != self.n_head_kv
        return True

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], source: str = "<input>") -> ModelInfo:
        arch = meta.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise Lora2ggufError(f"{source}: metadata key general.architecture is missing")
        n_layer = meta.get(f"{arch}.block_count")
        if not isinstance(n_layer, int):
            raise Lora2ggufError(f"{source}: metadata key {arch}.block_count is missing")

        def as_int(key: str) -> int:
            value = meta.get(key, 0)
            if isinstance(value, (list, tuple)):  # per-layer arrays: the first layer decides here
                value = value[0] if value else 0
            return int(value or 0)

        return cls(
            arch=arch,
            n_layer=n_layer,
            n_expert=as_int(f"{arch}.expert_count"),
            n_head=as_int(f"{arch}.attention.head_count"),
            n_head_kv=as_int(f"{arch}.attention.head_count_kv"),
        )


@dataclass
class TensorChoice:
    """The decision for one tensor, with the reason, as reported in the sidecar."""

    name: str
    shape: list[int]
    src_type: str
    dst_type: str
    rule: str
    fallback: dict[str, Any] | None = None

    @property
    def converts(self) -> bool:
        return self.src_type != self.dst_type

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Plan:
    """Every tensor's type, in the order llama.cpp writes them."""

    file_type: str
    llama_ftype: int
    default_type: str
    tied_embeddings: bool
    choices: list[TensorChoice] = field(default_factory=list)

    @property
    def fallbacks(self) -> list[TensorChoice]:
        return [c for c in self.choices if c.fallback is not None]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.choices:
            out[c.dst_type] = out.get(c.dst_type, 0) + 1
        return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------
# helpers


def block_size(type_name: str) -> int:
    try:
        return BLOCK[type_name][0]
    except KeyError:
        raise Lora2ggufError(f"ggml type {type_name} is not supported by lora2gguf quantize") from None


def row_bytes(type_name: str, n_per_row: int) -> int:
    blk, size = BLOCK[type_name]
    return n_per_row // blk * size


def tensor_bytes(type_name: str, shape: Iterable[int]) -> int:
    dims = [int(n) for n in shape]
    rows = 1
    for n in dims[1:]:
        rows *= n
    return rows * row_bytes(type_name, dims[0])


def is_quantized(type_name: str) -> bool:
    return type_name not in FLOAT_TYPES and type_name not in INTEGER_TYPES


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers that get more bits: the first and last eighth, and every
    third layer in between (C integer division; the modulo is only reached for i >= n/8)."""
    eighth = n_layers // 8
    return i_layer < eighth or i_layer >= 7 * n_layers // 8 or (i_layer - eighth) % 3 == 2


def _layer_of(name: str) -> int:
    match = _LAYER_RE.match(name)
    return int(match.group(1)) if match else -1


def llama_order(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    """The order llama.cpp's model loader keeps tensors in (and so writes them): by block number
    (non-block tensors first), then by name (byte order)."""
    return sorted(specs, key=lambda s: (_layer_of(s.name), s.name.encode("utf-8")))


def allows_quantization(spec: TensorSpec) -> bool:
    if spec.n_dims < 2 or not spec.name.endswith("weight"):
        return False
    if spec.name in _NEVER_QUANTIZED_NAMES:
        return False
    return not any(part in spec.name for part in _NEVER_QUANTIZED_PARTS)


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for part, cat in (
        ("attn_qkv.weight", "attn_qkv"),
        ("attn_kv_b.weight", "attn_kv_b"),
        ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"),
        ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"),
        ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if part in name:
            return cat
    return "other"


_ATTN_V_LIKE = frozenset({"attn_v", "attn_qkv", "attn_kv_b"})


def _checked_type(kind: str, type_name: str | None) -> str | None:
    if type_name is None:
        return None
    upper = type_name.strip().upper()
    if upper not in TENSOR_TYPES:
        raise Lora2ggufError(f"{kind} {type_name!r} is not supported; supported: {', '.join(TENSOR_TYPES)}")
    return upper


# ---------------------------------------------------------------------------------------------
# the recipe


class _Counters:
    """Running state of llama.cpp's quantize_state_impl that the recipe reads."""

    def __init__(self, specs: list[TensorSpec], model: ModelInfo, has_imatrix: bool = False) -> None:
        self.has_imatrix = has_imatrix
        self.n_attention_wv = sum(1 for s in specs if _category(s.name) in _ATTN_V_LIKE)
        self.i_attention_wv = 0
        self.n_ffn_down = model.n_layer
        self.i_ffn_down = 0
        self.tied = not any(s.name == "output.weight" for s in specs)


def _layer_info(counter: int, n_layer: int, name: str, model: ModelInfo) -> tuple[int, int]:
    # With experts the counter is not the layer (experts are not consecutive): parse the name.
    if model.n_expert > 1:
        layer = _layer_of(name)
        if not 0 <= layer < n_layer:
            raise Lora2ggufError(
                f"tensor {name}: cannot determine its layer (expected blk.N. with N < {n_layer})"
            )
        return layer, n_layer
    return counter, n_layer


def _mixture_type(
    spec: TensorSpec,
    cat: str,
    new_type: str,
    ftype: str,
    model: ModelInfo,
    st: _Counters,
    output_type: str | None,
) -> tuple[str, str]:
    """llama_tensor_get_type_impl for our file types; returns (type, rule)."""
    if cat == "output" or (st.tied and cat == "token_embd"):
        what = "output head" if cat == "output" else "tied token embedding (output head)"
        if output_type is not None:
            return output_type, f"{what}: --output-tensor-type"
        if model.arch == "falcon":
            return "Q8_0", f"{what}: Q8_0 (falcon)"
        if spec.shape[0] % block_size(new_type) != 0:
            return (
                "Q8_0",
                f"{what}: Q8_0 (row length {spec.shape[0]} not a multiple of {block_size(new_type)})",
            )
        if ftype in _Q5_K_HEAD:
            return "Q5_K", f"{what}: Q5_K ({ftype})"
        if new_type != "Q8_0":
            return "Q6_K", f"{what}: Q6_K"
        return new_type, f"{what}: Q8_0"
    if cat == "token_embd":
        if ftype in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            return "Q2_K", f"token embedding (untied): Q2_K ({ftype})"
        if ftype in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
            return "IQ3_S", f"token embedding (untied): IQ3_S ({ftype})"
        return new_type, "token embedding (untied): default type"
    if ftype in _IQ2_FAMILY:
        return _iq2_family_type(cat, new_type, ftype, model, st)
    if cat in _ATTN_V_LIKE:
        return _attn_v_type(cat, new_type, ftype, model, st)
    if cat == "attn_k":
        if model.n_expert == 8:
            return "Q8_0", "8-expert model: attn_k Q8_0"
        if ftype == "IQ3_XXS":
            return "IQ2_S", "IQ3_XXS: attn_k IQ2_S"
        return new_type, "default type"
    if cat == "attn_q" and ftype == "IQ3_XXS":
        return "IQ2_S", "IQ3_XXS: attn_q IQ2_S"
    if cat == "ffn_down":
        i, n = _layer_info(st.i_ffn_down, st.n_ffn_down, spec.name, model)
        st.i_ffn_down += 1
        return _ffn_down_type(i, n, new_type, ftype, model, st.has_imatrix)
    if cat == "attn_output":
        return _attn_output_type(new_type, ftype, model)
    return new_type, "default type"


def _attn_v_type(cat: str, new_type: str, ftype: str, model: ModelInfo, st: _Counters) -> tuple[str, str]:
    """attn_v / attn_qkv / attn_kv_b (counted together, as llama.cpp's i_attention_wv)."""
    i, n, gqa = st.i_attention_wv, st.n_attention_wv, model.n_gqa
    rule = "default type"
    if ftype == "Q2_K":
        new_type = "Q4_K" if gqa >= 4 else "Q3_K"
        rule = f"n_gqa {gqa} {'>=' if gqa >= 4 else '<'} 4: {new_type}"
    elif ftype == "IQ3_XXS":
        new_type = "Q4_K" if gqa >= 4 else "IQ3_XXS" if st.has_imatrix else "IQ3_S"
        rule = f"IQ3_XXS, n_gqa {gqa}, imatrix {st.has_imatrix}: {new_type}"
    elif ftype == "IQ3_S" and gqa >= 4:
        new_type, rule = "Q4_K", f"n_gqa {gqa} >= 4: Q4_K"
    elif ftype == "IQ3_M":
        new_type, rule = "Q4_K", "IQ3_M: Q4_K"
    elif ftype == "Q3_K_M":
        new_type = "Q5_K" if i < 2 else "Q4_K"
        rule = f"{cat} #{i} {'<' if i < 2 else '>='} 2: {new_type}"
    elif ftype == "Q3_K_L":
        new_type, rule = "Q5_K", "Q3_K_L: Q5_K"
    elif ftype in ("IQ4_NL", "IQ4_XS") and gqa >= 4:
        new_type, rule = "Q5_K", f"n_gqa {gqa} >= 4: Q5_K"
    elif ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
        new_type, rule = "Q6_K", f"use_more_bits({i}, {n}): Q6_K"
    elif ftype == "Q4_K_S" and i < 4:
        new_type, rule = "Q5_K", f"{cat} #{i} < 4: Q5_K"
    if model.is_70b and new_type in ("Q3_K", "Q4_K"):
        new_type, rule = "Q5_K", "70B model: attn_v Q5_K"
    if model.n_expert == 8:
        new_type, rule = "Q8_0", "8-expert model: attn_v Q8_0"
    st.i_attention_wv += 1
    return new_type, rule


def _ffn_down_type(
    i: int, n: int, new_type: str, ftype: str, model: ModelInfo, has_imatrix: bool
) -> tuple[str, str]:
    """ffn_down of layer i of n; the branches in llama.cpp's order (the first that matches wins)."""
    falcon = model.arch == "falcon"
    if ftype == "Q2_K":
        return "Q3_K", "Q2_K: ffn_down Q3_K"
    if ftype == "IQ3_XXS" and not has_imatrix:
        return ("Q4_K", f"no imatrix, layer {i} < {n}/8: Q4_K") if i < n // 8 else ("Q3_K", "IQ3_XXS, no imatrix: Q3_K")
    if ftype == "Q3_K_M":
        if i < n // 16:
            return "Q5_K", f"layer {i} < {n}/16: Q5_K"
        if not falcon:
            return "Q4_K", f"layer {i} >= {n}/16: Q4_K"
        if use_more_bits(i, n):
            return "Q4_K", f"falcon use_more_bits({i}, {n}): Q4_K"
        return "Q3_K", "falcon: default type"
    if ftype == "IQ3_M" and (i < n // 8 or (model.n_expert == 8 and use_more_bits(i, n))):
        return "Q4_K", f"IQ3_M, layer {i} of {n}: Q4_K"
    if ftype == "Q3_K_L":
        return ("Q4_K", "falcon: Q4_K") if falcon else ("Q5_K", "Q3_K_L: ffn_down Q5_K")
    if ftype == "Q4_K_M":
        if falcon:
            if i < n // 16:
                return "Q6_K", f"falcon layer {i} < {n}/16: Q6_K"
            if use_more_bits(i, n):
                return "Q5_K", f"falcon use_more_bits({i}, {n}): Q5_K"
            return "Q4_K", "default type"
        if use_more_bits(i, n):
            return "Q6_K", f"use_more_bits({i}, {n}): Q6_K"
        return new_type, "default type"
    if ftype in ("IQ4_NL", "IQ4_XS") and not has_imatrix and i < n // 8:
        return "Q5_K", f"no imatrix, layer {i} < {n}/8: Q5_K"
    if ftype == "Q5_K_M" and use_more_bits(i, n):
        return "Q6_K", f"use_more_bits({i}, {n}): Q6_K"
    if ftype == "Q4_K_S" and not falcon and i < n // 8:
        return "Q5_K", f"layer {i} < {n}/8: Q5_K"
    if ftype in ("Q4_0", "Q5_0") and has_imatrix and i < n // 8:
        # llama.cpp guards the first ffn_down layers when (and only when) an imatrix is given
        guarded = "Q4_1" if ftype == "Q4_0" else "Q5_1"
        return guarded, f"imatrix, layer {i} < {n}/8: {guarded}"
    return new_type, "default type"


# File types whose attn_output llama.cpp raises to Q5_K in 8-expert models (not Q3_K_L).
_ATTN_OUTPUT_8_EXPERT_Q5_K = frozenset(
    {"Q2_K", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ4_XS", "IQ3_XXS", "IQ3_S", "IQ3_M"}
)
_ATTN_OUTPUT_TYPE = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "IQ3_XXS": "IQ3_S", "IQ3_M": "Q4_K"}


def _iq2_family_type(cat: str, new_type: str, ftype: str, model: ModelInfo, st: _Counters) -> tuple[str, str]:
    """The IQ2_XXS / IQ2_XS / IQ2_S / IQ2_M / IQ1_S / IQ1_M branch of llama_tensor_get_type_impl (it
    replaces the per-category rules of the other file types; ffn_down counts tensors, not layers)."""
    raised = "IQ3_S" if ftype in ("IQ2_S", "IQ2_M") else "Q2_K"
    if cat in _ATTN_V_LIKE:
        st.i_attention_wv += 1
        if model.n_gqa >= 4 or model.n_expert >= 4:
            return "Q4_K", f"n_gqa {model.n_gqa} / n_expert {model.n_expert}: Q4_K"
        return raised, f"{ftype}: {cat} {raised}"
    if model.n_expert == 8 and cat == "attn_k":
        return "Q4_K", "8-expert model: attn_k Q4_K"
    if cat == "ffn_down":
        i, n = st.i_ffn_down, st.n_ffn_down
        st.i_ffn_down += 1
        if i < n // 8:
            return raised, f"ffn_down #{i} < {n}/8: {raised}"
        return new_type, "default type"
    if cat == "attn_output":
        if model.n_expert == 8:
            return "Q5_K", "8-expert model: attn_output Q5_K"
        if ftype in ("IQ1_S", "IQ1_M"):
            return "IQ2_XXS", f"{ftype}: attn_output IQ2_XXS"
        if ftype in ("IQ2_S", "IQ2_M"):
            return "IQ3_S", f"{ftype}: attn_output IQ3_S"
    return new_type, "default type"


def _check_transcribed(spec: TensorSpec, arch: str, chosen: str, pure: bool) -> None:
    """Refuse a tensor that meets an architecture rule of llama.cpp's this recipe does not transcribe."""
    what = "a rule lora2gguf quantize does not transcribe; refusing rather than writing a file that differs from llama-quantize's"
    keep = next((part for part in _UNTRANSCRIBED_KEEP.get(arch, ()) if part in spec.name), None)
    if keep is not None:
        raise Lora2ggufError(
            f"tensor {spec.name}: llama.cpp does not quantize it in a {arch} model "
            f"(tensor_allows_quantization: name contains {keep!r}), {what}"
        )
    floor = next((part for part in _UNTRANSCRIBED_Q8_0_FLOOR.get(arch, ()) if part in spec.name), None)
    theirs = "Q8_0" if spec.shape[0] % block_size("Q8_0") == 0 else "F16"
    if floor is not None and not pure and chosen != theirs:
        raise Lora2ggufError(
            f"tensor {spec.name}: llama.cpp gives it {theirs} in a {arch} model (llama_tensor_get_type_impl: "
            f"name contains {floor!r}, never below Q8_0) where this recipe would give {chosen}, {what}"
        )


def requires_imatrix(name: str, dst_type: str) -> bool:
    """llama.cpp's tensor_requires_imatrix (Q2_K_S, its other case, is not a type we offer)."""
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    return dst_type in IMATRIX_TENSOR_TYPES


def _attn_output_type(new_type: str, ftype: str, model: ModelInfo) -> tuple[str, str]:
    if model.arch == "falcon":
        return ("Q4_K", "falcon Q3_K_L: Q4_K") if ftype == "Q3_K_L" else (new_type, "default type")
    if model.n_expert == 8:
        if ftype in _ATTN_OUTPUT_8_EXPERT_Q5_K:
            return "Q5_K", "8-expert model: attn_output Q5_K"
        return new_type, "default type"
    if ftype in _ATTN_OUTPUT_TYPE:
        return _ATTN_OUTPUT_TYPE[ftype], f"{ftype}: attn_output {_ATTN_OUTPUT_TYPE[ftype]}"
    return new_type, "default type"


def _fallback(spec: TensorSpec, wanted: str) -> tuple[str, dict[str, Any] | None]:
    ncols = spec.shape[0]
    blk = block_size(wanted)
    if ncols % blk == 0:
        return wanted, None
    used = _FALLBACK.get(wanted, wanted if blk <= 32 else None)
    if used is None:
        raise Lora2ggufError(f"tensor {spec.name}: no fallback type is defined for {wanted}")
    reason = f"row length {ncols} is not a multiple of {blk} ({wanted} block size)"
    if ncols % block_size(used) != 0:
        reason += f", nor of {block_size(used)} ({used})"
        used = "F16"
    return used, {"wanted": wanted, "used": used, "reason": reason}


def plan_types(
    specs: Iterable[TensorSpec],
    model: ModelInfo,
    file_type: str,
    *,
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
    pure: bool = False,
    has_imatrix: bool = False,
) -> Plan:
    """Decide every tensor's type the way ``llama_model_quantize`` does (no overrides by pattern;
    ``has_imatrix`` as when importance data is given); tensors come back in llama.cpp's write order."""
    ftype = canonical_type(file_type)
    info = FILE_TYPES[ftype]
    default = info.default_tensor_type
    output_type = _checked_type("--output-tensor-type", output_tensor_type)
    embd_type = _checked_type("--token-embedding-type", token_embedding_type)

    ordered = llama_order(specs)
    names = [s.name for s in ordered]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise Lora2ggufError(f"duplicate tensor names in the input: {', '.join(dup)}")
    st = _Counters(ordered, model, has_imatrix)
    plan = Plan(file_type=ftype, llama_ftype=info.llama_ftype, default_type=default, tied_embeddings=st.tied)

    for spec in ordered:
        shape = [int(n) for n in spec.shape]
        if not allows_quantization(spec):
            why = "1-D tensor kept" if spec.n_dims < 2 else "not quantized by llama.cpp (name rule) kept"
            plan.choices.append(TensorChoice(spec.name, shape, spec.src_type, spec.src_type, why))
            continue
        if spec.src_type in INTEGER_TYPES:
            plan.choices.append(
                TensorChoice(spec.name, shape, spec.src_type, spec.src_type, "integer tensor kept")
            )
            continue
        cat = _category(spec.name)
        forced: tuple[str, str] | None = None
        if embd_type is not None and cat == "token_embd":
            forced = (embd_type, "--token-embedding-type")
        elif output_type is not None and cat == "output":
            forced = (output_type, "--output-tensor-type")
        if forced is not None:
            # llama.cpp applies these verbatim (no fallback); a row length they do not fit is an error.
            if shape[0] % block_size(forced[0]) != 0:
                raise Lora2ggufError(
                    f"tensor {spec.name}: {forced[1]} {forced[0]} needs a row length that is a multiple of "
                    f"{block_size(forced[0])}, got {shape[0]}"
                )
            plan.choices.append(TensorChoice(spec.name, shape, spec.src_type, forced[0], forced[1]))
            continue
        new_type, rule = default, "default type (--pure)" if pure else "default type"
        if not pure:
            new_type, rule = _mixture_type(spec, cat, default, ftype, model, st, output_type)
        final, fb = _fallback(spec, new_type)
        _check_transcribed(spec, model.arch, final, pure)
        if fb is not None:
            logger.debug("%s: %s -> falling back to %s", spec.name, fb["reason"], final)
        plan.choices.append(TensorChoice(spec.name, shape, spec.src_type, final, rule, fb))
    return plan
