"""numba kernels of llama.cpp's importance-weighted quantizers (the ``quantize_row_*_impl`` paths).

Each kernel follows one C function of ggml-quants.c loop for loop, in float32 scalars, so the bytes
are those of ``ggml_quantize_chunk(type, ..., quant_weights)``; ``tests/test_imatrix.py`` checks
that on random and real rows.  numba keeps float32 for float32 operands and, without fastmath,
neither reorders nor fuses operations, which is what byte parity needs: every integer that the C
code converts implicitly (``n_per_row``, loop counters, quantized levels) is converted with
``np.float32`` here, and every constant is a float32.

``X`` is ``(rows, n_per_row)`` float32, ``QW`` the ``(n_per_row,)`` float32 importance of each
column (the imatrix row: mean squared activation), ``OUT`` the ``(rows, row_bytes)`` uint8 result.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from lora2gguf.quantize._kq_numba import _make_qkx_quants, _make_qx_quants, _nearest_int, qkx_search_vec, qx_search_vec

_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_TWO = np.float32(2.0)
_TENTH = np.float32(0.1)
_EPS = np.float32(1e-15)  # ggml's GROUP_MAX_EPS
_RMIN = np.float32(-0.9)
_RDELTA = np.float32(0.05)
_QK_K = 256


@njit(inline="always", cache=True, error_model="numpy")
def _fp16_round(v):  # pragma: no cover - compiled
    """float32 -> the float32 value of the nearest fp16 (ties to even), as GGML_FP32_TO_FP16."""
    a = abs(np.float64(v))
    if a == 0.0 or a != a:
        return v
    if a >= 65520.0:
        return np.float32(math.copysign(math.inf, v))
    _, e = math.frexp(a)  # a = m * 2**e with 0.5 <= m < 1: fp16 keeps 11 significant bits
    ulp_e = max(e - 11, -24)
    return np.float32(math.copysign(math.ldexp(np.rint(math.ldexp(a, -ulp_e)), ulp_e), v))


@njit(inline="always", cache=True, error_model="numpy")
def _put_fp16(out, pos, v):  # pragma: no cover - compiled
    """Store the fp16 bits of v (already representable in fp16) little-endian at out[pos:pos+2]."""
    bits = 0
    if v < 0 or (v == 0 and math.copysign(1.0, v) < 0):
        bits = 0x8000
    a = abs(np.float64(v))
    if a == math.inf:
        bits |= 0x7C00
    elif a != 0.0:
        m, e = math.frexp(a)
        if e - 1 < -14:  # subnormal: a multiple of 2**-24
            bits |= int(math.ldexp(a, 24))
        else:
            bits |= ((e - 1 + 15) << 10) | int((m * 2.0 - 1.0) * 1024.0)
    out[pos] = bits & 0xFF
    out[pos + 1] = bits >> 8


@njit(inline="always", cache=True, error_model="numpy")
def _store_fp16(out, pos, v, fbuf, ubuf):  # pragma: no cover - compiled
    """``_put_fp16(out, pos, _fp16_round(v))`` in integer arithmetic on v's float32 bits (``fbuf`` a
    1-element float32 array, ``ubuf`` its uint32 view): no libm frexp/ldexp calls, which cost about
    as much as the rest of a 32-weight block. Round to nearest even, overflow to Inf, as
    GGML_FP32_TO_FP16; v is finite (the quantizer refuses NaN/Inf input)."""
    fbuf[0] = v
    f = np.int64(ubuf[0])
    sign = (f >> 16) & 0x8000
    f &= 0x7FFFFFFF
    if f < 0x38800000:  # below fp16's smallest normal: a multiple of 2**-24, or zero
        if f < 0x33000000:
            h = 0
        else:
            e = f >> 23
            m = 0x800000 | (f & 0x7FFFFF)
            shift = 126 - e
            h = m >> shift
            rem = m & ((1 << shift) - 1)
            half = 1 << (shift - 1)
            if rem > half or (rem == half and (h & 1) == 1):
                h += 1
    else:
        h = (f >> 13) - (112 << 10)
        rem = f & 0x1FFF
        if rem > 0x1000 or (rem == 0x1000 and (h & 1) == 1):
            h += 1
        if h >= 0x7C00:
            h = 0x7C00
    bits = sign | h
    out[pos] = bits & 0xFF
    out[pos + 1] = bits >> 8


@njit(cache=True, error_model="numpy")
def _make_qp_quants(n, nmax, x, L, qw, fbuf, ibuf):  # pragma: no cover - compiled
    """make_qp_quants(n, nmax, x, L, quant_weights); L is uint8 in C, hence the & 0xFF."""
    mx = _ZERO
    for i in range(n):
        mx = max(mx, x[i])
    if mx < _EPS:
        for i in range(n):
            L[i] = 0
        return _ZERO
    nmaxf = np.float32(nmax)
    iscale = nmaxf / mx
    for i in range(n):
        L[i] = _nearest_int(iscale * x[i], fbuf, ibuf) & 0xFF
    scale = _ONE / iscale
    best_mse = _ZERO
    for i in range(n):
        diff = x[i] - scale * np.float32(L[i])
        best_mse = best_mse + qw[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (_TENTH * np.float32(step) + nmaxf) / mx
        scale_is = _ONE / iscale_is
        mse = _ZERO
        for i in range(n):
            l = min(nmax, _nearest_int(iscale_is * x[i], fbuf, ibuf))
            diff = x[i] - scale_is * np.float32(l)
            mse = mse + qw[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = _ZERO
    suml2 = _ZERO
    for i in range(n):
        l = min(nmax, _nearest_int(iscale * x[i], fbuf, ibuf))
        L[i] = l & 0xFF
        fl = np.float32(l)  # the int, not the stored uint8: they differ for x < 0 (IQ2_XXS signs)
        w = qw[i]
        sumlx = sumlx + w * x[i] * fl
        suml2 = suml2 + w * fl * fl
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = qw[i]
            fl = np.float32(L[i])
            slx = sumlx - w * x[i] * fl
            sl2 = suml2 - w * fl * fl
            if slx > _ZERO and sl2 > _ZERO:
                new_l = min(nmax, _nearest_int(x[i] * sl2 / slx, fbuf, ibuf))
                if new_l != L[i]:
                    fn = np.float32(new_l)
                    slx = slx + w * x[i] * fn
                    sl2 = sl2 + w * fn * fn
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > _ZERO else _ZERO


@njit(inline="always", cache=True, error_model="numpy")
def _row_sigma2(x, n):  # pragma: no cover - compiled
    sum_x2 = _ZERO
    for j in range(n):
        sum_x2 = sum_x2 + x[j] * x[j]
    return sum_x2 / np.float32(n)


@njit(inline="always", cache=True, error_model="numpy")
def _put_qs_qh(out, o, L, with_qh):  # pragma: no cover - compiled
    """A 32-weight block's levels: low nibbles of pairs (j, j + 16) at out[o:o+16], and with
    ``with_qh`` the fifth bits as a little-endian uint32 at out[o-4:o] (Q5_0 / Q5_1 layout)."""
    qh = 0
    for j in range(16):
        x0 = L[j]
        x1 = L[j + 16]
        out[o + j] = (x0 & 0x0F) | ((x1 & 0x0F) << 4)
        qh |= ((x0 & 0x10) >> 4) << j
        qh |= ((x1 & 0x10) >> 4) << (j + 16)
    if with_qh:
        for k in range(4):
            out[o - 4 + k] = (qh >> (8 * k)) & 0xFF


@njit(cache=True, error_model="numpy")
def _all_finite(A):  # pragma: no cover - compiled
    for i in range(A.shape[0]):
        for j in range(A.shape[1]):
            if not np.isfinite(A[i, j]):
                return False
    return True


@njit(cache=True, error_model="numpy")
def _sub_blocks(X, sub):  # pragma: no cover - compiled
    """X (rows, n) -> (sub, S): column s = r * (n // sub) + b is sub-block b of row r."""
    rows, n = X.shape
    per = n // sub
    XT = np.empty((sub, rows * per), np.float32)
    for r in range(rows):
        for b in range(per):
            for i in range(sub):
                XT[i, r * per + b] = X[r, sub * b + i]
    return XT


# Columns searched together: the vectorised kernels sweep their inputs once per candidate scale
# (20 to 38 sweeps), so a tile must stay in the L2 cache (256 columns of 32: about 100 KiB).
_TILE = 256


@njit(cache=True, error_model="numpy")
def _search_tile(XT, WT, nmax, with_min, SC, MN, LT):  # pragma: no cover - compiled
    """make_qx_quants / make_qkx3_quants of every column of one tile: all at once when the
    vectorised kernels are exact for them (finite values inside the rounding trick's range),
    else one column at a time as C."""
    if _all_finite(XT) and _all_finite(WT):
        if with_min:
            if qkx_search_vec(XT, WT, nmax, _RMIN, _RDELTA, 36, SC, MN, LT):
                return
        elif qx_search_vec(XT, WT, nmax, SC, LT):
            return
    sub, S = XT.shape
    x = np.empty(sub, np.float32)
    w = np.empty(sub, np.float32)
    L = np.empty(sub, np.int64)
    Laux = np.empty(sub, np.int64)
    fbuf = np.empty(1, np.float32)
    ibuf = fbuf.view(np.int32)
    for s in range(S):
        for i in range(sub):
            x[i] = XT[i, s]
            w[i] = WT[i, s]
        if with_min:
            SC[s], MN[s] = _make_qkx_quants(sub, nmax, x, w, L, Laux, _RMIN, _RDELTA, 36, fbuf, ibuf)
        else:
            SC[s] = _make_qx_quants(sub, nmax, x, L, w, fbuf, ibuf)
        for i in range(sub):
            LT[i, s] = L[i] & 0xFF


@njit(cache=True, error_model="numpy")
def _search(XT, WT, nmax, with_min, SC, MN, LT):  # pragma: no cover - compiled
    """Every sub-block's (column's) make_qx_quants(n, nmax, rmse 1) or, ``with_min``,
    make_qkx3_quants(n, nmax, rmin -0.9, rdelta 0.05, 36 steps) with weights WT: fills the scales
    SC, the negated mins MN and the levels LT, a cache-sized tile of columns at a time."""
    sub, S = XT.shape
    for t0 in range(0, S, _TILE):
        t1 = min(S, t0 + _TILE)
        lt = np.empty((sub, t1 - t0), np.uint8)
        _search_tile(
            np.ascontiguousarray(XT[:, t0:t1]), np.ascontiguousarray(WT[:, t0:t1]), nmax, with_min,
            SC[t0:t1], MN[t0:t1], lt,
        )
        LT[:, t0:t1] = lt


@njit(cache=True, error_model="numpy")
def _legacy_rows(X, QW, OUT, nmax, with_min, block_bytes):  # pragma: no cover - compiled
    """quantize_row_q{4,5}_{0,1}_impl. Per block the weights are qw * sqrt(sigma2 + x^2) (sigma2:
    the row's mean square); symmetric types (_0) use make_qx_quants(32, nmax), types with a min (_1)
    make_qkx3_quants(32, 2 * nmax - 1). Layout: d [, m] [, qh], qs."""
    rows, n = X.shape
    per = n // 32
    XT = _sub_blocks(X, 32)
    WT = np.empty_like(XT)
    for r in range(rows):
        sigma2 = _row_sigma2(X[r], n)
        for b in range(per):
            for j in range(32):
                xj = XT[j, r * per + b]
                WT[j, r * per + b] = QW[32 * b + j] * np.sqrt(sigma2 + xj * xj)
    SC = np.empty(rows * per, np.float32)
    MN = np.empty(rows * per, np.float32)
    LT = np.empty((32, rows * per), np.uint8)
    _search(XT, WT, 2 * nmax - 1 if with_min else nmax, with_min, SC, MN, LT)
    L = np.empty(32, np.int64)
    with_qh = nmax == 16
    for r in range(rows):
        for b in range(per):
            s = r * per + b
            o = block_bytes * b
            _put_fp16(OUT[r], o, _fp16_round(SC[s]))
            o += 2
            if with_min:
                _put_fp16(OUT[r], o, _fp16_round(-MN[s]))
                o += 2
            for j in range(32):
                L[j] = LT[j, s]
            _put_qs_qh(OUT[r], o + 4 if with_qh else o, L, with_qh)


@njit(nogil=True, cache=True, error_model="numpy")
def q4_0(X, QW, OUT):  # pragma: no cover - compiled
    _legacy_rows(X, QW, OUT, 8, False, 18)


@njit(nogil=True, cache=True, error_model="numpy")
def q5_0(X, QW, OUT):  # pragma: no cover - compiled
    _legacy_rows(X, QW, OUT, 16, False, 22)


@njit(nogil=True, cache=True, error_model="numpy")
def q4_1(X, QW, OUT):  # pragma: no cover - compiled
    _legacy_rows(X, QW, OUT, 8, True, 20)


@njit(nogil=True, cache=True, error_model="numpy")
def q5_1(X, QW, OUT):  # pragma: no cover - compiled
    _legacy_rows(X, QW, OUT, 16, True, 24)


@njit(inline="always", cache=True, error_model="numpy")
def _scale_min_k4(j, q):  # pragma: no cover - compiled
    """get_scale_min_k4: the 6-bit scale and min of sub-block j from the 12 packed bytes."""
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


@njit(cache=True, error_model="numpy")
def _qkx_search(X, QW, nmax):  # pragma: no cover - compiled
    """The sub-block searches of quantize_row_q4_K_impl / q5_K_impl for all rows: weights
    qw * sqrt(sigma2 + x^2) with sigma2 = 2 * the super-block's mean square. Returns the scales,
    negated mins, sums of weights (per 32-weight sub-block) and levels (32, S)."""
    rows, n = X.shape
    per = n // 32
    XT = _sub_blocks(X, 32)
    WT = np.empty_like(XT)
    SW = np.empty(rows * per, np.float32)
    for r in range(rows):
        for ibk in range(n // _QK_K):
            sum_x2 = _ZERO
            for i in range(_QK_K):
                xi = X[r, _QK_K * ibk + i]
                sum_x2 = sum_x2 + xi * xi
            sigma2 = _TWO * sum_x2 / np.float32(_QK_K)
            for j in range(8):
                s = r * per + 8 * ibk + j
                sumw = _ZERO
                for i in range(32):
                    xi = XT[i, s]
                    WT[i, s] = QW[_QK_K * ibk + 32 * j + i] * np.sqrt(sigma2 + xi * xi)
                    sumw = sumw + WT[i, s]
                SW[s] = sumw
    SC = np.empty(rows * per, np.float32)
    MN = np.empty(rows * per, np.float32)
    LT = np.empty((32, rows * per), np.uint8)
    _search(XT, WT, nmax, True, SC, MN, LT)
    return SC, MN, SW, LT


@njit(cache=True, error_model="numpy")
def _qkx_superblock(x, nmax, clamp63, L, sc, scales, mins, sw, Ls, Lm, fbuf, ibuf):  # pragma: no cover - compiled
    """The rest of quantize_row_q4_K_impl / q5_K_impl for one 256-weight super-block, given its
    sub-blocks' searched scales, mins, weight sums and levels (in L): fills L (final levels), sc (the
    12 packed scale bytes) and returns (d, dmin) rounded to fp16."""
    d_block = _fp16_round(_make_qp_quants(8, 63, scales, Ls, sw, fbuf, ibuf))
    m_block = _fp16_round(_make_qp_quants(8, 63, mins, Lm, sw, fbuf, ibuf))
    for j in range(12):
        sc[j] = 0
    for j in range(8):
        ls = min(63, Ls[j]) if clamp63 else Ls[j]
        lm = min(63, Lm[j]) if clamp63 else Lm[j]
        if j < 4:
            sc[j] = ls
            sc[j + 4] = lm
        else:
            sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            sc[j - 4] |= (ls >> 4) << 6
            sc[j] |= (lm >> 4) << 6
    for j in range(12):
        sc[j] &= 0xFF  # uint8 in C
    for j in range(8):
        s6, m6 = _scale_min_k4(j, sc)
        d = d_block * np.float32(s6)
        if d == _ZERO:
            continue
        dm = m_block * np.float32(m6)
        for i in range(32):
            l = _nearest_int((x[32 * j + i] + dm) / d, fbuf, ibuf)
            L[32 * j + i] = max(0, min(nmax, l))
    return d_block, m_block


@njit(cache=True, error_model="numpy")
def _qkx_rows(X, QW, OUT, nmax, block_bytes):  # pragma: no cover - compiled
    """quantize_row_q4_K_impl (nmax 15, 144-byte blocks) and quantize_row_q5_K_impl (nmax 31, 176
    bytes: the fifth bits in qh, scales clamped to 63). Layout: d, dmin, scales[12] [, qh[32]], qs."""
    rows, n = X.shape
    SC, MN, SW, LT = _qkx_search(X, QW, nmax)
    L = np.zeros(_QK_K, np.int64)
    sc = np.zeros(12, np.int64)
    Ls = np.empty(8, np.int64)
    Lm = np.empty(8, np.int64)
    fbuf = np.empty(1, np.float32)
    ibuf = fbuf.view(np.int32)
    five_bits = nmax == 31
    per = n // 32
    for r in range(rows):
        for ibk in range(n // _QK_K):
            x = X[r, _QK_K * ibk : _QK_K * ibk + _QK_K]
            s0 = r * per + 8 * ibk
            for j in range(8):
                for i in range(32):
                    L[32 * j + i] = LT[i, s0 + j]
            d, dmin = _qkx_superblock(
                x, nmax, five_bits, L, sc, SC[s0 : s0 + 8], MN[s0 : s0 + 8], SW[s0 : s0 + 8], Ls, Lm, fbuf, ibuf
            )
            o = block_bytes * ibk
            _put_fp16(OUT[r], o, d)
            _put_fp16(OUT[r], o + 2, dmin)
            for j in range(12):
                OUT[r, o + 4 + j] = sc[j]
            qh = o + 16
            ql = o + 48 if five_bits else o + 16
            if five_bits:
                for i in range(32):
                    OUT[r, qh + i] = 0
            for k in range(4):  # 64 weights per step: pairs (i, i + 32) share a byte of qs
                base = 64 * k
                for i in range(32):
                    l1 = L[base + i]
                    l2 = L[base + i + 32]
                    if five_bits:
                        if l1 > 15:
                            l1 -= 16
                            OUT[r, qh + i] |= 1 << (2 * k)
                        if l2 > 15:
                            l2 -= 16
                            OUT[r, qh + i] |= 2 << (2 * k)
                    OUT[r, ql + 32 * k + i] = l1 | (l2 << 4)


@njit(nogil=True, cache=True, error_model="numpy")
def q4_k(X, QW, OUT):  # pragma: no cover - compiled
    _qkx_rows(X, QW, OUT, 15, 144)


@njit(nogil=True, cache=True, error_model="numpy")
def q5_k(X, QW, OUT):  # pragma: no cover - compiled
    _qkx_rows(X, QW, OUT, 31, 176)


@njit(nogil=True, cache=True, error_model="numpy")
def q6_k(X, QW, OUT):  # pragma: no cover - compiled
    """quantize_row_q6_K_impl: make_qx_quants(16, 32) weighted by qw directly (no sigma2 term)."""
    rows, n = X.shape
    per = n // 16
    XT = _sub_blocks(X, 16)
    WT = np.empty_like(XT)
    for r in range(rows):
        for b in range(per):
            for i in range(16):
                WT[i, r * per + b] = QW[16 * b + i]
    SC = np.empty(rows * per, np.float32)
    LT = np.empty((16, rows * per), np.uint8)
    _search(XT, WT, 32, False, SC, np.empty(rows * per, np.float32), LT)
    L = np.zeros(_QK_K, np.int64)
    scales = np.empty(16, np.float32)
    isc = np.empty(16, np.int64)
    fbuf = np.empty(1, np.float32)
    ibuf = fbuf.view(np.int32)
    for r in range(rows):
        for ibk in range(n // _QK_K):
            x = X[r, _QK_K * ibk : _QK_K * ibk + _QK_K]
            o = 210 * ibk
            max_scale = _ZERO
            max_abs_scale = _ZERO
            for ib in range(16):
                s = SC[r * per + 16 * ibk + ib]
                for i in range(16):
                    L[16 * ib + i] = LT[i, r * per + 16 * ibk + ib]
                scales[ib] = s
                if abs(s) > max_abs_scale:
                    max_abs_scale = abs(s)
                    max_scale = s
            if max_abs_scale < _EPS:
                for k in range(210):
                    OUT[r, o + k] = 0
                continue
            iscale = np.float32(-128.0) / max_scale
            d = _fp16_round(_ONE / iscale)
            _put_fp16(OUT[r], o + 208, d)
            for ib in range(16):
                v = min(127, _nearest_int(iscale * scales[ib], fbuf, ibuf))
                # int8 in C: keep the two's-complement value for the multiply below
                v = ((v + 128) & 0xFF) - 128
                isc[ib] = v
                OUT[r, o + 192 + ib] = v & 0xFF
            for j in range(16):
                dj = d * np.float32(isc[j])
                if dj == _ZERO:
                    continue
                for i in range(16):
                    l = _nearest_int(x[16 * j + i] / dj, fbuf, ibuf)
                    L[16 * j + i] = max(-32, min(31, l)) + 32
            ql = o
            qh = o + 128
            for base in range(0, _QK_K, 128):
                for i in range(32):
                    q1 = L[base + i] & 0xF
                    q2 = L[base + i + 32] & 0xF
                    q3 = L[base + i + 64] & 0xF
                    q4 = L[base + i + 96] & 0xF
                    OUT[r, ql + i] = q1 | (q3 << 4)
                    OUT[r, ql + i + 32] = q2 | (q4 << 4)
                    OUT[r, qh + i] = (
                        (L[base + i] >> 4)
                        | ((L[base + i + 32] >> 4) << 2)
                        | ((L[base + i + 64] >> 4) << 4)
                        | ((L[base + i + 96] >> 4) << 6)
                    )
                ql += 64
                qh += 32
