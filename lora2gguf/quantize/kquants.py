"""K-quant block quantizers (Q4_K, Q5_K, Q6_K) in numpy, byte-identical to llama.cpp.

These reproduce ggml's reference (no importance matrix) quantizers, i.e. what
``llama-quantize`` writes for Q4_K / Q5_K / Q6_K tensors when no imatrix is
given.  The algorithms were read from ggml's ``ggml-quants.c`` and re-written
here in vectorised form; nothing is copied.

Why the results are bit-exact: ggml's reference quantizers live in the base
library, which is compiled without CPU-specific flags, so they run as plain
IEEE float32 arithmetic (no fused multiply-add, sums accumulated in index
order).  We mirror that:

* every sum over the 16/32 values of a sub-block is an ``np.add.reduce`` over
  axis 0 of a ``(positions, sub_blocks)`` array -- numpy accumulates an outer
  axis row after row, i.e. in index order (a reduction along the contiguous
  axis would use pairwise summation and differ in the last bit);
* every product / sum / quotient is done in float32 in the C expression's
  order (``w*l*x`` is ``(w*l)*x``);
* ``nearest_int`` (the ``x + 1.5*2**23`` float trick) is emulated bit for bit;
  inside the hot candidate loop ``np.rint`` is used instead when a cheap bound
  proves every argument is in the range where the two agree;
* fp16 conversion is ``astype(np.float16)`` (round to nearest even, like ggml);
* inside the scale/min search (``make_qkx2_quants``) a winning candidate
  replaces the running minimum, and later candidates are computed from it.

Two backends give the same bytes: pure numpy (always available), and numba
kernels for the two search loops (``_kq_numba``, used when numba is installed;
about 4x faster than numpy and faster than llama.cpp's own C).  Choose with the
``backend`` argument or $LORA2GGUF_KQUANTS_BACKEND (numpy | numba | auto).
Nothing keeps global state; numpy and the numba kernels (``nogil``) release
the GIL, so a thread pool over row chunks runs them in parallel.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import numpy as np

logger = logging.getLogger(__name__)

QK_K = 256
#: bytes per 256-weight super-block
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}

_F32 = np.float32
_F16 = np.float16
_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23: adding it leaves round(x) in the low mantissa bits
_NEAREST_SAFE = 4194303.0  # |x| up to this: nearest_int(x) == rint(x)
_GROUP_MAX_EPS = np.float32(1e-15)
# super-blocks processed together (64k weights): big enough that numpy's per-call
# overhead is small against the work, small enough that the (positions,
# sub-blocks) temporaries stay in L2/L3 and memory stays bounded (a few MiB)
_CHUNK_SUPERBLOCKS = 256
# numba kernels: larger chunks amortise the numpy packing around them
_CHUNK_SUPERBLOCKS_NUMBA = 256


# --------------------------------------------------------------------------- helpers


def _nearest_int(t: np.ndarray) -> np.ndarray:
    """ggml's nearest_int, bit for bit, for any float32 input (int32 result).

    For |t| <= 4194303 this is round-half-to-even; beyond that the C trick
    returns the low mantissa bits of ``t + 1.5*2**23`` and so do we.
    """
    v = np.add(t, _MAGIC, dtype=_F32)
    i = v.view(np.int32)
    i &= 0x7FFFFF
    i -= 0x400000
    return i


def _nearest_clamped_f32(
    t: np.ndarray, lo: np.ndarray | float, hi: np.ndarray | float, exact: bool
) -> np.ndarray:
    """clamp(nearest_int(t), lo, hi) as float32, overwriting ``t`` where possible.

    Pass lo/hi as full arrays of t's shape in hot loops: numpy's maximum/minimum
    against a full array is several times faster than against a scalar.
    """
    if exact:
        t = _nearest_int(t).astype(_F32)
    else:
        np.rint(t, out=t)
    np.maximum(t, lo, out=t)
    np.minimum(t, hi, out=t)
    return t


def _running_min_max(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column: C's `min = x[0]; if (x[i] < min) min = x[i]` (and max) over axis 0.

    Equal to X.min/X.max except with NaNs, which the C comparisons skip
    (numpy's min would propagate them); the loop runs only when a NaN is present.
    """
    if not np.isnan(X).any():
        return X.min(axis=0), X.max(axis=0)
    mn = X[0].copy()
    mx = X[0].copy()
    for i in range(1, X.shape[0]):
        np.copyto(mn, X[i], where=X[i] < mn)
        np.copyto(mx, X[i], where=X[i] > mx)
    return mn, mx


def _first_abs_max(A: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column of A = |X|: C's `amax = 0; if (A[i] > amax) { amax = A[i]; max = X[i]; }`.

    Returns (amax, X at that index); zeros where nothing exceeds 0.
    """
    if not np.isnan(A).any():
        imax = np.argmax(A, axis=0)  # first index of the largest, as the strict > loop
        cols = np.arange(A.shape[1])
        amax = A[imax, cols]
        vmax = X[imax, cols]
        none = ~(amax > 0)
        if none.any():  # an all-zero column: the loop never fires, max stays +0
            amax = np.where(none, _F32(0), amax)
            vmax = np.where(none, _F32(0), vmax)
        return amax, vmax
    amax = np.zeros(A.shape[1], dtype=_F32)
    vmax = np.zeros(A.shape[1], dtype=_F32)
    for i in range(A.shape[0]):
        upd = A[i] > amax
        np.copyto(amax, A[i], where=upd)
        np.copyto(vmax, X[i], where=upd)
    return amax, vmax


def _osum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in index order (float32), like a C accumulation loop."""
    return np.add.reduce(a, axis=0)


def _fp16_round(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fp16 bits as uint16, value read back as float32) -- GGML_FP32_TO_FP16 then back."""
    h = v.astype(_F16)
    return h.view(np.uint16), h.astype(_F32)


# --------------------------------------------------------------------------- make_qkx2_quants


def _make_qkx2_quants(
    X: np.ndarray, W: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale + min search for many sub-blocks at once.

    X, W: (n, S) float32 -- values and weights, one sub-block per column.
    Returns (scale, the_min, L) with L (n, S) float32 holding the chosen levels
    (llama.cpp keeps them for sub-blocks whose packed scale rounds to zero).
    """
    n, S = X.shape
    xmin, xmax = _running_min_max(X)
    sum_w = _osum(W)
    sum_x = _osum(W * X)
    # ggml: if (min > 0) min = 0  (a fresh +0.0 either way)
    mn = np.where(xmin > 0, _F32(0), xmin)
    const = xmax == mn
    lo = np.zeros((n, S), dtype=_F32)
    hi = np.full((n, S), nmax, dtype=_F32)
    # LX[0]: levels of the current candidate, LX[1]: the values -- stacked so
    # that w*l*l and w*l*x are one multiply call
    LX = np.empty((2, n, S), dtype=_F32)
    LX[1] = X
    t = LX[0]
    buf = np.empty((3, n, S), dtype=_F32)  # w*l, w*l*l, w*l*x
    sums = np.empty((3, S), dtype=_F32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rng = xmax - mn
        iscale = _F32(nmax) / rng
        scale = _F32(1) / iscale
        ratio = _span_ratio(xmin, xmax, mn, rng, const)
        rng_pos = bool(np.all((rng > 0) | const))
        np.subtract(X, mn, out=t)
        t *= iscale
        L = _nearest_clamped_f32(t, lo, hi, not _rint_safe(_F32(nmax), ratio))
        diff = L * scale  # scale*L + min - x
        diff += mn
        diff -= X
        diff *= diff
        diff *= W
        best_error = _osum(diff)
        # what produced the current L, to rebuild it at the end
        best_iscale = iscale
        best_mn = mn

        for step in range(nstep + 1):
            # (rmin + rdelta*is + nmax) in float32, left to right
            num = _F32(_F32(rmin) + _F32(rdelta) * _F32(step)) + _F32(nmax)
            iscale = num / rng
            np.subtract(X, mn, out=t)
            t *= iscale
            if _rint_safe(num, ratio):
                np.rint(t, out=t)
                np.maximum(t, lo, out=t)
                # with max - min > 0, t <= iscale*(max - min) ~ num (+2 roundings):
                # no level above nmax unless num is close to nmax + 0.5
                if not rng_pos or num > _F32(nmax) + _F32(0.25):
                    np.minimum(t, hi, out=t)
            else:
                t[...] = _nearest_clamped_f32(t, lo, hi, True)
            np.multiply(W, t, out=buf[0])
            np.multiply(buf[0], LX, out=buf[1:3])
            np.add.reduce(buf, axis=1, out=sums)
            sum_l, sum_l2, sum_xl = sums[0], sums[1], sums[2]
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            if pos.any():
                this_min = np.where(pos, _F32(0), this_min)
                this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            diff = np.multiply(t, this_scale, out=buf[0])
            diff += this_min
            diff -= X
            diff *= diff
            diff *= W
            cur_error = _osum(diff)
            # constant columns divide by a zero range: their sums are NaN, D > 0 fails
            win = D > 0
            win &= cur_error < best_error
            if win.any():
                best_error = np.where(win, cur_error, best_error)
                scale = np.where(win, this_scale, scale)
                best_iscale = np.where(win, iscale, best_iscale)
                best_mn = np.where(win, mn, best_mn)
                mn = np.where(win, this_min, mn)
                rng = xmax - mn
                ratio = _span_ratio(xmin, xmax, mn, rng, const)
                rng_pos = bool(np.all((rng > 0) | const))

    # rebuild the winning levels (exact nearest_int; the trial used the same arithmetic)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        t = X - best_mn
        t *= best_iscale
        L = _nearest_clamped_f32(t, 0, nmax, True)
    L[:, const] = 0
    scale = np.where(const, _F32(0), scale)
    return scale, -mn, L


def _span_ratio(
    xmin: np.ndarray, xmax: np.ndarray, mn: np.ndarray, rng: np.ndarray, const: np.ndarray
) -> float:
    """max over non-constant columns of max|x - mn| / |xmax - mn|.

    A candidate's iscale is num/(xmax - mn), so num*ratio bounds every
    |iscale*(x - mn)| of the chunk (inf/nan when the bound is unusable).
    """
    span = np.maximum(np.abs(xmax - mn), np.abs(xmin - mn))
    r = np.where(const, 0.0, span / np.abs(rng))
    return float(r.max(initial=0.0))


def _rint_safe(num: np.floating, ratio: float) -> bool:
    """True when every |iscale*(x - mn)| is small enough for rint == nearest_int."""
    b = abs(float(num)) * ratio
    # the margin covers float32 rounding of iscale and of x - mn
    return bool(np.isfinite(b) and b < _NEAREST_SAFE * 0.5)


# --------------------------------------------------------------------------- make_qx_quants (rmse_type 1, no weights)


def _make_qx_quants_rmse1(X: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL) over columns.

    X: (n, S) float32. Returns (scale (S,), L (n, S) float32 in 0..2*nmax-1,
    all zero for all-zero sub-blocks as in ggml).
    """
    n, S = X.shape
    ax = np.abs(X)
    amax, vmax = _first_abs_max(ax, X)
    zero = amax < _GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # WXW[0] = w*x, WXW[1] = w with w = x*x: one multiply by l gives both
        # (w*x)*l and w*l, in the C association order
        WXW = np.empty((2, n, S), dtype=_F32)
        np.multiply(X, X, out=WXW[1])
        np.multiply(WXW[1], X, out=WXW[0])
        lo = np.full((n, S), -nmax, dtype=_F32)
        hi = np.full((n, S), nmax - 1, dtype=_F32)
        P = np.empty((2, n, S), dtype=_F32)
        sums = np.empty((2, S), dtype=_F32)
        t = np.empty((n, S), dtype=_F32)

        def trial(isc: np.ndarray, num: float, exact: bool) -> tuple[np.ndarray, np.ndarray]:
            np.multiply(X, isc, out=t)
            if exact:
                lq = _nearest_clamped_f32(t, lo, hi, True)
            else:
                # |t| <= |num|*|x|/|max| ~ |num| (+2 roundings): a clamp binds only
                # when |num| comes near the half-way point past its bound
                lq = np.rint(t, out=t)
                if abs(num) > nmax + 0.25:
                    np.maximum(lq, lo, out=lq)
                if abs(num) > nmax - 0.75:
                    np.minimum(lq, hi, out=lq)
            np.multiply(WXW, lq, out=P)
            P[1] *= lq
            np.add.reduce(P, axis=1, out=sums)
            return sums[0].copy(), sums[1].copy()

        iscale = _F32(-nmax) / vmax
        bound = np.abs(iscale) * amax
        exact = not bool(np.all(np.isfinite(bound[~zero])) and np.all(bound[~zero] < _NEAREST_SAFE * 0.5))
        sumlx, suml2 = trial(iscale, float(nmax), exact)
        scale = np.where(suml2 != 0, sumlx / suml2, _F32(0))
        best = scale * sumlx
        best_iscale = iscale
        for step in range(-9, 10):
            if step == 0:
                continue
            num = _F32(nmax) + _F32(0.1) * _F32(step)
            iscale = -num / vmax
            sumlx, suml2 = trial(iscale, float(num), exact)
            win = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            if win.any():
                new_scale = sumlx / suml2
                scale = np.where(win, new_scale, scale)
                best = np.where(win, new_scale * sumlx, best)
                best_iscale = np.where(win, iscale, best_iscale)
        t = X * best_iscale
        L = _nearest_clamped_f32(t, -nmax, nmax - 1, True)
    L += _F32(nmax)
    L[:, zero] = 0
    scale = np.where(zero, _F32(0), scale)
    return scale, L


# --------------------------------------------------------------------------- Q4_K / Q5_K


def _pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales + 8 six-bit mins -> the 12-byte K4 layout. ls, lm: (nb, 8) uint8."""
    nb = ls.shape[0]
    out = np.empty((nb, 12), dtype=np.uint8)
    # bytes 0..3: low 6 bits scale j, top 2 bits = high bits of scale j+4
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    # bytes 4..7: low 6 bits min j, top 2 bits = high bits of min j+4
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    # bytes 8..11: low nibble scale j+4, high nibble min j+4
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _search_qkx(
    xb: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, backend: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per 32-value sub-block: weights av_x + |x| and make_qkx2_quants.

    Returns scales (S,), mins (S,) and the search's levels as an (S, 32) array.
    """
    S = xb.shape[0] * 8
    X = np.ascontiguousarray(xb.reshape(S, 32).T)  # (32, S): position-major for ordered sums
    if backend == "numba":
        nbk = _numba_kernels()
        scales = np.empty(S, dtype=_F32)
        mins = np.empty(S, dtype=_F32)
        LT = np.empty((32, S), dtype=np.uint8)
        if np.isfinite(X).all() and nbk.qkx2_search_vec(X, nmax, rmin, rdelta, nstep, scales, mins, LT):
            return scales, mins, LT.T
        # non-finite values, or some value may leave nearest_int's exact range:
        # one sub-block at a time, like C
        L = np.empty((S, 32), dtype=np.uint8)
        nbk.qkx2_search(xb.reshape(S, 32), nmax, rmin, rdelta, nstep, scales, mins, L)
        return scales, mins, L
    sum_x2 = _osum(X * X)
    av_x = np.sqrt(sum_x2 / _F32(32))
    W = np.abs(X)
    W += av_x
    scales, mins, L = _make_qkx2_quants(X, W, nmax, rmin, rdelta, nstep)
    return scales, mins, L.T


def _qkx_superblocks(
    xb: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, backend: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shared body of quantize_row_q4_K_ref / q5_K_ref for (nb, 256) float32 input.

    Returns (d16 bits (nb,), dmin16 bits (nb,), ls (nb,8) uint8, lm (nb,8) uint8,
    L (nb, 256) uint8 levels in 0..nmax).
    """
    nb = xb.shape[0]
    scales, mins, Lsearch = _search_qkx(xb, nmax, rmin, rdelta, nstep, backend)

    sc = scales.reshape(nb, 8)
    mi = mins.reshape(nb, 8)
    # fmax: the C loop's `if (scale > max_scale)` never takes a NaN
    ms = np.fmax.reduce(sc, axis=1)
    mm = np.fmax.reduce(mi, axis=1)
    # loop starts from 0 and takes strictly larger values: +0.0 when nothing is > 0
    max_scale = np.where(ms > 0, ms, _F32(0))
    max_min = np.where(mm > 0, mm, _F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, _F32(63) / max_scale, _F32(0))
        inv_min = np.where(max_min > 0, _F32(63) / max_min, _F32(0))
    # uint8_t ls = nearest_int(...) (wraps mod 256); ls = MIN(63, ls)
    ls = np.minimum(_nearest_int(inv_scale[:, None] * sc) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mi) & 0xFF, 63).astype(np.uint8)
    d_bits, d = _fp16_round(max_scale / _F32(63))
    dmin_bits, dmin = _fp16_round(max_min / _F32(63))

    dsub = d[:, None] * ls.astype(_F32)  # (nb, 8)
    msub = dmin[:, None] * lm.astype(_F32)
    x3 = xb.reshape(nb, 8, 32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q = x3 + msub[:, :, None]
        q /= dsub[:, :, None]
        Lq = _nearest_int(q)
    np.clip(Lq, 0, nmax, out=Lq)
    L = Lq.astype(np.uint8)
    skip = dsub == 0  # ggml keeps the search's levels there
    if skip.any():
        Ls = Lsearch.reshape(nb, 8, 32).astype(np.uint8)
        L[skip] = Ls[skip]
    return d_bits, dmin_bits, ls, lm, L.reshape(nb, QK_K)


def _q4_k_chunk(xb: np.ndarray, backend: str) -> np.ndarray:
    nb = xb.shape[0]
    d_bits, dmin_bits, ls, lm, L = _qkx_superblocks(xb, 15, -1.0, 0.1, 20, backend)
    out = np.empty((nb, 144), dtype=np.uint8)
    out[:, 0:2] = d_bits.view(np.uint8).reshape(nb, 2)
    out[:, 2:4] = dmin_bits.view(np.uint8).reshape(nb, 2)
    out[:, 4:16] = _pack_scale_min_k4(ls, lm)
    # qs: for each 64-value group g, byte l = L[64g+l] | L[64g+32+l] << 4
    L4 = L.reshape(nb, 4, 2, 32)
    out[:, 16:144] = (L4[:, :, 0, :] | (L4[:, :, 1, :] << 4)).reshape(nb, 128)
    return out


def _q5_k_chunk(xb: np.ndarray, backend: str) -> np.ndarray:
    nb = xb.shape[0]
    d_bits, dmin_bits, ls, lm, L = _qkx_superblocks(xb, 31, -0.5, 0.1, 15, backend)
    out = np.empty((nb, 176), dtype=np.uint8)
    out[:, 0:2] = d_bits.view(np.uint8).reshape(nb, 2)
    out[:, 2:4] = dmin_bits.view(np.uint8).reshape(nb, 2)
    out[:, 4:16] = _pack_scale_min_k4(ls, lm)
    L4 = L.reshape(nb, 4, 2, 32)
    lo = L4 & 0xF
    hi = L4 >> 4  # 0/1: fifth bit
    # qh byte j: bit 2g = high bit of L[64g+j], bit 2g+1 = high bit of L[64g+32+j]
    shifts = (np.arange(4, dtype=np.uint8) * 2)[None, :, None]
    qh = (hi[:, :, 0, :] << shifts) | (hi[:, :, 1, :] << (shifts + 1))
    out[:, 16:48] = np.bitwise_or.reduce(qh, axis=1)
    out[:, 48:176] = (lo[:, :, 0, :] | (lo[:, :, 1, :] << 4)).reshape(nb, 128)
    return out


# --------------------------------------------------------------------------- Q6_K


def _q6_k_chunk(xb: np.ndarray, backend: str) -> np.ndarray:
    nb = xb.shape[0]
    S = nb * 16
    X = np.ascontiguousarray(xb.reshape(S, 16).T)  # (16, S)
    if backend == "numba":
        nbk = _numba_kernels()
        scales = np.empty(S, dtype=_F32)
        LT = np.empty((16, S), dtype=np.uint8)
        if np.isfinite(X).all() and nbk.qx_rmse1_search_vec(X, 32, scales, LT):
            Lsearch = LT.T
        else:  # non-finite values: one sub-block at a time, like C
            Lsearch = np.empty((S, 16), dtype=np.uint8)
            nbk.qx_rmse1_search(xb.reshape(S, 16), 32, scales, Lsearch)
    else:
        scales, Lsearch = _make_qx_quants_rmse1(X, 32)
        Lsearch = Lsearch.T
    del X
    sc = scales.reshape(nb, 16)
    max_abs, max_scale = _first_abs_max(np.abs(sc).T, sc.T)
    zero_block = ~(max_abs >= _GROUP_MAX_EPS)  # '<' in C; also catches NaN like the loop would leave 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = _F32(-128) / max_scale
        d_bits, dval = _fp16_round(_F32(1) / iscale)
        isc = np.minimum(_nearest_int(iscale[:, None] * sc), 127)
        sc8 = (isc & 0xFF).astype(np.uint8).view(np.int8)  # stored as int8_t
        dsub = dval[:, None] * sc8.astype(_F32)  # (nb, 16)
        q = xb.reshape(nb, 16, 16) / dsub[:, :, None]
        Lq = _nearest_int(q)
    np.clip(Lq, -32, 31, out=Lq)
    Lq += 32
    L = Lq.astype(np.uint8)
    skip = dsub == 0
    if skip.any():
        Ls = Lsearch.reshape(nb, 16, 16).astype(np.uint8)
        L[skip] = Ls[skip]
    L = L.reshape(nb, 2, 4, 32)  # half h, quarter k, position l: value index 128h + 32k + l
    out = np.empty((nb, 210), dtype=np.uint8)
    lo = L & 0xF
    hi = L >> 4
    ql = np.empty((nb, 2, 64), dtype=np.uint8)
    ql[:, :, 0:32] = lo[:, :, 0, :] | (lo[:, :, 2, :] << 4)
    ql[:, :, 32:64] = lo[:, :, 1, :] | (lo[:, :, 3, :] << 4)
    qh = hi[:, :, 0, :] | (hi[:, :, 1, :] << 2) | (hi[:, :, 2, :] << 4) | (hi[:, :, 3, :] << 6)
    out[:, 0:128] = ql.reshape(nb, 128)
    out[:, 128:192] = qh.reshape(nb, 64)
    out[:, 192:208] = sc8.view(np.uint8)
    out[:, 208:210] = d_bits.view(np.uint8).reshape(nb, 2)
    if zero_block.any():
        out[zero_block] = 0  # memset; fp16(0) is all-zero bits too
    return out


# --------------------------------------------------------------------------- public API


BACKENDS = ("numpy", "numba")
_BACKEND_ENV = "LORA2GGUF_KQUANTS_BACKEND"


def _numba_kernels():  # type: ignore[no-untyped-def]
    from lora2gguf.quantize import _kq_numba

    return _kq_numba


def numba_available() -> bool:
    """True when numba is importable (the faster search kernels can be used)."""
    try:
        _numba_kernels()
    except Exception as exc:  # missing, or installed but unusable with this numpy
        logger.debug("numba K-quant kernels unavailable: %s", exc)
        return False
    return True


def resolve_backend(backend: str | None = None) -> str:
    """'numpy' or 'numba': the argument, else $LORA2GGUF_KQUANTS_BACKEND, else numba when installed.

    Both produce the same bytes; numba runs the two search loops at about C speed.
    """
    choice = backend or os.environ.get(_BACKEND_ENV) or "auto"
    if choice == "auto":
        return "numba" if numba_available() else "numpy"
    if choice not in BACKENDS:
        raise ValueError(f"unknown K-quant backend {choice!r}; choose one of {', '.join(BACKENDS)} or auto")
    if choice == "numba" and not numba_available():
        raise ValueError("K-quant backend 'numba' requested but numba is not installed")
    return choice


def _quantize(
    x: np.ndarray,
    chunk_fn: Callable[[np.ndarray, str], np.ndarray],
    block_bytes: int,
    name: str,
    backend: str | None,
) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (n_rows, n_cols) array, got shape {a.shape}")
    n_rows, n_cols = a.shape
    if n_cols % QK_K:
        raise ValueError(f"{name}: row length {n_cols} is not a multiple of {QK_K}")
    be = resolve_backend(backend)
    nbr = n_cols // QK_K
    out = np.empty((n_rows, nbr * block_bytes), dtype=np.uint8)
    if a.size == 0:
        return out
    blocks = a.reshape(n_rows * nbr, QK_K)
    oblocks = out.reshape(n_rows * nbr, block_bytes)
    total = blocks.shape[0]
    chunk = _CHUNK_SUPERBLOCKS if be == "numpy" else _CHUNK_SUPERBLOCKS_NUMBA
    # inf/nan/overflow arise by design (C semantics on degenerate blocks); errstate is per thread
    with np.errstate(all="ignore"):
        for s in range(0, total, chunk):
            e = min(total, s + chunk)
            xb = np.ascontiguousarray(blocks[s:e], dtype=_F32)
            oblocks[s:e] = chunk_fn(xb, be)
    return out


def quantize_q4_k(x: np.ndarray, backend: str | None = None) -> np.ndarray:
    """Q4_K blocks (144 bytes per 256 weights) of a (n_rows, n_cols) float32 array."""
    return _quantize(x, _q4_k_chunk, 144, "Q4_K", backend)


def quantize_q5_k(x: np.ndarray, backend: str | None = None) -> np.ndarray:
    """Q5_K blocks (176 bytes per 256 weights) of a (n_rows, n_cols) float32 array."""
    return _quantize(x, _q5_k_chunk, 176, "Q5_K", backend)


def quantize_q6_k(x: np.ndarray, backend: str | None = None) -> np.ndarray:
    """Q6_K blocks (210 bytes per 256 weights) of a (n_rows, n_cols) float32 array."""
    return _quantize(x, _q6_k_chunk, 210, "Q6_K", backend)


QUANTIZERS: dict[str, Callable[..., np.ndarray]] = {
    "Q4_K": quantize_q4_k,
    "Q5_K": quantize_q5_k,
    "Q6_K": quantize_q6_k,
}
