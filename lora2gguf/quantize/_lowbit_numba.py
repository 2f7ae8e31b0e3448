"""numba kernels of llama.cpp's low-bit quantizers: Q2_K, Q3_K, IQ4_NL, IQ4_XS, plain and weighted.

Each kernel follows one C function of ggml-quants.c loop for loop, in float32 scalars, as the
kernels of :mod:`lora2gguf.quantize._weighted_numba` do (same rules: numba keeps float32 for
float32 operands and, without fastmath, neither reorders nor fuses operations; every integer the C
code converts implicitly is converted with ``np.float32``; C's integer truncations to uint8/int8
are written out). The plain paths are what ``ggml_quantize_chunk`` runs without an imatrix:

* Q2_K: ``quantize_row_q2_K_ref`` (make_qkx2_quants with |x| weights and the absolute error);
* Q3_K: ``quantize_row_q3_K_ref`` (make_q3_quants);
* IQ4_NL / IQ4_XS: ``quantize_iq4_nl`` / ``quantize_iq4_xs`` (quantize_row_iq4_nl_impl, 7 tries),
  with or without quant weights;

and the weighted ones ``quantize_row_q2_K_impl`` / ``quantize_row_q3_K_impl``.

The plain Q2_K / Q3_K kernels take a row's 16-weight sub-blocks side by side (see "SIMD-friendly
variants" below) so that LLVM vectorises the searches; each sub-block still gets C's float32
operations in C's order.

``X`` is ``(rows, n_per_row)`` float32, ``QW`` the ``(n_per_row,)`` float32 importance of each
column (ignored where ``use_qw`` is false), ``OUT`` the ``(rows, row_bytes)`` uint8 result,
``VALS`` IQ4_NL's 16 non-linear levels as float32.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from lora2gguf.quantize._kq_numba import _make_qkx_quants, _make_qx_quants, _nearest_int
from lora2gguf.quantize._weighted_numba import _fp16_round, _make_qp_quants, _put_fp16

_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_TWO = np.float32(2.0)
_EPS = np.float32(1e-15)  # ggml's GROUP_MAX_EPS
_QK_K = 256
_MAGIC = np.float32(12582912.0)
_SAFE = np.float32(2097152.0)  # 2**21: half the exact range, margin for rounding of the bound
_LIMIT = np.float32(4194303.0)  # the scalar _nearest_int's exact range


@njit(inline="always", cache=True, error_model="numpy")
def _store_fp16(out, pos, v, fbuf, ibuf):  # pragma: no cover - compiled
    """GGML_FP32_TO_FP16 of v (already rounded by _fp16_round) at out[pos:pos+2]; NaN -> 0x7E00 | sign."""
    if v != v:
        fbuf[0] = v
        out[pos] = 0
        out[pos + 1] = 0xFE if ibuf[0] < 0 else 0x7E
    else:
        _put_fp16(out, pos, v)


@njit(inline="always", cache=True, error_model="numpy")
def _pack_2bit(out, o, L):  # pragma: no cover - compiled
    """qs of Q2_K / Q3_K: byte j/4 + l of each 128-weight half holds L[j+l], L[j+l+32], ... 2 bits each."""
    for j in range(0, _QK_K, 128):
        for l in range(32):
            out[o + j // 4 + l] = L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6)


@njit(inline="always", cache=True, error_model="numpy")
def _levels16(v, L, o, lo, hi, off, fbuf, ibuf):  # pragma: no cover - compiled
    """L[o + i] = clamp(nearest_int(v[i]), lo, hi) + off for the 16 values of v: in the float form of
    the rounding (which vectorises) when all lie in the C trick's exact range, else as C."""
    inside = True
    for i in range(16):
        inside = inside & (abs(v[i]) <= _LIMIT)
    if inside:
        flo = np.float32(lo)
        fhi = np.float32(hi)
        for i in range(16):
            r = (v[i] + _MAGIC) - _MAGIC
            r = flo if r < flo else r
            r = fhi if r > fhi else r
            L[o + i] = np.int64(r) + off
    else:
        for i in range(16):
            L[o + i] = max(lo, min(hi, _nearest_int(v[i], fbuf, ibuf))) + off


@njit(cache=True, error_model="numpy")
def _make_qkx2_mad(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, fbuf, ibuf):  # pragma: no cover - compiled
    """make_qkx2_quants(..., use_mad=true): the weighted absolute error picks the candidate."""
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        sum_w = sum_w + weights[i]
        sum_x = sum_x + weights[i] * x[i]
    if mn > _ZERO:
        mn = _ZERO
    if mx == mn:
        for i in range(n):
            L[i] = 0
        return _ZERO, -mn
    nmaxf = np.float32(nmax)
    iscale = nmaxf / (mx - mn)
    scale = _ONE / iscale
    best_error = _ZERO
    for i in range(n):
        l = max(0, min(nmax, _nearest_int(iscale * (x[i] - mn), fbuf, ibuf)))
        L[i] = l
        best_error = best_error + weights[i] * abs(scale * np.float32(l) + mn - x[i])
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * np.float32(step) + nmaxf) / (mx - mn)
        sum_l = _ZERO
        sum_l2 = _ZERO
        sum_xl = _ZERO
        for i in range(n):
            l = max(0, min(nmax, _nearest_int(iscale * (x[i] - mn), fbuf, ibuf)))
            Laux[i] = l
            wl = weights[i] * np.float32(l)
            sum_l = sum_l + wl
            sum_l2 = sum_l2 + wl * np.float32(l)
            sum_xl = sum_xl + wl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > _ZERO:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > _ZERO:
                this_min = _ZERO
                this_scale = sum_xl / sum_l2
            cur_error = _ZERO
            for i in range(n):
                cur_error = cur_error + weights[i] * abs(this_scale * np.float32(Laux[i]) + this_min - x[i])
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(cache=True, error_model="numpy")
def _q2_k_pack(out, o, L, sc, d, dmin, fbuf, ibuf):  # pragma: no cover - compiled
    """Q2_K's block bytes from the levels L: scales[16], qs[64], d, dmin (the fp16-rounded values)."""
    for j in range(16):
        out[o + j] = sc[j]
    _pack_2bit(out, o + 16, L)
    _store_fp16(out, o + 80, d, fbuf, ibuf)
    _store_fp16(out, o + 82, dmin, fbuf, ibuf)


@njit(cache=True, error_model="numpy")
def _q2_k_requantize_and_pack(x, out, o, L, sc, d, dmin, fbuf, ibuf):  # pragma: no cover - compiled
    """The common tail of Q2_K: levels from the packed 4-bit scales and mins, then the block bytes.
    d and dmin are the fp16-rounded values."""
    v = np.empty(16, np.float32)
    for j in range(16):
        dj = d * np.float32(sc[j] & 0xF)
        if dj == _ZERO:
            continue
        mj = dmin * np.float32(sc[j] >> 4)
        for i in range(16):
            v[i] = (x[16 * j + i] + mj) / dj
        _levels16(v, L, 16 * j, 0, 3, 0, fbuf, ibuf)
    _q2_k_pack(out, o, L, sc, d, dmin, fbuf, ibuf)


@njit(inline="always", cache=True, error_model="numpy")
def _to_columns(x, XT):  # pragma: no cover - compiled
    """XT[i, s] = x[16 s + i]: sub-block s of the row in column s."""
    for i in range(16):
        for s in range(XT.shape[1]):
            XT[i, s] = x[16 * s + i]


@njit(inline="always", cache=True, error_model="numpy")
def _block_levels(LT, ibk, L):  # pragma: no cover - compiled
    """L[16 j + i] = LT[i, 16 ibk + j]: block ibk's levels back in weight order."""
    for j in range(16):
        for i in range(16):
            L[16 * j + i] = LT[i, 16 * ibk + j]


@njit(cache=True, error_model="numpy")
def _requantize_columns(XT, add, div, lo, hi, off, LT, fbuf, ibuf):  # pragma: no cover - compiled
    """LT[i, s] = clamp(nearest_int((XT[i, s] + add[s]) / div[s]), lo, hi) + off where div[s] != 0
    (C skips the other sub-blocks: they keep the search's levels). Vectorised across the columns; a
    column with a value outside the float rounding's exact range is done as C."""
    n, S = XT.shape
    V = np.empty((n, S), np.float32)
    inside = np.ones(S, np.bool_)
    for i in range(n):
        for s in range(S):
            v = (XT[i, s] + add[s]) / div[s]
            V[i, s] = v
            inside[s] = inside[s] & (abs(v) <= _LIMIT)
    flo = np.float32(lo)
    fhi = np.float32(hi)
    for i in range(n):
        for s in range(S):
            r = (V[i, s] + _MAGIC) - _MAGIC
            r = flo if r < flo else r
            r = fhi if r > fhi else r
            LT[i, s] = np.int64(r) + off if div[s] != _ZERO and inside[s] else LT[i, s]
    for s in range(S):
        if div[s] != _ZERO and not inside[s]:
            for i in range(n):
                LT[i, s] = max(lo, min(hi, _nearest_int(V[i, s], fbuf, ibuf))) + off


@njit(cache=True, error_model="numpy")
def _q2_k_scales(scales, mins, sc, dj, mj, fbuf, ibuf):  # pragma: no cover - compiled
    """quantize_row_q2_K_ref's 4-bit scales and mins of one block, against their maxima, into sc[16];
    dj, mj: each sub-block's requantization divisor d * (sc & 0xF) and offset dmin * (sc >> 4).
    Returns the fp16-rounded d and dmin."""
    q4scale = np.float32(15.0)
    max_scale = _ZERO
    max_min = _ZERO
    for j in range(16):
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    d = _ZERO
    for j in range(16):
        sc[j] = 0
    if max_scale > _ZERO:
        iscale = q4scale / max_scale
        for j in range(16):
            sc[j] = _nearest_int(iscale * scales[j], fbuf, ibuf) & 0xFF
        d = _fp16_round(max_scale / q4scale)
    dmin = _ZERO
    if max_min > _ZERO:
        iscale = q4scale / max_min
        for j in range(16):
            sc[j] = (sc[j] | (_nearest_int(iscale * mins[j], fbuf, ibuf) << 4)) & 0xFF
        dmin = _fp16_round(max_min / q4scale)
    for j in range(16):
        dj[j] = d * np.float32(sc[j] & 0xF)
        mj[j] = dmin * np.float32(sc[j] >> 4)
    return d, dmin


@njit(nogil=True, cache=True, error_model="numpy")
def q2_k_ref(X, OUT):  # pragma: no cover - compiled
    """quantize_row_q2_K_ref: per 16 weights make_qkx2_quants(16, 3, |x| weights, -0.5, 0.1, 15, mad);
    scales and mins to 4 bits against their maxima. A row's sub-blocks go side by side through the
    search (_qkx2_mad_vec) and the requantization (_requantize_columns)."""
    rows, n = X.shape
    S = n // 16
    nb = n // _QK_K
    XT = np.empty((16, S), np.float32)
    W = np.empty((16, S), np.float32)
    LT = np.empty((16, S), np.int64)
    scales = np.empty(S, np.float32)
    mins = np.empty(S, np.float32)
    dj = np.empty(S, np.float32)
    mj = np.empty(S, np.float32)
    bad = np.empty(S, np.bool_)
    sc = np.empty((nb, 16), np.int64)
    d = np.empty(nb, np.float32)
    dmin = np.empty(nb, np.float32)
    L = np.zeros(_QK_K, np.int64)
    Laux = np.empty(16, np.int64)
    weights = np.empty(16, np.float32)
    fbuf = np.empty(1, np.float32)
    ibuf = fbuf.view(np.int32)
    for r in range(rows):
        x = X[r]
        _to_columns(x, XT)
        for i in range(16):
            for s in range(S):
                W[i, s] = abs(XT[i, s])
        _qkx2_mad_vec(XT, W, scales, mins, LT, bad)
        for s in range(S):
            if bad[s]:
                for i in range(16):
                    weights[i] = abs(x[16 * s + i])
                scales[s], mins[s] = _make_qkx2_mad(
                    16, 3, x[16 * s : 16 * s + 16], weights, L, Laux, np.float32(-0.5), np.float32(0.1), 15, fbuf, ibuf
                )
                for i in range(16):
                    LT[i, s] = L[i]
        for ibk in range(nb):
            b = 16 * ibk
            d[ibk], dmin[ibk] = _q2_k_scales(
                scales[b : b + 16], mins[b : b + 16], sc[ibk], dj[b : b + 16], mj[b : b + 16], fbuf, ibuf
            )
        _requantize_columns(XT, mj, dj, 0, 3, 0, LT, fbuf, ibuf)
        for ibk in range(nb):
            _block_levels(LT, ibk, L)
            _q2_k_pack(OUT[r], 84 * ibk, L, sc[ibk], d[ibk], dmin[ibk], fbuf, ibuf)


@njit(nogil=True, cache=True, error_model="numpy")
def q2_k_impl(X, QW, OUT):  # pragma: no cover - compiled
    """quantize_row_q2_K_impl: weights qw * sqrt(sigma2 + x^2) (sigma2: the super-block's mean
    square), make_qkx3_quants(16, 3, -0.9, 0.05, 36); scales and mins by make_qp_quants(16, 15)."""
    rows, n = X.shape
    L = np.zeros(_QK_K, np.int64)
    Laux = np.empty(16, np.int64)
    weight = np.empty(16, np.float32)
    scales = np.empty(16, np.float32)
    mins = np.empty(16, np.float32)
    sw = np.empty(16, np.float32)
    Ls = np.empty(16, np.int64)
    Lm = np.empty(16, np.int64)
    sc = np.empty(16, np.int64)
    fbuf = np.empty(1, np.float32)
    ibuf = fbuf.view(np.int32)
    for r in range(rows):
        for ibk in range(n // _QK_K):
            x = X[r, _QK_K * ibk : _QK_K * ibk + _QK_K]
            qw = QW[_QK_K * ibk : _QK_K * ibk + _QK_K]
            sumx2 = _ZERO
            for j in range(_QK_K):
                sumx2 = sumx2 + x[j] * x[j]
            sigma2 = sumx2 / np.float32(_QK_K)
            for j in range(16):
                for i in range(16):
                    xi = x[16 * j + i]
                    weight[i] = qw[16 * j + i] * np.sqrt(sigma2 + xi * xi)
                sumw = _ZERO
                for i in range(16):
                    sumw = sumw + weight[i]
                sw[j] = sumw
                s, m = _make_qkx_quants(
                    16, 3, x[16 * j : 16 * j + 16], weight, L[16 * j : 16 * j + 16], Laux,
                    np.float32(-0.9), np.float32(0.05), 36, fbuf, ibuf,
                )
                scales[j] = s
                mins[j] = m
            d = _fp16_round(_make_qp_quants(16, 15, scales, Ls, sw, fbuf, ibuf))
            dmin = _fp16_round(_make_qp_quants(16, 15, mins, Lm, sw, fbuf, ibuf))
            for j in range(16):
                sc[j] = (Ls[j] | (Lm[j] << 4)) & 0xFF
            _q2_k_requantize_and_pack(x, OUT[r], 84 * ibk, L, sc, d, dmin, fbuf, ibuf)


@njit(cache=True, error_model="numpy")
def _make_q3_quants(n, nmax, x, L, fbuf, ibuf):  # pragma: no cover - compiled
    """make_q3_quants(n, nmax, x, L, do_rmse=true): x^2-weighted levels, refined one at a time."""
    amax = _ZERO
    vmax = _ZERO
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            vmax = x[i]
    if amax < _EPS:
        for i in range(n):
            L[i] = 0
        return _ZERO
    iscale = np.float32(-nmax) / vmax
    sumlx = _ZERO
    suml2 = _ZERO
    for i in range(n):
        l = max(-nmax, min(nmax - 1, _nearest_int(iscale * x[i], fbuf, ibuf)))
        L[i] = l
        w = x[i] * x[i]
        sumlx = sumlx + w * x[i] * np.float32(l)
        suml2 = suml2 + w * np.float32(l) * np.float32(l)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = x[i] * x[i]
            fl = np.float32(L[i])
            slx = sumlx - w * x[i] * fl
            if slx > _ZERO:
                sl2 = suml2 - w * fl * fl
                new_l = max(-nmax, min(nmax - 1, _nearest_int(x[i] * sl2 / slx, fbuf, ibuf)))
                if new_l != L[i]:
                    fn = np.float32(new_l)
                    slx = slx + w * x[i] * fn
                    sl2 = sl2 + w * fn * fn
                    if sl2 > _ZERO and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return sumlx / suml2 if suml2 > _ZERO else _ZERO


@njit(cache=True, error_model="numpy")
def _q3_k_pack(out, o, L, sc12, d, fbuf, ibuf):  # pragma: no cover - compiled
    """Q3_K's block bytes from the levels L (0..7): hmask[32], qs[64], scales[12], d (fp16-rounded)."""
    for m in range(32):  # high bit of weight j: bit j // 32 of hmask[j % 32]
        h = 0
        for k in range(8):
            hb = L[32 * k + m] >> 2
            h |= hb << k
            L[32 * k + m] -= hb << 2
        out[o + m] = h
    _pack_2bit(out, o + 32, L)
    for k in range(12):
        out[o + 96 + k] = sc12[k]
    _store_fp16(out, o + 108, d, fbuf, ibuf)


@njit(inline="always", cache=True, error_model="numpy")
def _q3_sub_scale(sc12, j):  # pragma: no cover - compiled
    """Scale j (-32..31) back from the 12-byte Q3_K layout, as C reads it (int8_t)."""
    s = sc12[j] & 0xF if j < 8 else sc12[j - 8] >> 4
    return (s | (((sc12[8 + j % 4] >> (2 * (j // 4))) & 3) << 4)) - 32


@njit(cache=True, error_model="numpy")
def _q3_k_requantize_and_pack(x, out, o, L, sc12, d, fbuf, ibuf):  # pragma: no cover - compiled
    """The common tail of Q3_K: levels from the packed 6-bit scales, then the block bytes (d is the
    fp16-rounded value)."""
    v = np.empty(16, np.float32)
    for j in range(16):
        dj = d * np.float32(_q3_sub_scale(sc12, j))
        if dj == _ZERO:
            continue
        for i in range(16):
            v[i] = x[16 * j + i] / dj
        _levels16(v, L, 16 * j, -4, 3, 4, fbuf, ibuf)
    _q3_k_pack(out, o, L, sc12, d, fbuf, ibuf)


@njit(inline="always", cache=True, error_model="numpy")
def _pack_q3_scale(sc12, j, l):  # pragma: no cover - compiled
    """Scale j (6 bits, 0..63) into the 12-byte Q3_K layout: low nibbles in bytes 0..7, the top two
    bits in bytes 8..11."""
    if j < 8:
        sc12[j] = l & 0xF
    else:
        sc12[j - 8] |= (l & 0xF) << 4
    sc12[j % 4 + 8] |= (l >> 4) << (2 * (j // 4))


@njit(cache=True, error_model="numpy")
def _q3_k_scales(scales, sc12, dj, fbuf, ibuf):  # pragma: no cover - compiled
    """quantize_row_q3_K_ref's 6-bit scales of one block, against the one of largest magnitude
    (int8_t truncation of nearest_int as in C), into sc12; dj: each sub-block's requantization
    divisor d * scale. Returns the fp16-rounded d."""
    max_scale = _ZERO
    amax = _ZERO
    for j in range(16):
        if abs(scales[j]) > amax:
            amax = abs(scales[j])
            max_scale = scales[j]
    for k in range(12):
        sc12[k] = 0
    d = _ZERO
    if max_scale != _ZERO:
        iscale = np.float32(-32.0) / max_scale
        for j in range(16):
            l = ((_nearest_int(iscale * scales[j], fbuf, ibuf) + 128) & 0xFF) - 128  # int8_t
            _pack_q3_scale(sc12, j, max(-32, min(31, l)) + 32)
        d = _fp16_round(_ONE / iscale)
    for j in range(16):
        dj[j] = d * np.float32(_q3_sub_scale(sc12, j))
    return d


@njit(nogil=True, cache=True, error_model="numpy")
def q3_k_ref(X, OUT):  # pragma: no cover - compiled
    """quantize_row_q3_K_ref: make_q3_quants(16, 4) per 16 weights, scales to 6 bits. A row's
    sub-blocks go side by side through the search (_make_q3_vec) and the requantization."""
    rows, n = X.shape
    S = n // 16
    nb = n // _QK_K
    XT = np.empty((16, S), np.float32)
    LT = np.empty((16, S), np.int64)
    scales = np.empty(S, np.float32)
    dj = np.empty(S, np.float32)
    zeros = np.zeros(S, np.float32)  # C divides x itself; x + 0 rounds to the same level
    bad = np.empty(S, np.bool_)
    sc12 = np.empty((nb, 12), np.int64)
    d = np.empty(nb, np.float32)
    L = np.zeros(_QK_K, np.int64)
    fbuf = np.empty(1, np.float32)
    ibuf = fbuf.view(np.int32)
    for r in range(rows):
        x = X[r]
        _to_columns(x, XT)
        _make_q3_vec(XT, scales, LT, bad)
        for s in range(S):
            if bad[s]:
                scales[s] = _make_q3_quants(16, 4, x[16 * s : 16 * s + 16], L, fbuf, ibuf)
                for i in range(16):
                    LT[i, s] = L[i]
        for ibk in range(nb):
            d[ibk] = _q3_k_scales(scales[16 * ibk : 16 * ibk + 16], sc12[ibk], dj[16 * ibk : 16 * ibk + 16], fbuf, ibuf)
        _requantize_columns(XT, zeros, dj, -4, 3, 4, LT, fbuf, ibuf)
        for ibk in range(nb):
            _block_levels(LT, ibk, L)
            _q3_k_pack(OUT[r], 110 * ibk, L, sc12[ibk], d[ibk], fbuf, ibuf)


@njit(nogil=True, cache=True, error_model="numpy")
def q3_k_impl(X, QW, OUT):  # pragma: no cover - compiled
    """quantize_row_q3_K_impl: weights qw * sqrt(2 sigma2 + x^2), make_qx_quants(16, 4) per 16
    weights, the scales by make_qx_quants(16, 32) weighted by their sub-blocks' weight sums."""
    rows, n = X.shape
    L = np.zeros(_QK_K, np.int64)
    weight = np.empty(16, np.float32)
    scales = np.empty(16, np.float32)
    sw = np.empty(16, np.float32)
    Ls = np.empty(16, np.int64)
    sc12 = np.empty(12, np.int64)
    fbuf = np.empty(1, np.float32)
    ibuf = fbuf.view(np.int32)
    for r in range(rows):
        for ibk in range(n // _QK_K):
            x = X[r, _QK_K * ibk : _QK_K * ibk + _QK_K]
            qw = QW[_QK_K * ibk : _QK_K * ibk + _QK_K]
            sumx2 = _ZERO
            for j in range(_QK_K):
                sumx2 = sumx2 + x[j] * x[j]
            sigma2 = _TWO * sumx2 / np.float32(_QK_K)
            for j in range(16):
                for i in range(16):
                    xi = x[16 * j + i]
                    weight[i] = qw[16 * j + i] * np.sqrt(sigma2 + xi * xi)
                sumw = _ZERO
                for i in range(16):
                    sumw = sumw + weight[i]
                sw[j] = sumw
                scales[j] = _make_qx_quants(16, 4, x[16 * j : 16 * j + 16], L[16 * j : 16 * j + 16], weight, fbuf, ibuf)
            for k in range(12):
                sc12[k] = 0
            d = _fp16_round(_make_qx_quants(16, 32, scales, Ls, sw, fbuf, ibuf))
            for j in range(16):
                _pack_q3_scale(sc12, j, Ls[j])
            _q3_k_requantize_and_pack(x, OUT[r], 110 * ibk, L, sc12, d, fbuf, ibuf)


@njit(inline="always", cache=True, error_model="numpy")
def _best_index(vals, x):  # pragma: no cover - compiled
    """best_index_int8(16, values, x): the nearest of the 16 sorted levels (bisection, ties up)."""
    if x <= vals[0]:
        return 0
    if x >= vals[15]:
        return 15
    ml = 0
    mu = 15
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < vals[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if x - vals[mu - 1] < vals[mu] - x else mu


@njit(cache=True, error_model="numpy")
def _iq4_block_scale(xb, weight, vals, Lb, ntry, fbuf, ibuf):  # pragma: no cover - compiled
    """The per-32-weights part of quantize_row_iq4_nl_impl: the least-squares scale over 2*ntry+1
    trial scales (Lb gets the first trial's levels). Returns (scale, skipped: all |x| < eps)."""
    amax = _ZERO
    vmax = _ZERO
    for j in range(32):
        ax = abs(xb[j])
        if ax > amax:
            amax = ax
            vmax = xb[j]
    if amax < _EPS:
        return _ZERO, True
    d = -vmax / vals[0] if ntry > 0 else vmax / vals[0]
    idv = _ONE / d
    sumqx = _ZERO
    sumq2 = _ZERO
    for j in range(32):
        l = _best_index(vals, idv * xb[j])
        Lb[j] = l
        q = vals[l]
        w = weight[j]
        sumqx = sumqx + w * q * xb[j]
        sumq2 = sumq2 + w * q * q
    d = sumqx / sumq2 if sumq2 > _ZERO else _ZERO
    best = d * sumqx
    for itry in range(-ntry, ntry + 1):
        idv = (np.float32(itry) + vals[0]) / vmax
        sumqx = _ZERO
        sumq2 = _ZERO
        for j in range(32):
            q = vals[_best_index(vals, idv * xb[j])]
            w = weight[j]
            sumqx = sumqx + w * q * xb[j]
            sumq2 = sumq2 + w * q * q
        if sumq2 > _ZERO and sumqx * sumqx > best * sumq2:
            d = sumqx / sumq2
            best = d * sumqx
    return d, False


@njit(cache=True, error_model="numpy")
def _iq4_superblock(x, qw, use_qw, vals, out, o, L, weight, scales, fbuf, ibuf):  # pragma: no cover - compiled
    """quantize_row_iq4_nl_impl(sbs, 32, ..., ntry=7) for sbs = len(x): 32 (IQ4_NL: d, qs[16])
    or 256 (IQ4_XS: d, scales_h, scales_l[4], qs[128], the 8 scales to 6 bits)."""
    sbs = x.shape[0]
    nb = sbs // 32
    sigma2 = _ZERO
    for j in range(sbs):
        sigma2 = sigma2 + x[j] * x[j]
    sigma2 = sigma2 * (_TWO / np.float32(sbs))
    max_scale = _ZERO
    amax_scale = _ZERO
    for ib in range(nb):
        xb = x[32 * ib : 32 * ib + 32]
        for j in range(32):
            if use_qw:
                weight[j] = qw[32 * ib + j] * np.sqrt(sigma2 + xb[j] * xb[j])
            else:
                weight[j] = xb[j] * xb[j]
        d, skipped = _iq4_block_scale(xb, weight, vals, L[32 * ib : 32 * ib + 32], 7, fbuf, ibuf)
        scales[ib] = d
        if not skipped and abs(d) > amax_scale:
            amax_scale = abs(d)
            max_scale = d
    if nb > 1:
        d = -max_scale / np.float32(32.0)
        _store_fp16(out, o, _fp16_round(d), fbuf, ibuf)
        idv = _ONE / d if d != _ZERO else _ZERO
        scales_h = 0
        for ib in range(nb):
            l = max(-32, min(31, _nearest_int(idv * scales[ib], fbuf, ibuf)))
            dl = d * np.float32(l)
            idl = _ONE / dl if dl != _ZERO else _ZERO
            for j in range(32):
                L[32 * ib + j] = _best_index(vals, idl * x[32 * ib + j])
            l += 32
            if ib % 2 == 0:
                out[o + 4 + ib // 2] = l & 0xF
            else:
                out[o + 4 + ib // 2] |= (l & 0xF) << 4
            scales_h |= (l >> 4) << (2 * (ib % 8))
        out[o + 2] = scales_h & 0xFF
        out[o + 3] = scales_h >> 8
        q = o + 8
    else:
        _store_fp16(out, o, _fp16_round(scales[0]), fbuf, ibuf)
        idv = _ONE / scales[0] if scales[0] != _ZERO else _ZERO
        for j in range(sbs):
            L[j] = _best_index(vals, idv * x[j])
        q = o + 2
    for i in range(nb):
        for j in range(16):
            out[q + 16 * i + j] = L[32 * i + j] | (L[32 * i + 16 + j] << 4)


@njit(nogil=True, cache=True, error_model="numpy")
def iq4(X, QW, use_qw, VALS, sbs, OUT):  # pragma: no cover - compiled
    """quantize_iq4_nl (sbs 32, 18-byte blocks) / quantize_iq4_xs (sbs 256, 136-byte blocks)."""
    rows, n = X.shape
    block_bytes = 18 if sbs == 32 else 136
    L = np.zeros(sbs, np.int64)
    weight = np.empty(32, np.float32)
    scales = np.empty(sbs // 32, np.float32)
    fbuf = np.empty(1, np.float32)
    ibuf = fbuf.view(np.int32)
    for r in range(rows):
        for ibk in range(n // sbs):
            _iq4_superblock(
                X[r, sbs * ibk : sbs * ibk + sbs], QW[sbs * ibk : sbs * ibk + sbs] if use_qw else QW,
                use_qw, VALS, OUT[r], block_bytes * ibk, L, weight, scales, fbuf, ibuf,
            )


# --------------------------------------------------------------------------- SIMD-friendly variants
# The plain Q2_K / Q3_K searches across the sub-blocks of a row at once: XT (16, S) holds sub-block s
# in column s, per-sub-block state lives in (S,) arrays, and the innermost loop runs over s, so LLVM
# vectorises it. Each column still sees C's float32 operations in C's order, hence the same bytes.
# nearest_int is the float form (v + 1.5*2**23) - 1.5*2**23, equal to the C trick while |v| < 2**22;
# a column that could leave that range is flagged in ``bad`` and redone by the scalar kernel.


@njit(cache=True, error_model="numpy")
def _qkx2_mad_iscales(num, xmin, xmax, mn, const, bad, isc):  # pragma: no cover - compiled
    """iscale = num / (max - min) per column; 0 (and bad) where the levels could leave the exact range."""
    for s in range(xmin.shape[0]):
        d = xmax[s] - mn[s]
        v = num / d
        span = max(abs(d), abs(xmin[s] - mn[s]))
        if const[s] or bad[s]:
            v = _ZERO
        elif not abs(v) * span < _SAFE:  # also catches inf / nan
            bad[s] = True
            v = _ZERO
        isc[s] = v


@njit(cache=True, error_model="numpy")
def _qkx2_mad_vec(XT, W, scales, the_mins, LT, bad):  # pragma: no cover - compiled
    """_make_qkx2_mad(16, 3, x, |x|, L, Laux, -0.5, 0.1, 15) for the S columns of XT (16, S) with
    weights W: fills scales, the_mins (S,), LT (16, S) and bad (S,): columns to redo in scalar."""
    n, S = XT.shape
    nmaxf = np.float32(3.0)
    xmin = XT[0].copy()
    xmax = XT[0].copy()
    sum_w = W[0].copy()
    sum_x = W[0] * XT[0]
    for i in range(1, n):
        for s in range(S):
            v = XT[i, s]
            xmin[s] = v if v < xmin[s] else xmin[s]
            xmax[s] = v if v > xmax[s] else xmax[s]
            sum_w[s] = sum_w[s] + W[i, s]
            sum_x[s] = sum_x[s] + W[i, s] * v
    mn = np.empty(S, np.float32)
    const = np.empty(S, np.bool_)
    for s in range(S):
        mn[s] = _ZERO if xmin[s] > _ZERO else xmin[s]
        const[s] = xmax[s] == mn[s]
        bad[s] = not abs(sum_x[s]) < np.inf  # inf / nan input: the scalar kernel does what C does
    isc = np.empty(S, np.float32)
    scale = np.empty(S, np.float32)
    best_error = np.empty(S, np.float32)
    best_isc = np.zeros(S, np.float32)
    best_mn = mn.copy()
    ts = np.empty(S, np.float32)
    tm = np.empty(S, np.float32)
    ok = np.empty(S, np.bool_)
    sl = np.empty(S, np.float32)
    sl2 = np.empty(S, np.float32)
    sxl = np.empty(S, np.float32)
    err = np.empty(S, np.float32)
    R = np.empty((n, S), np.float32)
    for c in range(-1, 16):
        # c == -1: the initial iscale = nmax/(max - min); then the 16 candidates
        num = nmaxf if c < 0 else np.float32(-0.5) + np.float32(0.1) * np.float32(c) + nmaxf
        _qkx2_mad_iscales(num, xmin, xmax, mn, const, bad, isc)
        sl[:] = _ZERO
        sl2[:] = _ZERO
        sxl[:] = _ZERO
        for i in range(n):
            for s in range(S):
                r = (isc[s] * (XT[i, s] - mn[s]) + _MAGIC) - _MAGIC
                r = _ZERO if r < _ZERO else r
                r = nmaxf if r > nmaxf else r
                R[i, s] = r
                wl = W[i, s] * r
                sl[s] = sl[s] + wl
                sl2[s] = sl2[s] + wl * r
                sxl[s] = sxl[s] + wl * XT[i, s]
        if c < 0:
            for s in range(S):
                scale[s] = _ONE / isc[s]
                best_isc[s] = isc[s]
                ts[s] = scale[s]
                tm[s] = mn[s]
                ok[s] = True
        else:
            _qkx2_candidates(sum_w, sum_x, sl, sl2, sxl, const, ok, ts, tm)
        err[:] = _ZERO
        for i in range(n):
            for s in range(S):
                err[s] = err[s] + W[i, s] * abs(ts[s] * R[i, s] + tm[s] - XT[i, s])
        for s in range(S):
            if c < 0:
                best_error[s] = err[s]
            elif ok[s] and err[s] < best_error[s]:
                best_error[s] = err[s]
                scale[s] = ts[s]
                best_isc[s] = isc[s]
                best_mn[s] = mn[s]
                mn[s] = tm[s]
    for i in range(n):
        for s in range(S):
            r = (best_isc[s] * (XT[i, s] - best_mn[s]) + _MAGIC) - _MAGIC
            r = _ZERO if r < _ZERO else r
            r = nmaxf if r > nmaxf else r
            LT[i, s] = 0 if const[s] or bad[s] else np.int64(r)
    for s in range(S):
        scales[s] = _ZERO if const[s] or bad[s] else scale[s]
        the_mins[s] = -mn[s]


@njit(inline="always", cache=True, error_model="numpy")
def _qkx2_candidates(sum_w, sum_x, sl, sl2, sxl, const, ok, ts, tm):  # pragma: no cover - compiled
    """The least-squares scale and min of one search step per column (ok: D > 0, as in C)."""
    for s in range(sum_w.shape[0]):
        D = sum_w[s] * sl2[s] - sl[s] * sl[s]
        ok[s] = D > _ZERO and not const[s]
        t_scale = _ZERO
        t_min = _ZERO
        if ok[s]:
            t_scale = (sum_w[s] * sxl[s] - sum_x[s] * sl[s]) / D
            t_min = (sl2[s] * sum_x[s] - sl[s] * sxl[s]) / D
            if t_min > _ZERO:
                t_min = _ZERO
                t_scale = sxl[s] / sl2[s]
        ts[s] = t_scale
        tm[s] = t_min


@njit(cache=True, error_model="numpy")
def _make_q3_vec(XT, scales, LT, bad):  # pragma: no cover - compiled
    """_make_q3_quants(16, 4, x, L) for the S columns of XT (16, S): fills scales (S,), LT (16, S)
    and bad (S,): columns to redo in scalar."""
    n, S = XT.shape
    lo = np.float32(-4.0)
    hi = np.float32(3.0)
    amax = np.zeros(S, np.float32)
    vmax = np.zeros(S, np.float32)
    for i in range(n):
        for s in range(S):
            ax = abs(XT[i, s])
            up = ax > amax[s]
            vmax[s] = XT[i, s] if up else vmax[s]
            amax[s] = ax if up else amax[s]
    isc = np.empty(S, np.float32)
    for s in range(S):
        isc[s] = _ZERO if amax[s] < _EPS else np.float32(-4.0) / vmax[s]
        bad[s] = not abs(amax[s]) < np.inf  # also nan: the scalar kernel does what C does
    W = np.empty((n, S), np.float32)
    WX = np.empty((n, S), np.float32)
    LF = np.empty((n, S), np.float32)
    sumlx = np.zeros(S, np.float32)
    suml2 = np.zeros(S, np.float32)
    for i in range(n):
        for s in range(S):
            W[i, s] = XT[i, s] * XT[i, s]
            WX[i, s] = W[i, s] * XT[i, s]
            v = isc[s] * XT[i, s]
            bad[s] = bad[s] | (not abs(v) <= _LIMIT)
            r = (v + _MAGIC) - _MAGIC
            r = lo if r < lo else r
            r = hi if r > hi else r
            LF[i, s] = r
            sumlx[s] = sumlx[s] + WX[i, s] * r
            suml2[s] = suml2[s] + W[i, s] * r * r
    changed = np.zeros(S, np.int64)
    if _q3_pass(XT, W, WX, LF, sumlx, suml2, bad, changed) > 0:
        _q3_more_passes(XT, W, WX, LF, sumlx, suml2, bad, changed)
    for s in range(S):
        scales[s] = sumlx[s] / suml2[s] if suml2[s] > _ZERO and amax[s] >= _EPS else _ZERO
    for i in range(n):
        for s in range(S):
            LT[i, s] = 0 if amax[s] < _EPS else np.int64(LF[i, s]) + 4


@njit(cache=True, error_model="numpy")
def _q3_pass(XT, W, WX, LF, sumlx, suml2, bad, changed):  # pragma: no cover - compiled
    """One refinement pass of make_q3_quants (the itry loop's body) over the columns; changed[s]
    counts column s's changes. Returns the total. The sums and flags are updated in local copies:
    arrays LLVM knows to be distinct, else it does not vectorise the loop."""
    n, S = XT.shape
    lo = np.float32(-4.0)
    hi = np.float32(3.0)
    sx = sumlx.copy()
    s2 = suml2.copy()
    bd = bad.copy()
    ch = np.zeros(S, np.int32)  # 32-bit like the floats: 8 lanes per AVX2 vector, not 4
    for i in range(n):
        for s in range(S):
            fl = LF[i, s]
            slx = sx[s] - WX[i, s] * fl
            sl2 = s2[s] - W[i, s] * fl * fl
            v = XT[i, s] * sl2 / slx
            pos = slx > _ZERO
            bd[s] = bd[s] | (pos & (not abs(v) <= _LIMIT))
            nl = (v + _MAGIC) - _MAGIC
            nl = lo if nl < lo else nl
            nl = hi if nl > hi else nl
            slx = slx + WX[i, s] * nl
            sl2 = sl2 + W[i, s] * nl * nl
            take = pos & (nl != fl) & (sl2 > _ZERO) & (slx * slx * s2[s] > sx[s] * sx[s] * sl2)
            LF[i, s] = nl if take else fl
            sx[s] = slx if take else sx[s]
            s2[s] = sl2 if take else s2[s]
            ch[s] += 1 if take else 0
    sumlx[:] = sx
    suml2[:] = s2
    bad[:] = bd
    changed[:] = ch
    return ch.sum()


@njit(cache=True, error_model="numpy")
def _q3_more_passes(XT, W, WX, LF, sumlx, suml2, bad, changed):  # pragma: no cover - compiled
    """Passes 2..5 for the columns the first pass changed (about a fifth), gathered side by side so
    the passes stay vectorised without redoing every column. A column whose pass changes nothing
    would change nothing again (its state is the same), so running it past C's break is harmless."""
    n = XT.shape[0]
    idx = np.nonzero(changed)[0]
    m = idx.shape[0]
    cX = np.empty((n, m), np.float32)
    cW = np.empty((n, m), np.float32)
    cWX = np.empty((n, m), np.float32)
    cL = np.empty((n, m), np.float32)
    for i in range(n):
        for t in range(m):
            cX[i, t] = XT[i, idx[t]]
            cW[i, t] = W[i, idx[t]]
            cWX[i, t] = WX[i, idx[t]]
            cL[i, t] = LF[i, idx[t]]
    cx = sumlx[idx]
    c2 = suml2[idx]
    cb = bad[idx]
    cc = np.empty(m, np.int64)
    for _ in range(4):
        if _q3_pass(cX, cW, cWX, cL, cx, c2, cb, cc) == 0:
            break
    for t in range(m):
        s = idx[t]
        sumlx[s] = cx[t]
        suml2[s] = c2[t]
        bad[s] = cb[t]
        for i in range(n):
            LF[i, s] = cL[i, t]
