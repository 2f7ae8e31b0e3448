"""LlamaForCausalLM (Llama 1-3.x, SmolLM/SmolLM2) and MistralForCausalLM -> ``llama``.

llama.cpp's Llama converter serves both classes: q/k rows permuted to its interleaved RoPE layout,
``llama.vocab_size`` and ``llama.rope.dimension_count`` written, the vocabulary read from
``tokenizer.model`` (SentencePiece: Llama 1/2, Mistral) when the folder has one, else from
``tokenizer.json`` (byte-level BPE: Llama 3, SmolLM). Llama 3.1+'s ``rope_type: llama3`` scaling
becomes a generated ``rope_freqs.weight`` tensor of per-frequency factors.
"""

from __future__ import annotations

import logging
import math

import gguf
import numpy as np

from lora2gguf.archs.base import BASE_ROPE_TYPES, ArchSpec, HParams
from lora2gguf.errors import Lora2ggufError

logger = logging.getLogger(__name__)


def _power(base: np.float32, exponents: np.ndarray) -> np.ndarray:
    """float32 base ** exponents, rounded as llama.cpp's converter gets it from torch.

    torch's float32 pow (SLEEF, 1-ulp accurate) differs from the correctly rounded value in the last
    bit for about 1 element in 200, so torch is used when it is installed (the workflow's
    environment always has it, for the merge); without it, the correctly rounded float64 result.
    """
    try:
        import torch
    except ImportError:
        logger.debug("torch not installed: llama3 RoPE frequencies from float64 pow (may differ from "
                     "llama.cpp's converter in the last bit of a few factors)")
        return np.power(np.float64(base), exponents.astype(np.float64)).astype(np.float32)
    return (float(base) ** torch.from_numpy(exponents)).numpy()


def llama3_rope_factors(hp: HParams) -> np.ndarray:
    """Per rotary frequency, the factor Llama 3.1's long-context scaling divides it by.

    Frequencies with wavelengths shorter than original_max_position_embeddings / high_freq_factor
    keep their value (factor 1), those longer than ... / low_freq_factor are divided by ``factor``,
    and the band between is interpolated. Computed in float32 like llama.cpp's converter (it uses
    torch float32 tensors), so the written tensor has the same bytes.
    """
    rope = hp.rope_scaling
    base = float(hp.rope_theta if hp.rope_theta is not None else 10000.0)
    dim = hp.n_embd_head
    factor = float(rope.get("factor", 8.0))
    low_freq_factor = float(rope.get("low_freq_factor", 1.0))
    high_freq_factor = float(rope.get("high_freq_factor", 4.0))
    old_context_len = float(rope.get("original_max_position_embeddings", 8192))
    if high_freq_factor == low_freq_factor:
        raise Lora2ggufError(f"{hp.config_path}: rope llama3 scaling needs low_freq_factor != high_freq_factor")
    f32 = np.float32
    # torch evaluates "a / tensor" as reciprocal(tensor) * a, and casts Python scalars to float32:
    # the same steps here give the same roundings.
    exponents = np.arange(0, dim, 2, dtype=f32) / f32(dim)
    freqs = f32(1) / _power(f32(base), exponents)
    wavelen = (f32(1) / freqs) * f32(2 * math.pi)
    smooth = ((f32(1) / wavelen) * f32(old_context_len) - f32(low_freq_factor)) / f32(high_freq_factor - low_freq_factor)
    mid = f32(1) / ((f32(1) - smooth) / f32(factor) + smooth)
    high_freq_wavelen = f32(old_context_len / high_freq_factor)
    low_freq_wavelen = f32(old_context_len / low_freq_factor)
    factors = np.where(wavelen < high_freq_wavelen, f32(1), np.where(wavelen > low_freq_wavelen, f32(factor), mid))
    return factors.astype(np.float32)


def _extra_tensors(hp: HParams) -> list[tuple[str, np.ndarray]]:
    if str(hp.rope_scaling.get("rope_type") or "").lower() != "llama3":
        return []
    return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(hp))]


def _check(hp: HParams) -> None:
    window = hp.config.get("sliding_window")
    if isinstance(window, int) and not isinstance(window, bool) and 0 < window < hp.context_length:
        # Mistral 7B v0.1: HF masks attention beyond the window; llama.cpp's llama graph (and its
        # converter, which writes no window for this class) attends to the whole context.
        logger.warning(
            "%s: sliding_window=%d is not carried into the llama GGUF (llama.cpp's converter drops it too); "
            "outputs differ from Hugging Face beyond %d tokens of context",
            hp.config_path, window, window,
        )


LLAMA = ArchSpec(
    gguf_arch=gguf.MODEL_ARCH.LLAMA,
    hf_architectures=("LlamaForCausalLM", "MistralForCausalLM"),
    permute_qk=True,
    write_vocab_size=True,
    write_rope_dimension_count=True,
    write_add_space_prefix=True,
    rope_types=BASE_ROPE_TYPES | {"llama3"},
    vocab="spm-or-bpe",
    extra_tensors=_extra_tensors,
    check=_check,
)
