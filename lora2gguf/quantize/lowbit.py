"""Low-bit block quantizers (Q2_K, Q3_K, IQ4_NL, IQ4_XS), byte-identical to llama.cpp.

What ``ggml_quantize_chunk`` writes for these types, without and with importance weights (an
imatrix row): the C functions of ggml-quants.c transcribed loop for loop into numba kernels
(:mod:`lora2gguf.quantize._lowbit_numba`, compiled on first use), in float32 scalars in the C
order, so the bytes are the same (``tests/test_quant_lowbit.py`` checks every block against
llama.cpp). The plain Q2_K / Q3_K paths are ggml's reference quantizers
(``quantize_row_q2_K_ref`` / ``quantize_row_q3_K_ref``); IQ4_NL and IQ4_XS have a single
algorithm (``quantize_row_iq4_nl_impl``, 7 trial scales per 32 weights) with x^2 or
imatrix-derived weights.

IQ4_NL's 16 non-linear levels are a format fact, read from gguf-py (``gguf.quants.IQ4_NL.kvalues``,
the same table as ggml-common.h's ``kvalues_iq4nl``; the tests compare it with llama.cpp's own
dequantization).
"""

from __future__ import annotations

import gguf
import numpy as np

TYPES = ("Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS")

# IQ4_NL / IQ4_XS levels, ascending (the bisection of best_index_int8 relies on it).
IQ4_LEVELS = np.asarray(gguf.quants.IQ4_NL.kvalues, dtype=np.float32)
assert np.all(np.diff(IQ4_LEVELS) > 0), "IQ4_NL levels must be ascending"


def checked_rows(
    type_name: str, rows: np.ndarray, quant_weights: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The rows as contiguous float32 ``(n_rows, n_cols)``, the importance weights checked against
    them (None stays None), and the zeroed output of ``type_name``'s blocks."""
    x = np.ascontiguousarray(rows, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{type_name}: expected a 2-D (n_rows, n_cols) array, got shape {x.shape}")
    blk, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    if x.shape[1] % blk:
        raise ValueError(f"{type_name}: row length {x.shape[1]} is not a multiple of {blk}")
    qw = None
    if quant_weights is not None:
        qw = np.ascontiguousarray(quant_weights, dtype=np.float32)
        if qw.shape != (x.shape[1],):
            raise ValueError(f"importance weights have shape {qw.shape}, expected ({x.shape[1]},)")
    return x, qw, np.zeros((x.shape[0], x.shape[1] // blk * size), dtype=np.uint8)


def _kernels():  # type: ignore[no-untyped-def]
    from lora2gguf.quantize import _lowbit_numba

    return _lowbit_numba


def quantize(type_name: str, rows: np.ndarray, quant_weights: np.ndarray | None = None) -> np.ndarray:
    """float32 ``(rows, n_per_row)`` -> uint8 ``(rows, row_bytes)`` in ``type_name``; the row length
    must be a multiple of the block size. ``quant_weights``: one importance per column, or None."""
    if type_name not in TYPES:
        raise ValueError(f"no low-bit quantizer for {type_name}; supported: {', '.join(TYPES)}")
    x, qw, out = checked_rows(type_name, rows, quant_weights)
    blk = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0]
    if x.size == 0:
        return out
    k = _kernels()
    with np.errstate(all="ignore"):  # C semantics on degenerate blocks (inf / nan), as in C
        if type_name in ("IQ4_NL", "IQ4_XS"):
            dummy = np.zeros(1, np.float32)
            k.iq4(x, dummy if qw is None else qw, qw is not None, IQ4_LEVELS, blk, out)
        elif qw is None:
            getattr(k, f"{type_name.lower()}_ref")(x, out)
        else:
            getattr(k, f"{type_name.lower()}_impl")(x, qw, out)
    return out
