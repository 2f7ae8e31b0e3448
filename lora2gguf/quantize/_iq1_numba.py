"""numba kernels of llama.cpp's 1.5- and 1.75-bit quantizers: IQ1_S and IQ1_M.

Each kernel follows one C function of ggml-quants.c (``quantize_row_iq1_s_impl``,
``quantize_row_iq1_m_impl``) loop for loop, in float32 scalars, under the rules of
:mod:`lora2gguf.quantize._iq_numba` (no fastmath: numba neither reorders nor fuses operations).

Both search the two boundaries that split a group's sorted weights into the levels -1, 0, +1
(shifted by +-delta) exhaustively; the sort is glibc's ``qsort`` of (value, index) pairs, which is
a merge sort: stable, so equal values keep their index order, and :func:`_msort` is that merge
sort (for the power-of-two group sizes here glibc's top-down halving and this bottom-up merge
visit the same runs, so the result is the same even for NaN). Groups whose levels are off the
2048-point grid take the best neighbour (``iq1_find_best_neighbour2``) from the kmap / neighbour
tables of :func:`lora2gguf.quantize._iq_numba.neighbour_tables` (``iq2xs_init_impl`` for IQ1);
``GRID`` is the int8 grid in ``2*l + 1`` coordinates, whose level ``l`` (``>> 1``) indexes the
shifted values -1 +- delta, +-delta, 1 +- delta.

``X``, ``QW``, ``OUT`` as in :mod:`lora2gguf.quantize._iq_numba`; ``DELTA`` is the grid shift
(``IQ1S_DELTA``, from gguf-py). A kernel returns 0, 1 where llama.cpp aborts (``GGML_ASSERT``), or
2 where its fallback search would read past the group (no neighbour closer than FLT_MAX: only on
overflowing input); the caller refuses the tensor on either.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from lora2gguf.quantize._iq_numba import _fmax, _sigma2
from lora2gguf.quantize._kq_numba import _nearest_int
from lora2gguf.quantize._lowbit_numba import _store_fp16
from lora2gguf.quantize._weighted_numba import _fp16_round

_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_HALF = np.float32(0.5)
_TWO = np.float32(2.0)
_EPS_IQ1_S = np.float32(1e-12)  # GROUP_MAX_EPS_IQ1_S
_EPS_IQ1_M = np.float32(1e-7)  # GROUP_MAX_EPS_IQ1_M
_FLT_MAX = np.float32(3.4028234663852886e38)
_QK_K = 256


@njit(inline="always", cache=True, error_model="numpy")
def _shifted_levels(delta):  # pragma: no cover - compiled
    """x_p, x_m of the C code: the levels -1, 0, 1 shifted by +delta and by -delta."""
    xs = np.empty((2, 3), np.float32)
    xs[0, 0], xs[0, 1], xs[0, 2] = -_ONE + delta, delta, _ONE + delta
    xs[1, 0], xs[1, 1], xs[1, 2] = -_ONE - delta, -delta, _ONE - delta
    return xs


@njit(inline="always", cache=True, error_model="numpy")
def _msort(keys, ids, tk, ti, n):  # pragma: no cover - compiled
    """glibc qsort (msort_with_tmp) of the pairs (keys[j], ids[j]), j < n (a power of two), by key:
    the left run's element goes first unless it compares greater (iq1_sort_helper's 1)."""
    w = 1
    while w < n:
        for lo in range(0, n, 2 * w):
            a = lo
            b = lo + w
            a_end = b
            b_end = lo + 2 * w
            k = lo
            while a < a_end and b < b_end:
                if keys[a] > keys[b]:
                    tk[k] = keys[b]
                    ti[k] = ids[b]
                    b += 1
                else:
                    tk[k] = keys[a]
                    ti[k] = ids[a]
                    a += 1
                k += 1
            while a < a_end:
                tk[k] = keys[a]
                ti[k] = ids[a]
                a += 1
                k += 1
            while b < b_end:
                tk[k] = keys[b]
                ti[k] = ids[b]
                b += 1
                k += 1
        for j in range(n):
            keys[j] = tk[j]
            ids[j] = ti[j]
        w *= 2


@njit(inline="always", cache=True, error_model="numpy")
def _sorted_groups(xb, n, keys, ids, tk, ti):  # pragma: no cover - compiled
    for j in range(n):
        keys[j] = xb[j]
        ids[j] = j
    _msort(keys, ids, tk, ti, n)


@njit(inline="always", cache=True, error_model="numpy")
def _max_abs(xb, n):  # pragma: no cover - compiled
    mx = abs(xb[0])
    for i in range(1, n):
        mx = _fmax(mx, abs(xb[i]))
    return mx


@njit(inline="always", cache=True, error_model="numpy")
def _group_weights(xb, qw, qo, n, use_qw, sigma2, weight):  # pragma: no cover - compiled
    for i in range(n):
        xi = xb[i]
        weight[i] = qw[qo + i] * np.sqrt(sigma2 + xi * xi) if use_qw else xi * xi


@njit(inline="always", cache=True, error_model="numpy")
def _levels(ids, n, i1, i2, L):  # pragma: no cover - compiled
    """L of the split: the sorted weights below i1 -> 0, below i2 -> 1, the rest -> 2."""
    for j in range(n):
        L[ids[j]] = 0 if j < i1 else 1 if j < i2 else 2


@njit(inline="always", cache=True, error_model="numpy")
def _neighbour(NEIGH, start, GRID, xb, xo, weight, scale, xx, L, err):  # pragma: no cover - compiled
    """iq1_find_best_neighbour2 for the 8 weights xb[xo:xo+8]: writes L[xo:xo+8], returns the index."""
    best = _FLT_MAX
    grid_index = -1
    for j in range(1, np.int64(NEIGH[start]) + 1):
        g = np.int64(NEIGH[start + j])
        d2 = _ZERO
        for i in range(8):
            q = xx[GRID[g, i] >> 1]
            diff = scale * q - xb[xo + i]
            d2 = d2 + weight[xo + i] * diff * diff
        if d2 < best:
            best = d2
            grid_index = g
    if grid_index < 0:
        err[0] = 2
        return 0
    for i in range(8):
        L[xo + i] = GRID[grid_index, i] >> 1
    return grid_index


@njit(inline="always", cache=True, error_model="numpy")
def _grid_index(GRID, KMAP, NEIGH, xb, xo, weight, scale, xx, L, err):  # pragma: no cover - compiled
    """(grid index of L[xo:xo+8], on the grid); off the grid L becomes its best neighbour."""
    u = 0
    for j in range(8):
        u |= L[xo + j] << (2 * j)
    g = np.int64(KMAP[u])
    if g >= 0:
        return g, True
    return _neighbour(NEIGH, -g - 1, GRID, xb, xo, weight, scale, xx, L, err), False


@njit(inline="always", cache=True, error_model="numpy")
def _refit(GRID, index, xb, weight, xs, sel, n_groups):  # pragma: no cover - compiled
    """sumqx, sumq2 of the chosen grid points; group k uses the levels xs[sel[k]]."""
    sumqx = _ZERO
    sumq2 = _ZERO
    for k in range(n_groups):
        for j in range(8):
            w = weight[8 * k + j]
            q = xs[sel[k], GRID[index[k], j] >> 1]
            sumqx = sumqx + w * q * xb[8 * k + j]
            sumq2 = sumq2 + w * q * q
    return sumqx, sumq2


@njit(inline="always", cache=True, error_model="numpy")
def _iq1_s_split(sumx, sumw, xs, n, mx):  # pragma: no cover - compiled
    """The exhaustive split search of quantize_row_iq1_s_impl: (scale, i1, i2, shift)."""
    p0, p1, p2 = xs[0, 0], xs[0, 1], xs[0, 2]
    m0, m1, m2 = xs[1, 0], xs[1, 1], xs[1, 2]
    best_score = -_FLT_MAX
    scale = mx
    besti1 = -1
    besti2 = -1
    best_shift = 0
    for i1 in range(n + 1):
        a = sumx[i1] - sumx[0]
        aw = sumw[i1] - sumw[0]
        for i2 in range(i1, n + 1):
            b = sumx[i2] - sumx[i1]
            c = sumx[n] - sumx[i2]
            bw = sumw[i2] - sumw[i1]
            cw = sumw[n] - sumw[i2]
            sumqx = a * p0 + b * p1 + c * p2
            sumq2 = aw * p0 * p0 + bw * p1 * p1 + cw * p2 * p2
            if sumq2 > _ZERO and sumqx * sumqx > best_score * sumq2:
                scale = sumqx / sumq2
                best_score = scale * sumqx
                besti1 = i1
                besti2 = i2
                best_shift = 1
            sumqx = a * m0 + b * m1 + c * m2
            sumq2 = aw * m0 * m0 + bw * m1 * m1 + cw * m2 * m2
            if sumq2 > _ZERO and sumqx * sumqx > best_score * sumq2:
                scale = sumqx / sumq2
                best_score = scale * sumqx
                besti1 = i1
                besti2 = i2
                best_shift = -1
    return scale, besti1, besti2, best_shift


@njit(inline="always", cache=True, error_model="numpy")
def _iq1_s_group(  # pragma: no cover - compiled
    xb, weight, mx, keys, ids, tk, ti, sumx, sumw, xs, L, sel, index, GRID, KMAP, NEIGH, err
):
    """One 32-weight group of quantize_row_iq1_s_impl: (scale, shift +-1), index[0:4] set; shift 0: empty."""
    bs = 32
    _sorted_groups(xb, bs, keys, ids, tk, ti)
    for j in range(bs):
        i = ids[j]
        sumx[j + 1] = sumx[j] + weight[i] * xb[i]
        sumw[j + 1] = sumw[j] + weight[i]
    scale, besti1, besti2, best_shift = _iq1_s_split(sumx, sumw, xs, bs, mx)
    if besti1 < 0 or besti2 < 0 or best_shift == 0:
        return _ZERO, 0
    _levels(ids, bs, besti1, besti2, L)
    if scale < _ZERO:
        for j in range(bs):
            L[j] = 2 - L[j]
        scale = -scale
        best_shift = -best_shift
    s = 0 if best_shift == 1 else 1
    all_on_grid = True
    for k in range(bs // 8):
        sel[k] = s
        g, on = _grid_index(GRID, KMAP, NEIGH, xb, 8 * k, weight, scale, xs[s], L, err)
        index[k] = g
        all_on_grid = all_on_grid and on
    if not all_on_grid:
        sumqx, sumq2 = _refit(GRID, index, xb, weight, xs, sel, bs // 8)
        if sumqx > _ZERO and sumq2 > _ZERO:
            scale = sumqx / sumq2
    return scale, best_shift


@njit(nogil=True, cache=True, error_model="numpy")
def iq1_s(X, QW, GRID, KMAP, NEIGH, DELTA, OUT):  # pragma: no cover - compiled
    """quantize_row_iq1_s_impl: 50-byte blocks (d, qs[32], qh[8] = 3 high index bits x 4 | 3-bit
    scale | shift sign), 8 groups of 32 weights."""
    rows, n = X.shape
    bs = 32
    xs = _shifted_levels(DELTA)
    scales = np.zeros(8, np.float32)
    shifts = np.zeros(8, np.int64)
    weight = np.zeros(bs, np.float32)
    L = np.zeros(bs, np.int64)
    keys, tk = np.zeros(bs, np.float32), np.zeros(bs, np.float32)
    ids, ti = np.zeros(bs, np.int64), np.zeros(bs, np.int64)
    sumx, sumw = np.zeros(bs + 1, np.float32), np.zeros(bs + 1, np.float32)
    index, sel = np.zeros(4, np.int64), np.zeros(4, np.int64)
    fbuf = np.empty(1, np.float32)
    ibuf = fbuf.view(np.int32)
    err = np.zeros(1, np.int64)
    for r in range(rows):
        for ibl in range(n // _QK_K):
            xbl = X[r, _QK_K * ibl : _QK_K * ibl + _QK_K]
            o = 50 * ibl
            OUT[r, o : o + 50] = 0
            max_scale = _ZERO
            sigma2 = _sigma2(xbl, _TWO)
            for ib in range(8):
                xb = xbl[bs * ib : bs * ib + bs]
                _group_weights(xb, QW, _QK_K * ibl + bs * ib, bs, True, sigma2, weight)
                mx = _max_abs(xb, bs)
                scales[ib] = _ZERO
                shifts[ib] = 1
                if mx < _EPS_IQ1_S:
                    continue
                scale, shift = _iq1_s_group(
                    xb, weight, mx, keys, ids, tk, ti, sumx, sumw, xs, L, sel, index, GRID, KMAP, NEIGH, err
                )
                if err[0]:
                    return err[0]
                if shift == 0:
                    continue
                h = 0
                for k in range(bs // 8):
                    OUT[r, o + 2 + (bs // 8) * ib + k] = index[k] & 255
                    h |= (index[k] >> 8) << (3 * k)
                OUT[r, o + 34 + 2 * ib] = h & 255
                OUT[r, o + 35 + 2 * ib] = h >> 8
                if not scale >= _ZERO:
                    return 1
                scales[ib] = scale
                shifts[ib] = shift
                max_scale = _fmax(max_scale, scale)
            if max_scale == _ZERO:
                continue
            d = max_scale / np.float32(15)
            _store_fp16(OUT[r], o, _fp16_round(d * np.float32(1.125)), fbuf, ibuf)
            idv = _ONE / d
            for ib in range(8):
                l = max(0, min(7, _nearest_int(_HALF * (idv * scales[ib] - _ONE), fbuf, ibuf)))
                if shifts[ib] == -1:
                    l |= 8
                OUT[r, o + 35 + 2 * ib] |= l << 4
    return err[0]


@njit(inline="always", cache=True, error_model="numpy")
def _iq1_m_split(px, pw, xs, n, mx):  # pragma: no cover - compiled
    """The split search of quantize_row_iq1_m_impl over per-half prefix sums, each half with its own
    shift sign (k: 0 ++, 1 +-, 2 -+, 3 --): (scale, i1, i2, k)."""
    txs0, txs1 = px[0, n], px[1, n]
    tws0, tws1 = pw[0, n], pw[1, n]
    p2, m2 = xs[0, 2], xs[1, 2]
    cp1 = xs[0, 0] * xs[0, 0] - xs[0, 1] * xs[0, 1]
    cp2 = xs[0, 1] * xs[0, 1] - xs[0, 2] * xs[0, 2]
    cm1 = xs[1, 0] * xs[1, 0] - xs[1, 1] * xs[1, 1]
    cm2 = xs[1, 1] * xs[1, 1] - xs[1, 2] * xs[1, 2]
    tp0, tm0, tp1, tm1 = txs0 * p2, txs0 * m2, txs1 * p2, txs1 * m2
    wp0, wm0, wp1, wm1 = tws0 * p2 * p2, tws0 * m2 * m2, tws1 * p2 * p2, tws1 * m2 * m2
    best_score = -_FLT_MAX
    scale = mx
    besti1 = -1
    besti2 = -1
    best_k = -1
    for i1 in range(n + 1):
        for i2 in range(i1, n + 1):
            sx0 = px[0, i1] + px[0, i2]
            sx1 = px[1, i1] + px[1, i2]
            qx_p0 = tp0 - sx0
            qx_m0 = tm0 - sx0
            qx_p1 = tp1 - sx1
            qx_m1 = tm1 - sx1
            q2_p0 = wp0 + pw[0, i1] * cp1 + pw[0, i2] * cp2
            q2_m0 = wm0 + pw[0, i1] * cm1 + pw[0, i2] * cm2
            q2_p1 = wp1 + pw[1, i1] * cp1 + pw[1, i2] * cp2
            q2_m1 = wm1 + pw[1, i1] * cm1 + pw[1, i2] * cm2
            # the four sign choices (k: 0 ++, 1 +-, 2 -+, 3 --), tried in this order
            candidates = (
                (qx_p0 + qx_p1, q2_p0 + q2_p1),
                (qx_p0 + qx_m1, q2_p0 + q2_m1),
                (qx_m0 + qx_p1, q2_m0 + q2_p1),
                (qx_m0 + qx_m1, q2_m0 + q2_m1),
            )
            for k in range(4):
                sumqx, sumq2 = candidates[k]
                if sumq2 > _ZERO and sumqx * sumqx > best_score * sumq2:
                    scale = sumqx / sumq2
                    best_score = scale * sumqx
                    besti1, besti2, best_k = i1, i2, k
    return scale, besti1, besti2, best_k


@njit(inline="always", cache=True, error_model="numpy")
def _half_sums(xb, weight, ids, n, px, pw):  # pragma: no cover - compiled
    """Prefix sums over the sorted weights, kept per half of the group (the halves' shifts differ)."""
    for j in range(n):
        i = ids[j]
        h = 0 if i < n // 2 else 1
        px[h, j + 1] = px[h, j] + weight[i] * xb[i]
        px[1 - h, j + 1] = px[1 - h, j]
        pw[h, j + 1] = pw[h, j] + weight[i]
        pw[1 - h, j + 1] = pw[1 - h, j]


@njit(inline="always", cache=True, error_model="numpy")
def _iq1_m_group(  # pragma: no cover - compiled
    xb, weight, mx, keys, ids, tk, ti, px, pw, xs, L, sel, index, GRID, KMAP, NEIGH, err
):
    """One 16-weight group of quantize_row_iq1_m_impl: (scale, shift k), index[0:2] set; k < 0: empty."""
    bs = 16
    _sorted_groups(xb, bs, keys, ids, tk, ti)
    _half_sums(xb, weight, ids, bs, px, pw)
    scale, besti1, besti2, best_k = _iq1_m_split(px, pw, xs, bs, mx)
    if besti1 < 0 or besti2 < 0 or best_k < 0:
        return _ZERO, -1
    _levels(ids, bs, besti1, besti2, L)
    if scale < _ZERO:
        for j in range(bs):
            L[j] = 2 - L[j]
        scale = -scale
        best_k = 3 - best_k
    sel[0] = 0 if best_k < 2 else 1
    sel[1] = 0 if best_k % 2 == 0 else 1
    all_on_grid = True
    for k in range(2):
        g, on = _grid_index(GRID, KMAP, NEIGH, xb, 8 * k, weight, scale, xs[sel[k]], L, err)
        index[k] = g
        all_on_grid = all_on_grid and on
    if not all_on_grid:
        sumqx, sumq2 = _refit(GRID, index, xb, weight, xs, sel, 2)
        if sumqx > _ZERO and sumq2 > _ZERO:
            scale = sumqx / sumq2
    return scale, best_k


@njit(inline="always", cache=True, error_model="numpy")
def _iq1_m_scales(  # pragma: no cover - compiled
    out, o, xbl, QW, qo, use_qw, sigma2, weight, scales, shifts, max_scale, xs, GRID, fbuf, ibuf
):
    """The end of a quantize_row_iq1_m_impl block: the 3-bit group scales, the shift bits, and the
    fp16 super-scale refitted over the whole block, in the top nibbles of the four scale words."""
    bs = 16
    d = max_scale / np.float32(15)
    idv = _ONE / d
    sumqx = _ZERO
    sumq2 = _ZERO
    for ib in range(16):
        l = max(0, min(7, _nearest_int(_HALF * (idv * scales[ib] - _ONE), fbuf, ibuf)))
        sc = o + 48 + 2 * (ib // 4)  # the little-endian uint16 scale word of group ib
        bits = l << (3 * (ib % 4))
        out[sc] |= bits & 255
        out[sc + 1] |= bits >> 8
        k = shifts[ib]  # masks {0x00, 0x80, 0x08, 0x88}: the shift bit of each half
        out[o + 32 + ib] |= (0x80 if k % 2 else 0) | (0x08 if k >= 2 else 0)
        xb = xbl[bs * ib : bs * ib + bs]
        _group_weights(xb, QW, qo + bs * ib, bs, use_qw, sigma2, weight)
        ql = np.float32(2 * l + 1)
        for h in range(2):
            s = (0 if k < 2 else 1) if h == 0 else (0 if k % 2 == 0 else 1)
            g = np.int64(out[o + 2 * ib + h]) + ((np.int64(out[o + 32 + ib]) << (8 - 4 * h)) & 0x700)
            for j in range(8):
                w = weight[8 * h + j]
                q = xs[s, GRID[g, j] >> 1] * ql
                sumqx = sumqx + w * q * xb[8 * h + j]
                sumq2 = sumq2 + w * q * q
    if sumq2 > _ZERO:
        d = sumqx / sumq2
    _store_fp16(out, o + 56, _fp16_round(d * np.float32(1.1125)), fbuf, ibuf)  # 2 scratch bytes past the block
    u = np.int64(out[o + 56]) | (np.int64(out[o + 57]) << 8)
    out[o + 56] = 0
    out[o + 57] = 0
    for i in range(4):  # nibble i of the fp16 bits in the top nibble of scale word i
        out[o + 49 + 2 * i] |= ((u >> (4 * i)) & 0xF) << 4


@njit(nogil=True, cache=True, error_model="numpy")
def iq1_m(X, QW, use_qw, GRID, KMAP, NEIGH, DELTA, OUT):  # pragma: no cover - compiled
    """quantize_row_iq1_m_impl: 56-byte blocks (qs[32], qh[16] = 3 high index bits + shift bit per 8
    weights, scales[8] = 16 3-bit scales with the fp16 super-scale in their top nibbles), 16 groups
    of 16 weights; x^2 weights without an imatrix."""
    rows, n = X.shape
    bs = 16
    xs = _shifted_levels(DELTA)
    scales = np.zeros(16, np.float32)
    shifts = np.zeros(16, np.int64)
    weight = np.zeros(bs, np.float32)
    L = np.zeros(bs, np.int64)
    keys, tk = np.zeros(bs, np.float32), np.zeros(bs, np.float32)
    ids, ti = np.zeros(bs, np.int64), np.zeros(bs, np.int64)
    px, pw = np.zeros((2, bs + 1), np.float32), np.zeros((2, bs + 1), np.float32)
    index, sel = np.zeros(2, np.int64), np.zeros(2, np.int64)
    fbuf = np.empty(1, np.float32)
    ibuf = fbuf.view(np.int32)
    err = np.zeros(1, np.int64)
    row = np.zeros(OUT.shape[1] + 2, np.uint8)  # one output row and the super-scale's scratch bytes
    for r in range(rows):
        row[:] = 0
        for ibl in range(n // _QK_K):
            xbl = X[r, _QK_K * ibl : _QK_K * ibl + _QK_K]
            o = 56 * ibl
            max_scale = _ZERO
            sigma2 = _sigma2(xbl, _TWO)
            for ib in range(16):
                xb = xbl[bs * ib : bs * ib + bs]
                _group_weights(xb, QW, _QK_K * ibl + bs * ib, bs, use_qw, sigma2, weight)
                mx = _max_abs(xb, bs)
                scales[ib] = _ZERO
                shifts[ib] = 0
                if mx < _EPS_IQ1_M:
                    continue
                scale, k = _iq1_m_group(
                    xb, weight, mx, keys, ids, tk, ti, px, pw, xs, L, sel, index, GRID, KMAP, NEIGH, err
                )
                if err[0]:
                    return err[0]
                if k < 0:
                    continue
                row[o + 2 * ib] = index[0] & 255
                row[o + 2 * ib + 1] = index[1] & 255
                row[o + 32 + ib] = (index[0] >> 8) | ((index[1] >> 8) << 4)
                if not scale >= _ZERO:
                    return 1
                scales[ib] = scale
                shifts[ib] = k
                max_scale = _fmax(max_scale, scale)
            if max_scale != _ZERO:
                _iq1_m_scales(
                    row, o, xbl, QW, _QK_K * ibl, use_qw, sigma2, weight, scales, shifts, max_scale, xs, GRID, fbuf, ibuf
                )
        OUT[r, :] = row[: OUT.shape[1]]
    return err[0]
