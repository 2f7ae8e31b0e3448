"""Block encoders: float32 rows -> the bytes of one ggml tensor type.

The legacy 32-weight block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) are ggml's reference quantizers
(``quantize_row_q*_ref``) in float32: numba kernels (:mod:`lora2gguf.quantize._legacy_numba`, loop for
loop) or, with the numpy backend, gguf-py's ``quantize_blocks`` (Q8_0: our leaner copy of the same
arithmetic). Both give the same abs-max / min-max scale, the same ``1/d``, truncation after ``+ 8.5``
/ ``+ 16.5`` / ``+ 0.5``, and for Q8_0 rounding half away from zero like C's ``roundf``;
``tests/test_quant.py`` checks both byte-identical to llama.cpp's ``ggml_quantize_chunk``.
The K-quants (Q4_K, Q5_K, Q6_K), which gguf-py cannot encode, come from
:mod:`lora2gguf.quantize.kquants`; the low-bit types (Q2_K, Q3_K, IQ4_NL, IQ4_XS) from
:mod:`lora2gguf.quantize.lowbit`; the lattice types (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S) from
:mod:`lora2gguf.quantize.iquants`.
"""

from __future__ import annotations

from collections.abc import Callable

import gguf
import numpy as np

from lora2gguf.quantize import iquants, kquants, lowbit
from lora2gguf.quantize.recipe import BLOCK

LEGACY_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
K_TYPES = ("Q4_K", "Q5_K", "Q6_K")
LOWBIT_TYPES = lowbit.TYPES
IQ_TYPES = iquants.TYPES
IQ_NEED_WEIGHTS = iquants.NEED_WEIGHTS
ENCODABLE = ("F32", "F16", *LEGACY_TYPES, *K_TYPES, *LOWBIT_TYPES, *IQ_TYPES)


# Blocks encoded per numpy call: gguf-py's quantize() works in groups of 16 rows, which for
# short rows means many tiny numpy calls; ~2k blocks (64k weights) per call measured 2x faster
# here, while the temporaries still fit in the L2 cache.
_LEGACY_BLOCKS_PER_CALL = 2048


def _q8_0_blocks(blocks: np.ndarray) -> np.ndarray:
    """Q8_0 as ggml's quantize_row_q8_0_ref: d = absmax/127, q = roundf(x/d). Same operations as
    gguf-py's Q8_0 (verified byte-identical to ggml), with fewer temporaries: gguf-py's version
    measured 3-4x slower on 64k-weight chunks."""
    n = blocks.shape[0]
    d = np.abs(blocks).max(axis=1) / np.float32(127)
    inv = np.zeros_like(d)
    np.divide(np.float32(1), d, out=inv, where=d != 0)
    t = blocks * inv[:, None]
    # roundf (half away from zero), exactly: floor(a) + floor(2 * frac(a)); every step is exact in
    # float32, unlike floor(a + 0.5), which rounds 0.49999997 up.
    a = np.abs(t)
    whole = np.floor(a)
    a -= whole
    a *= np.float32(2)
    np.floor(a, out=a)
    a += whole
    np.copysign(a, t, out=a)
    out = np.empty((n, 34), dtype=np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(n, 2)
    out[:, 2:] = a.astype(np.int8).view(np.uint8)
    return out


def _legacy(type_name: str) -> Callable[[np.ndarray], np.ndarray]:
    type_size = BLOCK[type_name][1]
    if kquants.resolve_backend() == "numba":
        from lora2gguf.quantize import _legacy_numba

        kernel = getattr(_legacy_numba, type_name.lower())

        def encode_numba(rows: np.ndarray) -> np.ndarray:
            out = np.empty((rows.shape[0], rows.shape[1] // 32 * type_size), dtype=np.uint8)
            with np.errstate(all="ignore"):  # C semantics on degenerate blocks, as the numpy path
                kernel(rows, out)
            return out

        return encode_numba
    quantize_blocks = _q8_0_blocks if type_name == "Q8_0" else getattr(gguf.quants, type_name).quantize_blocks

    def encode(rows: np.ndarray) -> np.ndarray:
        flat = rows.reshape(-1, 32)
        out = np.empty((flat.shape[0], type_size), dtype=np.uint8)
        for start in range(0, flat.shape[0], _LEGACY_BLOCKS_PER_CALL):
            stop = start + _LEGACY_BLOCKS_PER_CALL
            out[start:stop] = quantize_blocks(flat[start:stop])
        return out.reshape(rows.shape[0], -1)

    return encode


def _k_quant(type_name: str) -> Callable[[np.ndarray], np.ndarray]:
    return {"Q4_K": kquants.quantize_q4_k, "Q5_K": kquants.quantize_q5_k, "Q6_K": kquants.quantize_q6_k}[
        type_name
    ]


def _f16(rows: np.ndarray) -> np.ndarray:
    # numpy rounds to nearest even, as ggml's fp32 -> fp16 conversion does.
    return rows.astype(np.float16).view(np.uint8)


def _f32(rows: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rows, dtype=np.float32).view(np.uint8)


def encoder(type_name: str) -> Callable[[np.ndarray], np.ndarray]:
    """A function mapping float32 ``(rows, n_per_row)`` to uint8 ``(rows, row_bytes)``."""
    if type_name == "F32":
        return _f32
    if type_name == "F16":
        return _f16
    if type_name in LEGACY_TYPES:
        return _legacy(type_name)
    if type_name in K_TYPES:
        return _k_quant(type_name)
    if type_name in LOWBIT_TYPES:
        return lambda rows: lowbit.quantize(type_name, rows)
    if type_name in IQ_TYPES:
        return lambda rows: iquants.quantize(type_name, rows)
    raise ValueError(f"no encoder for ggml type {type_name}; supported: {', '.join(ENCODABLE)}")


# llama.cpp's importance-weighted quantizers (quantize_row_*_impl). Q8_0, F16 and F32 have none:
# ggml's quantize_q8_0 ignores its quant_weights argument, and so do we.
WEIGHTED_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", *LOWBIT_TYPES, *IQ_TYPES)


def _encode_weighted(type_name: str, rows: np.ndarray, quant_weights: np.ndarray) -> np.ndarray:
    from lora2gguf.quantize import _weighted_numba

    qw = np.ascontiguousarray(quant_weights, dtype=np.float32)
    if qw.shape != (rows.shape[1],):
        raise ValueError(f"importance weights have shape {qw.shape}, expected ({rows.shape[1]},)")
    blk, size = BLOCK[type_name]
    out = np.empty((rows.shape[0], rows.shape[1] // blk * size), dtype=np.uint8)
    kernel = getattr(_weighted_numba, type_name.lower())
    with np.errstate(all="ignore"):  # C semantics on degenerate blocks, as the reference paths
        kernel(rows, qw, out)
    return out


def encode(type_name: str, rows: np.ndarray, quant_weights: np.ndarray | None = None) -> np.ndarray:
    """Encode float32 rows; the row length must be a multiple of the type's block size.

    ``quant_weights`` (one importance per column, e.g. an imatrix row) selects llama.cpp's
    importance-weighted quantizer for the types in WEIGHTED_TYPES; other types ignore it, as
    ggml does."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2:
        raise ValueError(f"expected a 2-D array of rows, got shape {rows.shape}")
    blk, size = BLOCK[type_name]
    if rows.shape[1] % blk:
        raise ValueError(f"row length {rows.shape[1]} is not a multiple of the {type_name} block size {blk}")
    if quant_weights is not None and type_name in LOWBIT_TYPES:
        return lowbit.quantize(type_name, rows, quant_weights)
    if type_name in IQ_TYPES:
        return iquants.quantize(type_name, rows, quant_weights)
    if quant_weights is not None and type_name in WEIGHTED_TYPES:
        return _encode_weighted(type_name, rows, quant_weights)
    out = encoder(type_name)(rows)
    expected = (rows.shape[0], rows.shape[1] // blk * size)
    if out.dtype != np.uint8 or out.shape != expected:
        out = np.ascontiguousarray(out).view(np.uint8).reshape(expected)
    return out


def decode_finite(type_name: str, data: np.ndarray, n_per_row: int) -> tuple[np.ndarray, int]:
    """``decode``, and the first row holding a NaN or Inf (-1: none). For F16 (the usual source)
    the numba widening finds it in the same pass; otherwise a separate pass looks."""
    if type_name == "F16" and kquants.resolve_backend() == "numba":
        from lora2gguf.quantize._f16_numba import widen_f16

        values, first = widen_f16(np.asarray(data).view(np.uint16).reshape(-1, n_per_row))
        return values, -1 if first < 0 else first // n_per_row
    values = decode(type_name, data, n_per_row)
    finite = np.isfinite(values)
    return values, -1 if finite.all() else int(np.argwhere(~finite)[0][0])


def decode(type_name: str, data: np.ndarray, n_per_row: int) -> np.ndarray:
    """Bytes (or F16/F32 values) of whole rows -> float32 ``(rows, n_per_row)``."""
    if type_name == "F32":
        return np.asarray(data).view(np.float32).reshape(-1, n_per_row)
    if type_name == "F16":
        if kquants.resolve_backend() == "numba":
            from lora2gguf.quantize._f16_numba import widen_f16

            return widen_f16(np.asarray(data).view(np.uint16).reshape(-1, n_per_row))[0]
        return np.asarray(data).view(np.float16).reshape(-1, n_per_row).astype(np.float32)
    if type_name == "BF16":
        # bfloat16 is the top half of a float32: widening is exact.
        raw = np.asarray(data).view(np.uint16).reshape(-1, n_per_row).astype(np.uint32) << np.uint32(16)
        return raw.view(np.float32)
    qtype = gguf.GGMLQuantizationType[type_name]
    raw = np.asarray(data).view(np.uint8)
    blk, size = BLOCK.get(type_name, gguf.GGML_QUANT_SIZES[qtype])
    raw = raw.reshape(-1, n_per_row // blk * size)
    return gguf.quants.dequantize(raw, qtype).reshape(-1, n_per_row).astype(np.float32, copy=False)
