"""numba kernels of ggml's reference quantizers for the 32-weight block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).

Each kernel follows one ``quantize_row_*_ref`` of ggml-quants.c loop for loop in float32 scalars, so
the bytes are those of ``ggml_quantize_chunk`` without importance weights. numba keeps float32 for
float32 operands and, without fastmath, neither reorders nor fuses operations; the numpy encoders
(gguf-py's) give the same bytes, and ``tests/test_quant.py`` checks both against llama.cpp.
Compiled with ``nogil`` so the quantizer's thread pool runs them on every core.

``X`` is ``(rows, n_per_row)`` float32 with ``n_per_row`` a multiple of 32, ``OUT`` the
``(rows, row_bytes)`` uint8 result.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from lora2gguf.quantize._weighted_numba import _put_qs_qh, _store_fp16

_QK = 32
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_F32_MAX = np.float32(np.finfo(np.float32).max)


@njit(inline="always", cache=True, error_model="numpy")
def _signed_absmax(x, start):  # pragma: no cover - compiled
    """The block's value of largest magnitude, with its sign (the first one on a tie), and that magnitude."""
    amax = _ZERO
    vmax = _ZERO
    for j in range(_QK):
        v = x[start + j]
        if amax < abs(v):
            amax = abs(v)
            vmax = v
    return vmax, amax


@njit(inline="always", cache=True, error_model="numpy")
def _min_max(x, start):  # pragma: no cover - compiled
    lo = _F32_MAX
    hi = -_F32_MAX
    for j in range(_QK):
        v = x[start + j]
        if v < lo:
            lo = v
        if v > hi:
            hi = v
    return lo, hi


@njit(inline="always", cache=True, error_model="numpy")
def _inverse(d):  # pragma: no cover - compiled
    return _ONE / d if d != _ZERO else _ZERO


@njit(inline="always", cache=True, error_model="numpy")
def _symmetric(X, OUT, half, block_bytes):  # pragma: no cover - compiled
    """quantize_row_q4_0_ref (half 8) / q5_0_ref (half 16): d = max / -half (signed abs-max),
    q = min(2 * half - 1, (int8)(x/d + half + 0.5)); Q5_0's fifth bits in a 32-bit qh before the nibbles.
    Inlined into each type's kernel, so the constants fold as in a hand-written one."""
    top = 2 * half - 1
    divisor = np.float32(-half)
    offset = np.float32(half + 0.5)
    L = np.empty(_QK, np.int64)
    fbuf = np.empty(1, np.float32)
    ubuf = fbuf.view(np.uint32)
    for r in range(X.shape[0]):
        x = X[r]
        for i in range(X.shape[1] // _QK):
            s, o = i * _QK, i * block_bytes
            vmax, _ = _signed_absmax(x, s)
            d = vmax / divisor
            inv = _inverse(d)
            _store_fp16(OUT[r], o, d, fbuf, ubuf)
            for j in range(_QK):
                L[j] = min(top, int(x[s + j] * inv + offset))
            _put_qs_qh(OUT[r], o + block_bytes - 16, L, half == 16)


@njit(inline="always", cache=True, error_model="numpy")
def _affine(X, OUT, top, block_bytes):  # pragma: no cover - compiled
    """quantize_row_q4_1_ref (top 15) / q5_1_ref (top 31): d = (max - min) / top, m = min,
    q = (x - min)/d + 0.5 truncated; Q5_1's fifth bits in a 32-bit qh before the nibbles. ggml clamps
    Q4_1's level to 15 and not Q5_1's: (max - min)/d + 0.5 stays below 31.5, so the clamp is a no-op there."""
    divisor = np.float32(top)
    L = np.empty(_QK, np.int64)
    fbuf = np.empty(1, np.float32)
    ubuf = fbuf.view(np.uint32)
    for r in range(X.shape[0]):
        x = X[r]
        for i in range(X.shape[1] // _QK):
            s, o = i * _QK, i * block_bytes
            lo, hi = _min_max(x, s)
            d = (hi - lo) / divisor
            inv = _inverse(d)
            _store_fp16(OUT[r], o, d, fbuf, ubuf)
            _store_fp16(OUT[r], o + 2, lo, fbuf, ubuf)
            for j in range(_QK):
                L[j] = min(top, int((x[s + j] - lo) * inv + np.float32(0.5)))
            _put_qs_qh(OUT[r], o + block_bytes - 16, L, top == 31)


@njit(cache=True, nogil=True, error_model="numpy")
def q4_0(X, OUT):  # pragma: no cover - compiled
    _symmetric(X, OUT, 8, 18)


@njit(cache=True, nogil=True, error_model="numpy")
def q5_0(X, OUT):  # pragma: no cover - compiled
    _symmetric(X, OUT, 16, 22)


@njit(cache=True, nogil=True, error_model="numpy")
def q4_1(X, OUT):  # pragma: no cover - compiled
    _affine(X, OUT, 15, 20)


@njit(cache=True, nogil=True, error_model="numpy")
def q5_1(X, OUT):  # pragma: no cover - compiled
    _affine(X, OUT, 31, 24)


@njit(cache=True, nogil=True, error_model="numpy")
def q8_0(X, OUT):  # pragma: no cover - compiled
    """quantize_row_q8_0_ref: d = absmax / 127, q = roundf(x/d) (half away from zero)."""
    fbuf = np.empty(1, np.float32)
    ubuf = fbuf.view(np.uint32)
    for r in range(X.shape[0]):
        x = X[r]
        for i in range(X.shape[1] // _QK):
            s, o = i * _QK, i * 34
            _, amax = _signed_absmax(x, s)
            d = amax / np.float32(127.0)
            inv = _inverse(d)
            _store_fp16(OUT[r], o, d, fbuf, ubuf)
            for j in range(_QK):
                v = x[s + j] * inv
                # roundf: half away from zero; floor(|v| + 0.5) would round 0.49999997 up
                a = abs(v)
                w = np.floor(a)
                q = w + np.floor((a - w) * np.float32(2.0))
                OUT[r, o + 2 + j] = (int(q) if v >= _ZERO else -int(q)) & 0xFF
