"""Per-tensor decisions (GGUF name, output type, byte size) and the data conversion itself."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import gguf
import numpy as np

from lora2gguf.errors import Lora2ggufError
from lora2gguf.archs import SKIP_SUFFIXES, ArchSpec, HParams
from lora2gguf.archs.base import TensorHook
from lora2gguf.convert.hparams import permute_qk
from lora2gguf.formats.safetensors import TensorEntry

logger = logging.getLogger(__name__)

QT = gguf.GGMLQuantizationType

# --outtype -> (file type recorded in general.file_type, type of the 2-D weight matrices)
OUTTYPES: dict[str, tuple[gguf.LlamaFileType, gguf.GGMLQuantizationType]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, QT.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, QT.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, QT.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, QT.Q8_0),
}
F16_MAX = float(np.finfo(np.float16).max)  # 65504


@dataclass
class TensorPlan:
    """One tensor to write: where it comes from and what it becomes.

    ``entry`` is the checkpoint tensor it is read from; a tensor the architecture generates from the
    config (llama3's rope_freqs) has none and carries its ``generated`` values instead.
    """

    entry: TensorEntry | None
    gguf_name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    nbytes: int
    permute_heads: int | None = None  # n_head for the q/k row permutation, None for none
    transform: TensorHook | None = None  # the family's change to the values (Gemma: norm + 1)
    generated: np.ndarray | None = None

    @property
    def n_elements(self) -> int:
        if self.entry is None:
            return int(self.generated.size) if self.generated is not None else 0
        return self.entry.n_elements

    @property
    def source(self) -> str:
        """Where the values come from, for error messages: '<file>: tensor <name>'."""
        if self.entry is None:
            return f"generated tensor {self.gguf_name!r}"
        return f"{self.entry.path}: tensor {self.entry.name!r}"


def _is_float(entry: TensorEntry) -> bool:
    return entry.dtype in ("F64", "F32", "F16", "BF16")


def choose_qtype(gguf_name: str, shape: tuple[int, ...], weight_type: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """llama.cpp's rule: 1-D tensors, norms and anything not named *.weight stay F32; matrices get the out type."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return QT.F32
    if weight_type == QT.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[QT.Q8_0][0] != 0:
        # Q8_0 needs rows that split into blocks of 32; llama.cpp's converter keeps such a tensor F16.
        logger.warning("%s: row length %d is not a multiple of 32, written as F16 instead of Q8_0", gguf_name, shape[-1])
        return QT.F16
    return weight_type


def type_nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    count = 1
    for dim in shape:
        count *= dim
    return count // block * size


def plan_tensors(
    entries: list[TensorEntry], spec: ArchSpec, hp: HParams, outtype: str, model_dir: str
) -> tuple[list[TensorPlan], list[str]]:
    """Map every checkpoint tensor to its GGUF name and type; returns (plans, skipped names).

    An unknown tensor name fails the conversion: dropping it silently would produce a model that
    loads and then computes something else.
    """
    weight_type = OUTTYPES[outtype][1]
    name_map = gguf.get_tensor_name_map(spec.gguf_arch, hp.block_count)
    plans: list[TensorPlan] = []
    skipped: list[str] = []
    names = {e.name for e in entries}
    for entry in entries:
        name = entry.name
        if name.endswith(SKIP_SUFFIXES) or name in spec.skip_names:
            skipped.append(name)
            continue
        if not _is_float(entry):
            raise Lora2ggufError(f"{entry.path}: tensor {name!r} has dtype {entry.dtype}; expected floating point weights")
        if name == "lm_head.weight" and hp.tie_word_embeddings and "model.embed_tokens.weight" in names:
            # Tied model saved with a duplicate head: llama.cpp reuses token_embd.weight, so the
            # copy is left out; convert.py checks it really is a copy before writing anything.
            skipped.append(name)
            continue
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise Lora2ggufError(
                f"{entry.path}: tensor {name!r} has no {spec.name} GGUF name (unexpected for "
                f"{'/'.join(spec.hf_architectures)}; is this a plain, fully merged model?)"
            )
        shape = entry.shape
        qtype = choose_qtype(gguf_name, shape, weight_type)
        permute = None
        if spec.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
            permute = hp.head_count
        elif spec.permute_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
            permute = hp.n_head_kv
        plans.append(TensorPlan(entry, gguf_name, shape, qtype, type_nbytes(shape, qtype), permute, spec.transform))
    _check_shapes(plans, hp, model_dir)
    return _generated_plans(spec, hp, weight_type) + plans, skipped


def _generated_plans(spec: ArchSpec, hp: HParams, weight_type: gguf.GGMLQuantizationType) -> list[TensorPlan]:
    """Tensors the family computes from the config; llama.cpp's converter writes them first."""
    plans = []
    for gguf_name, values in spec.extra_tensors(hp) if spec.extra_tensors is not None else []:
        shape = tuple(values.shape)
        qtype = choose_qtype(gguf_name, shape, weight_type)
        plans.append(TensorPlan(None, gguf_name, shape, qtype, type_nbytes(shape, qtype), generated=values))
    return plans


def _check_shapes(plans: list[TensorPlan], hp: HParams, model_dir: str) -> None:
    by_name = {p.gguf_name: p for p in plans}
    embd = by_name.get("token_embd.weight")
    if embd is None:
        raise Lora2ggufError(f"{model_dir}: no token embedding tensor (model.embed_tokens.weight) in the weight files")
    if embd.shape != (hp.vocab_size, hp.embedding_length):
        raise Lora2ggufError(
            f"{embd.entry.path}: tensor {embd.entry.name!r} has shape {list(embd.shape)} but config.json says "
            f"vocab_size={hp.vocab_size}, hidden_size={hp.embedding_length} (embeddings resized without updating "
            "config.json, or the wrong config?)"
        )
    out = by_name.get("output.weight")
    if out is None and not hp.tie_word_embeddings:
        raise Lora2ggufError(
            f"{model_dir}: config.json has tie_word_embeddings=false but there is no lm_head.weight tensor"
        )
    if out is not None and out.shape != embd.shape:
        raise Lora2ggufError(f"{out.entry.path}: tensor 'lm_head.weight' has shape {list(out.shape)}, expected {list(embd.shape)}")
    # Every layer has its query projection, alone (attn_q) or fused with k and v (Phi-3's attn_qkv).
    missing = sorted(
        f"blk.{i}.attn_q.weight" for i in range(hp.block_count)
        if f"blk.{i}.attn_q.weight" not in by_name and f"blk.{i}.attn_qkv.weight" not in by_name
    )
    if missing:
        raise Lora2ggufError(f"{model_dir}: layers missing from the weight files (e.g. {missing[0]}); num_hidden_layers={hp.block_count}")


def convert_data(plan: TensorPlan, data: np.ndarray) -> np.ndarray:
    """Turn a source tensor, or a block of its rows, into the bytes GGUF stores for it.

    Every output type here works row by row (F32/F16/BF16 element-wise, Q8_0 in blocks of 32
    within a row), so converting row blocks gives the same bytes as converting the whole tensor.
    """
    if plan.permute_heads is not None:
        try:
            data = permute_qk(data, plan.permute_heads)
        except ValueError as exc:
            raise Lora2ggufError(f"{plan.source}: {exc}") from None
    if data.dtype == np.float64:
        data = data.astype(np.float32)
    if plan.transform is not None and plan.entry is not None:
        # In the source's precision (f16 stays f16, bf16 was widened to f32), as llama.cpp's
        # converter applies it to its torch tensor before choosing the output type.
        data = plan.transform(plan.entry.name, data)
    # A NaN/Inf in the source would be written as is and make llama.cpp compute NaN logits; refuse it
    # here, naming the tensor, rather than hand over a GGUF that loads but cannot work.
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        count = int((~np.isfinite(data)).sum())
        raise Lora2ggufError(
            f"{plan.source} ({plan.gguf_name}) holds {count} NaN/Inf value(s); "
            "the model is broken (check the merge or the base checkpoint)"
        )
    if plan.qtype == QT.F32:
        out = data.astype(np.float32, copy=False)
    elif plan.qtype == QT.F16:
        with np.errstate(over="ignore"):  # overflow is detected and reported just below
            out = data.astype(np.float16)
        if not np.isfinite(out).all():
            bad = np.isfinite(data) & ~np.isfinite(out)
            if bad.any():
                peak = float(np.abs(data[bad]).max())
                raise Lora2ggufError(
                    f"{plan.source} ({plan.gguf_name}) has values up to {peak:g}, "
                    f"beyond the float16 range (+-{F16_MAX:g}); F16 would turn them into inf. Use --outtype bf16 "
                    "(or f32) instead."
                )
    else:
        # BF16 and Q8_0 through gguf-py's reference-exact quantizers (float32 input).
        out = gguf.quants.quantize(np.asarray(data, dtype=np.float32), plan.qtype)
    if out.nbytes != type_nbytes(data.shape, plan.qtype):
        raise AssertionError(f"{plan.gguf_name}: produced {out.nbytes} bytes for shape {data.shape}")
    return out
