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
def _q2_k_requantize_and_pack(x, out, o, L, sc, d, dmin, fbuf, ibuf):  # pragma: no cover - compiled
    """The common tail of Q2_K: levels from the packed 4-bit scales and mins, then the block bytes
    (scales[16], qs[64], d, dmin). d and dmin are the fp16-rounded values."""
    for j in range(16):
        dj = d * np.float32(sc[j] & 0xF)
        if dj == _ZERO:
            continue
        mj = dmin * np.float32(sc[j] >> 4)
        for i in range(16):
            L[16 * j + i] = max(0, min(3, _nearest_int((x[16 * j + i] + mj) / dj, fbuf, ibuf)))
    for j in range(16):
        out[o + j] = sc[j]
    _pack_2bit(out, o + 16, L)
    _store_fp16(out, o + 80, d, fbuf, ibuf)
    _store_fp16(out, o + 82, dmin, fbuf, ibuf)


@njit(nogil=True, cache=True, error_model="numpy")
def q2_k_ref(X, OUT):  # pragma: no cover - compiled
    """quantize_row_q2_K_ref: per 16 weights make_qkx2_quants(16, 3, |x| weights, -0.5, 0.1, 15, mad);
    scales and mins to 4 bits against their maxima."""
    rows, n = X.shape
    L = np.zeros(_QK_K, np.int64)
    Laux = np.empty(16, np.int64)
    weights = np.empty(16, np.float32)
    scales = np.empty(16, np.float32)
    mins = np.empty(16, np.float32)
    sc = np.empty(16, np.int64)
    fbuf = np.empty(1, np.float32)
    ibuf = fbuf.view(np.int32)
    q4scale = np.float32(15.0)
    for r in range(rows):
        for ibk in range(n // _QK_K):
            x = X[r, _QK_K * ibk : _QK_K * ibk + _QK_K]
            max_scale = _ZERO
            max_min = _ZERO
            for j in range(16):
                for i in range(16):
                    weights[i] = abs(x[16 * j + i])
                s, m = _make_qkx2_mad(
                    16, 3, x[16 * j : 16 * j + 16], weights, L[16 * j : 16 * j + 16], Laux,
                    np.float32(-0.5), np.float32(0.1), 15, fbuf, ibuf,
                )
                scales[j] = s
                mins[j] = m
                if s > max_scale:
                    max_scale = s
                if m > max_min:
                    max_min = m
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
            _q2_k_requantize_and_pack(x, OUT[r], 84 * ibk, L, sc, d, dmin, fbuf, ibuf)


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
def _q3_k_requantize_and_pack(x, out, o, L, sc12, d, fbuf, ibuf):  # pragma: no cover - compiled
    """The common tail of Q3_K: levels from the packed 6-bit scales, then hmask[32], qs[64],
    scales[12], d (the fp16-rounded value)."""
    for j in range(16):
        s = sc12[j] & 0xF if j < 8 else sc12[j - 8] >> 4
        s = (s | (((sc12[8 + j % 4] >> (2 * (j // 4))) & 3) << 4)) - 32
        dj = d * np.float32(s)
        if dj == _ZERO:
            continue
        for i in range(16):
            L[16 * j + i] = max(-4, min(3, _nearest_int(x[16 * j + i] / dj, fbuf, ibuf))) + 4
    for m in range(32):
        out[o + m] = 0
    for j in range(_QK_K):  # high bit of weight j: bit j // 32 of hmask[j % 32]
        if L[j] > 3:
            out[o + j % 32] |= 1 << (j // 32)
            L[j] -= 4
    _pack_2bit(out, o + 32, L)
    for k in range(12):
        out[o + 96 + k] = sc12[k]
    _store_fp16(out, o + 108, d, fbuf, ibuf)


@njit(inline="always", cache=True, error_model="numpy")
def _pack_q3_scale(sc12, j, l):  # pragma: no cover - compiled
    """Scale j (6 bits, 0..63) into the 12-byte Q3_K layout: low nibbles in bytes 0..7, the top two
    bits in bytes 8..11."""
    if j < 8:
        sc12[j] = l & 0xF
    else:
        sc12[j - 8] |= (l & 0xF) << 4
    sc12[j % 4 + 8] |= (l >> 4) << (2 * (j // 4))


@njit(nogil=True, cache=True, error_model="numpy")
def q3_k_ref(X, OUT):  # pragma: no cover - compiled
    """quantize_row_q3_K_ref: make_q3_quants(16, 4) per 16 weights, scales to 6 bits against the
    one of largest magnitude (int8_t truncation of nearest_int as in C)."""
    rows, n = X.shape
    L = np.zeros(_QK_K, np.int64)
    scales = np.empty(16, np.float32)
    sc12 = np.empty(12, np.int64)
    fbuf = np.empty(1, np.float32)
    ibuf = fbuf.view(np.int32)
    for r in range(rows):
        for ibk in range(n // _QK_K):
            x = X[r, _QK_K * ibk : _QK_K * ibk + _QK_K]
            max_scale = _ZERO
            amax = _ZERO
            for j in range(16):
                s = _make_q3_quants(16, 4, x[16 * j : 16 * j + 16], L[16 * j : 16 * j + 16], fbuf, ibuf)
                scales[j] = s
                if abs(s) > amax:
                    amax = abs(s)
                    max_scale = s
            for k in range(12):
                sc12[k] = 0
            d = _ZERO
            if max_scale != _ZERO:
                iscale = np.float32(-32.0) / max_scale
                for j in range(16):
                    l = ((_nearest_int(iscale * scales[j], fbuf, ibuf) + 128) & 0xFF) - 128  # int8_t
                    _pack_q3_scale(sc12, j, max(-32, min(31, l)) + 32)
                d = _fp16_round(_ONE / iscale)
            _q3_k_requantize_and_pack(x, OUT[r], 110 * ibk, L, sc12, d, fbuf, ibuf)


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
