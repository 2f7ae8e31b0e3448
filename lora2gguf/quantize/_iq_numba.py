"""numba kernels of llama.cpp's lattice quantizers: IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S.

Each kernel follows one C function of ggml-quants.c loop for loop, in float32 scalars, under the
rules of :mod:`lora2gguf.quantize._lowbit_numba` (numba keeps float32 for float32 operands and,
without fastmath, neither reorders nor fuses operations; C's implicit int -> float conversions are
written with ``np.float32``; ``MAX(a, b)`` is ``a > b ? a : b``, also for NaN).

:func:`neighbour_tables` is ``iq2xs_init_impl`` / ``iq3xs_init_impl``: for every point of the
lattice that is not on the grid, the grid points at its ``nwant`` smallest squared distances,
ordered by (distance, index) as their ``qsort`` leaves them. ``GRID`` is the ``(n, 8)`` (IQ2) or
``(n, 4)`` (IQ3) int8 grid in the C code's ``2*l + 1`` coordinates, ``KMAP`` the int32 map from a
packed point to its grid index (or ``-(offset + 1)`` into ``NEIGH``, the uint16 neighbour lists,
each prefixed by its length). The quantizers take the grid as float32 (the same small odd
integers, converted once instead of in every distance), and the level of a coordinate ``2*l + 1``
is ``>> 1``.

``X`` is ``(rows, n_per_row)`` float32, ``QW`` the ``(n_per_row,)`` float32 importance (ignored
where ``use_qw`` is false), ``OUT`` the ``(rows, row_bytes)`` uint8 result. A kernel returns 0, or
1 where llama.cpp would abort ("Oops: found point not on grid"): the caller refuses that tensor.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from lora2gguf.quantize._kq_numba import _nearest_int
from lora2gguf.quantize._lowbit_numba import _store_fp16
from lora2gguf.quantize._weighted_numba import _fp16_round, _make_qp_quants

_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_HALF = np.float32(0.5)
_TENTH = np.float32(0.1)
_FIFTH = np.float32(0.2)
_EPS = np.float32(1e-15)  # GROUP_MAX_EPS
_EPS_IQ3_XXS = np.float32(1e-8)  # GROUP_MAX_EPS_IQ3_XXS
_EPS_IQ2_S = np.float32(1e-8)  # GROUP_MAX_EPS_IQ2_S
_FLT_MAX = np.float32(3.4028234663852886e38)
_QK_K = 256


@njit(cache=True)
def neighbour_tables(GRID, bits, nwant, kmap_size):  # pragma: no cover - compiled
    """iq2xs_init_impl / iq3xs_init_impl after the grid: (kmap int32, neighbours uint16)."""
    n_grid, dim = GRID.shape
    kmap = np.full(kmap_size, -1, np.int32)
    for g in range(n_grid):
        index = 0
        for k in range(dim):
            index |= ((GRID[g, k] - 1) // 2) << (bits * k)
        kmap[index] = g
    mask = (1 << bits) - 1
    d2 = np.empty(n_grid, np.int64)
    count = np.zeros(4096, np.int64)
    pos = np.empty(dim, np.int64)
    cut = np.empty(kmap_size, np.int64)  # per missing point: the largest distance kept
    n_per_i = np.zeros(kmap_size, np.int64)
    for i in range(kmap_size):
        if kmap[i] >= 0:
            continue
        for k in range(dim):
            pos[k] = 2 * ((i >> (bits * k)) & mask) + 1
        count[:] = 0
        for j in range(n_grid):
            d = 0
            for k in range(dim):
                d += (GRID[j, k] - pos[k]) * (GRID[j, k] - pos[k])
            d2[j] = d
            count[d] += 1
        # the qsort order is (d2, j): keep the nwant smallest distinct distances
        nhave = 0
        n = 0
        for d in range(4096):
            if count[d]:
                nhave += 1
                n += count[d]
                cut[i] = d
                if nhave == nwant:
                    break
        n_per_i[i] = n
    total = 0
    for i in range(kmap_size):
        if kmap[i] < 0:
            total += 1 + n_per_i[i]
    neigh = np.zeros(total, np.uint16)
    counter = 0
    for i in range(kmap_size):
        if kmap[i] >= 0:
            continue
        for k in range(dim):
            pos[k] = 2 * ((i >> (bits * k)) & mask) + 1
        for j in range(n_grid):
            d = 0
            for k in range(dim):
                d += (GRID[j, k] - pos[k]) * (GRID[j, k] - pos[k])
            d2[j] = d
        kmap[i] = -(counter + 1)
        neigh[counter] = n_per_i[i]
        c = counter + 1
        for d in range(cut[i] + 1):
            for j in range(n_grid):
                if d2[j] == d:
                    neigh[c] = j
                    c += 1
        counter += 1 + n_per_i[i]
    return kmap, neigh


@njit(inline="always", cache=True, error_model="numpy")
def _find_best_neighbour(NEIGH, start, GRID, xval, xo, waux, scale, L, lo, err, dim):  # pragma: no cover - compiled
    """iq2_find_best_neighbour / iq3_find_best_neighbour: writes L[lo:lo+dim], returns the index.
    No neighbour closer than FLT_MAX (NaN input) is ggml's GGML_ASSERT(grid_index >= 0): err[0] = 1.
    ``dim`` is a constant at every call site, so the loops over a point's coordinates unroll as in C."""
    best_d2 = _FLT_MAX
    grid_index = -1
    for j in range(1, np.int64(NEIGH[start]) + 1):
        g = np.int64(NEIGH[start + j])
        d2 = _ZERO
        for i in range(dim):
            diff = scale * GRID[g, i] - xval[xo + i]
            d2 = d2 + waux[xo + i] * diff * diff
        if d2 < best_d2:
            best_d2 = d2
            grid_index = g
    if grid_index < 0:
        err[0] = 1
        return 0
    for i in range(dim):
        L[lo + i] = np.int64(GRID[grid_index, i]) >> 1
    return grid_index


@njit(inline="always", cache=True, error_model="numpy")
def _grid_point(GRID, KMAP, NEIGH, xval, xo, waux, scale, L, lo, bits, err):  # pragma: no cover - compiled
    """The packed L[lo:lo+dim] on the grid, or its best neighbour (which overwrites L): (index, on grid).
    IQ3 grids (bits 3) have 4 coordinates, IQ2 grids (bits 2) 8."""
    dim = 4 if bits == 3 else 8
    u = 0
    for i in range(dim):
        u |= np.int64(L[lo + i]) << (bits * i)
    g = np.int64(KMAP[u])
    if g >= 0:
        return g, True
    return _find_best_neighbour(NEIGH, -g - 1, GRID, xval, xo, waux, scale, L, lo, err, dim), False


@njit(inline="always", cache=True, error_model="numpy")
def _round_levels(idv, xval, o, n, kmax, L, fbuf, ibuf):  # pragma: no cover - compiled
    """L[o+i] = clamp(nearest_int(0.5*(id*xval - 1)), 0, kMaxQ - 1) for i < n."""
    for i in range(n):
        l = _nearest_int(_HALF * (idv * xval[o + i] - _ONE), fbuf, ibuf)
        L[o + i] = max(0, min(kmax - 1, l))


@njit(inline="always", cache=True, error_model="numpy")
def _even_signs(xb, weight, xval, k):  # pragma: no cover - compiled
    """|x| of 8 weights with an even number of sign flips: the flip of the least important one is
    dropped when the count is odd. Returns the 7 stored sign bits."""
    nflip = 0
    s = 0
    for i in range(8):
        v = xb[8 * k + i]
        if v >= _ZERO:
            xval[8 * k + i] = v
        else:
            xval[8 * k + i] = -v
            nflip += 1
            s |= 1 << i
    if nflip % 2:
        imin = 0
        mn = weight[8 * k] * xb[8 * k] * xb[8 * k]
        for i in range(1, 8):
            ax = weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i]
            if ax < mn:
                mn = ax
                imin = i
        xval[8 * k + imin] = -xval[8 * k + imin]
        s ^= 1 << imin
    return s & 127


@njit(inline="always", cache=True, error_model="numpy")
def _weights(xbl, qw, o, n, use_qw, sigma2, weight, waux):  # pragma: no cover - compiled
    for i in range(n):
        xi = xbl[o + i]
        weight[i] = qw[o + i] * np.sqrt(sigma2 + xi * xi) if use_qw else xi * xi
    for i in range(n):
        waux[i] = np.sqrt(weight[i])


@njit(inline="always", cache=True, error_model="numpy")
def _sums(weight, xval, L, n):  # pragma: no cover - compiled
    sumqx = _ZERO
    sumq2 = _ZERO
    for i in range(n):
        w = weight[i]
        q = np.float32(2 * L[i] + 1)
        sumqx = sumqx + w * xval[i] * q
        sumq2 = sumq2 + w * q * q
    return sumqx, sumq2


@njit(inline="always", cache=True, error_model="numpy")
def _fmax(a, b):  # pragma: no cover - compiled
    return a if a > b else b


@njit(inline="always", cache=True, error_model="numpy")
def _sigma2(xbl, factor):  # pragma: no cover - compiled
    sumx2 = _ZERO
    for i in range(_QK_K):
        sumx2 = sumx2 + xbl[i] * xbl[i]
    return factor * sumx2 / np.float32(_QK_K)


@njit(nogil=True, cache=True, error_model="numpy")
def iq2_xxs(X, QW, GRID, KMAP, NEIGH, OUT):  # pragma: no cover - compiled
    """quantize_row_iq2_xxs_impl: 66-byte blocks, 8 groups of 32 with one 4-bit scale each."""
    rows, n = X.shape
    kmax = 3
    scales = np.zeros(8, np.float32)
    weight = np.zeros(32, np.float32)
    waux = np.zeros(32, np.float32)
    xval = np.zeros(32, np.float32)
    L = np.zeros(32, np.int64)
    Laux = np.zeros(32, np.int64)
    Lqp = np.zeros(32, np.int64)
    signs = np.zeros(4, np.int64)
    q2 = np.zeros(16, np.uint32)
    fbuf = np.empty(1, np.float32)
    ibuf = fbuf.view(np.int32)
    err = np.zeros(1, np.int64)
    for r in range(rows):
        if err[0]:
            return 1
        for ibl in range(n // _QK_K):
            xbl = X[r, _QK_K * ibl : _QK_K * ibl + _QK_K]
            qwb = QW[_QK_K * ibl : _QK_K * ibl + _QK_K]
            o = 66 * ibl
            q2[:] = 0
            max_scale = _ZERO
            sigma2 = _sigma2(xbl, _ONE)
            for ib in range(8):
                xb = xbl[32 * ib : 32 * ib + 32]
                _weights(xbl, qwb, 32 * ib, 32, True, sigma2, weight, waux)
                for k in range(4):
                    signs[k] = _even_signs(xb, weight, xval, k)
                mx = xval[0]
                for i in range(1, 32):
                    mx = _fmax(mx, xval[i])
                if mx < _EPS:
                    scales[ib] = _ZERO
                    continue
                scale = _make_qp_quants(32, kmax + 1, xval, Lqp, weight, fbuf, ibuf)
                for i in range(32):  # (int8_t *) of make_qp_quants' uint8 levels
                    L[i] = Lqp[i] - 256 if Lqp[i] > 127 else Lqp[i]
                eff_max = scale * np.float32(kmax)
                if eff_max <= _ZERO:
                    scales[ib] = _ZERO
                    continue
                best = _ZERO
                for step in range(-6, 7):
                    idv = (np.float32(2 * kmax - 1) + np.float32(step) * _TENTH) / eff_max
                    this_scale = _ONE / idv
                    for k in range(4):
                        _round_levels(idv, xval, 8 * k, 8, kmax, Laux, fbuf, ibuf)
                        _grid_point(GRID, KMAP, NEIGH, xval, 8 * k, waux, this_scale, Laux, 8 * k, 2, err)
                    sumqx, sumq2 = _sums(weight, xval, Laux, 32)
                    if sumq2 > _ZERO and sumqx * sumqx > best * sumq2:
                        scale = sumqx / sumq2
                        best = scale * sumqx
                        L[:] = Laux
                if scale > _ZERO:
                    idv = _ONE / scale
                    for k in range(4):
                        _round_levels(idv, xval, 8 * k, 8, kmax, L, fbuf, ibuf)
                        g, _on = _grid_point(GRID, KMAP, NEIGH, xval, 8 * k, waux, scale, L, 8 * k, 2, err)
                        for i in range(8):
                            L[8 * k + i] = np.int64(GRID[g, i]) >> 1
                    sumqx, sumq2 = _sums(weight, xval, L, 32)
                    if sumq2 > _ZERO:
                        scale = sumqx / sumq2
                if scale < _ZERO:
                    scale = -scale
                    for k in range(4):
                        signs[k] = (~signs[k]) & 127
                for k in range(4):
                    u = 0
                    for i in range(8):  # uint16_t u of possibly negative int8 levels (from make_qp_quants)
                        u = (u | (L[8 * k + i] << (2 * i))) & 0xFFFF
                    if u >= KMAP.size or KMAP[u] < 0:
                        return 1
                    q2[2 * ib] |= np.uint32(KMAP[u]) << np.uint32(8 * k)
                    q2[2 * ib + 1] |= np.uint32(signs[k] << (7 * k))
                scales[ib] = scale
                max_scale = _fmax(max_scale, scale)
            if max_scale == _ZERO:
                OUT[r, o : o + 66] = 0
                continue
            d = max_scale / np.float32(31)
            _store_fp16(OUT[r], o, _fp16_round(d), fbuf, ibuf)
            idv = _ONE / d
            for ib in range(8):
                l = _nearest_int(_HALF * (idv * scales[ib] - _ONE), fbuf, ibuf)
                q2[2 * ib + 1] |= np.uint32(max(0, min(15, l))) << np.uint32(28)
            OUT[r, o + 2 : o + 66] = q2.view(np.uint8)
    return err[0]


@njit(nogil=True, cache=True, error_model="numpy")
def iq2_xs(X, QW, GRID, KMAP, NEIGH, OUT):  # pragma: no cover - compiled
    """quantize_row_iq2_xs_impl: 74-byte blocks, 16 groups of 16 with one 4-bit scale each."""
    rows, n = X.shape
    kmax = 3
    scales = np.zeros(16, np.float32)
    weight = np.zeros(16, np.float32)
    waux = np.zeros(16, np.float32)
    xval = np.zeros(16, np.float32)
    L = np.zeros(16, np.int64)
    Laux = np.zeros(16, np.int64)
    on_grid = np.zeros(2, np.bool_)
    on_grid_aux = np.zeros(2, np.bool_)
    signs = np.zeros(2, np.int64)
    q2 = np.zeros(32, np.uint16)
    fbuf = np.empty(1, np.float32)
    ibuf = fbuf.view(np.int32)
    err = np.zeros(1, np.int64)
    for r in range(rows):
        if err[0]:
            return 1
        for ibl in range(n // _QK_K):
            xbl = X[r, _QK_K * ibl : _QK_K * ibl + _QK_K]
            qwb = QW[_QK_K * ibl : _QK_K * ibl + _QK_K]
            o = 74 * ibl
            q2[:] = 0
            OUT[r, o : o + 74] = 0
            max_scale = _ZERO
            sigma2 = _sigma2(xbl, _ONE)
            for ib in range(16):
                xb = xbl[16 * ib : 16 * ib + 16]
                _weights(xbl, qwb, 16 * ib, 16, True, sigma2, weight, waux)
                for k in range(2):
                    signs[k] = _even_signs(xb, weight, xval, k)
                mx = xval[0]
                for i in range(1, 16):
                    mx = _fmax(mx, xval[i])
                L[:] = 0
                if mx < _EPS:
                    scales[ib] = _ZERO
                    continue
                best = _ZERO
                scale = mx / np.float32(2 * kmax - 1)
                on_grid[:] = True
                for step in range(-9, 10):
                    idv = (np.float32(2 * kmax - 1) + np.float32(step) * _TENTH) / mx
                    this_scale = _ONE / idv
                    for k in range(2):
                        _round_levels(idv, xval, 8 * k, 8, kmax, Laux, fbuf, ibuf)
                        _g, on_grid_aux[k] = _grid_point(GRID, KMAP, NEIGH, xval, 8 * k, waux, this_scale, Laux, 8 * k, 2, err)
                    sumqx, sumq2 = _sums(weight, xval, Laux, 16)
                    if sumq2 > _ZERO and sumqx * sumqx > best * sumq2:
                        scale = sumqx / sumq2
                        best = scale * sumqx
                        L[:] = Laux
                        on_grid[:] = on_grid_aux
                if (not (on_grid[0] and on_grid[1])) and scale > _ZERO:
                    idv = _ONE / scale
                    for k in range(2):
                        if on_grid[k]:
                            continue
                        _round_levels(idv, xval, 8 * k, 8, kmax, L, fbuf, ibuf)
                        _grid_point(GRID, KMAP, NEIGH, xval, 8 * k, waux, scale, L, 8 * k, 2, err)
                    sumqx, sumq2 = _sums(weight, xval, L, 16)
                    if sumq2 > _ZERO:
                        scale = sumqx / sumq2
                if scale < _ZERO:
                    scale = -scale
                    for k in range(2):
                        signs[k] = (~signs[k]) & 127
                for k in range(2):
                    u = 0
                    for i in range(8):
                        u |= L[8 * k + i] << (2 * i)
                    if u < 0 or u >= KMAP.size or KMAP[u] < 0:
                        return 1
                    q2[2 * ib + k] = np.uint16(KMAP[u] | (signs[k] << 9))
                scales[ib] = scale
                max_scale = _fmax(max_scale, scale)
            if max_scale == _ZERO:
                continue
            d = max_scale / np.float32(31)
            _store_fp16(OUT[r], o, _fp16_round(d), fbuf, ibuf)
            idv = _ONE / d
            for ib in range(16):
                l = max(0, min(15, _nearest_int(_HALF * (idv * scales[ib] - _ONE), fbuf, ibuf)))
                OUT[r, o + 66 + ib // 2] |= l if ib % 2 == 0 else l << 4
            OUT[r, o + 2 : o + 66] = q2.view(np.uint8)
    return err[0]


@njit(nogil=True, cache=True, error_model="numpy")
def iq3_xxs(X, QW, use_qw, GRID, KMAP, NEIGH, OUT):  # pragma: no cover - compiled
    """quantize_row_iq3_xxs_impl(256, ...): 98-byte blocks (64 grid indices, 8 x (4 x 7 sign bits +
    a 4-bit scale)); weights x^2 without an imatrix."""
    rows, n = X.shape
    kmax = 8
    scales = np.zeros(8, np.float32)
    weight = np.zeros(32, np.float32)
    waux = np.zeros(32, np.float32)
    xval = np.zeros(32, np.float32)
    L = np.zeros(32, np.int64)
    Laux = np.zeros(32, np.int64)
    on_grid = np.zeros(8, np.bool_)
    on_grid_aux = np.zeros(8, np.bool_)
    signs = np.zeros(4, np.int64)
    q3 = np.zeros(96, np.uint8)
    sas = q3[64:].view(np.uint32)
    fbuf = np.empty(1, np.float32)
    ibuf = fbuf.view(np.int32)
    err = np.zeros(1, np.int64)
    for r in range(rows):
        if err[0]:
            return 1
        for ibl in range(n // _QK_K):
            xbl = X[r, _QK_K * ibl : _QK_K * ibl + _QK_K]
            qwb = QW[_QK_K * ibl : _QK_K * ibl + _QK_K] if use_qw else QW
            o = 98 * ibl
            OUT[r, o : o + 2] = 0
            q3[:] = 0
            max_scale = _ZERO
            sigma2 = _sigma2(xbl, np.float32(2))
            for ib in range(8):
                xb = xbl[32 * ib : 32 * ib + 32]
                _weights(xbl, qwb, 32 * ib, 32, use_qw, sigma2, weight, waux)
                for k in range(4):
                    signs[k] = _even_signs(xb, weight, xval, k)
                mx = xval[0]
                for i in range(1, 32):
                    mx = _fmax(mx, xval[i])
                L[:] = 0
                if mx < _EPS_IQ3_XXS:
                    scales[ib] = _ZERO
                    continue
                best = _ZERO
                scale = mx / np.float32(2 * kmax - 1)
                on_grid[:] = True
                for step in range(-15, 16):
                    idv = (np.float32(2 * kmax - 1) + np.float32(step) * _FIFTH) / mx
                    this_scale = _ONE / idv
                    for k in range(8):
                        _round_levels(idv, xval, 4 * k, 4, kmax, Laux, fbuf, ibuf)
                        _g, on_grid_aux[k] = _grid_point(GRID, KMAP, NEIGH, xval, 4 * k, waux, this_scale, Laux, 4 * k, 3, err)
                    sumqx, sumq2 = _sums(weight, xval, Laux, 32)
                    if sumq2 > _ZERO and sumqx * sumqx > best * sumq2:
                        scale = sumqx / sumq2
                        best = scale * sumqx
                        L[:] = Laux
                        on_grid[:] = on_grid_aux
                if (not on_grid.all()) and scale > _ZERO:
                    idv = _ONE / scale
                    for k in range(8):
                        if on_grid[k]:
                            continue
                        _round_levels(idv, xval, 4 * k, 4, kmax, L, fbuf, ibuf)
                        g, _on = _grid_point(GRID, KMAP, NEIGH, xval, 4 * k, waux, scale, L, 4 * k, 3, err)
                        for i in range(4):
                            L[4 * k + i] = np.int64(GRID[g, i]) >> 1
                    sumqx, sumq2 = _sums(weight, xval, L, 32)
                    if sumq2 > _ZERO:
                        scale = sumqx / sumq2
                if scale < _ZERO:
                    scale = -scale
                    for k in range(4):
                        signs[k] = (~signs[k]) & 127
                for k in range(8):
                    u = 0
                    for i in range(4):
                        u |= L[4 * k + i] << (3 * i)
                    if u < 0 or u >= KMAP.size or KMAP[u] < 0:
                        return 1
                    q3[8 * ib + k] = KMAP[u]
                sas[ib] = np.uint32(signs[0] | (signs[1] << 7) | (signs[2] << 14) | (signs[3] << 21))
                scales[ib] = scale
                max_scale = _fmax(max_scale, scale)
            if max_scale == _ZERO:
                OUT[r, o + 2 : o + 98] = 0
                continue
            d = max_scale / np.float32(31)
            _store_fp16(OUT[r], o, _fp16_round(d * np.float32(1.0125)), fbuf, ibuf)
            idv = _ONE / d
            for ib in range(8):
                l = max(0, min(15, _nearest_int(_HALF * (idv * scales[ib] - _ONE), fbuf, ibuf)))
                sas[ib] |= np.uint32(l) << np.uint32(28)
            OUT[r, o + 2 : o + 98] = q3
    return err[0]


@njit(nogil=True, cache=True, error_model="numpy")
def iq3_s(X, QW, use_qw, GRID, KMAP, NEIGH, OUT):  # pragma: no cover - compiled
    """quantize_row_iq3_s_impl(32, ...): 110-byte blocks (d, qs[64], qh[8], signs[32], scales[4])."""
    rows, n = X.shape
    kmax = 8
    scales = np.zeros(8, np.float32)
    weight = np.zeros(32, np.float32)
    waux = np.zeros(32, np.float32)
    xval = np.zeros(32, np.float32)
    L = np.zeros(32, np.int64)
    Laux = np.zeros(32, np.int64)
    on_grid = np.zeros(8, np.bool_)
    on_grid_aux = np.zeros(8, np.bool_)
    signs = np.zeros(4, np.int64)
    fbuf = np.empty(1, np.float32)
    ibuf = fbuf.view(np.int32)
    err = np.zeros(1, np.int64)
    for r in range(rows):
        if err[0]:
            return 1
        for ibl in range(n // _QK_K):
            xbl = X[r, _QK_K * ibl : _QK_K * ibl + _QK_K]
            qwb = QW[_QK_K * ibl : _QK_K * ibl + _QK_K] if use_qw else QW
            o = 110 * ibl
            OUT[r, o : o + 110] = 0
            qs, qh, sg = o + 2, o + 66, o + 74
            max_scale = _ZERO
            sigma2 = _sigma2(xbl, np.float32(2))
            for ib in range(8):
                xb = xbl[32 * ib : 32 * ib + 32]
                _weights(xbl, qwb, 32 * ib, 32, use_qw, sigma2, weight, waux)
                for k in range(4):
                    s = 0
                    for i in range(8):
                        v = xb[8 * k + i]
                        if v >= _ZERO:
                            xval[8 * k + i] = v
                        else:
                            xval[8 * k + i] = -v
                            s |= 1 << i
                    signs[k] = s
                mx = xval[0]
                for i in range(1, 32):
                    mx = _fmax(mx, xval[i])
                L[:] = 0
                if mx == _ZERO:
                    scales[ib] = _ZERO
                    continue
                best = _ZERO
                scale = mx / np.float32(2 * kmax - 1)
                on_grid[:] = False
                for step in range(-9, 10):
                    idv = (np.float32(2 * kmax - 1) + np.float32(step) * _FIFTH) / mx
                    this_scale = _ONE / idv
                    for k in range(8):
                        _round_levels(idv, xval, 4 * k, 4, kmax, Laux, fbuf, ibuf)
                        _g, on_grid_aux[k] = _grid_point(GRID, KMAP, NEIGH, xval, 4 * k, waux, this_scale, Laux, 4 * k, 3, err)
                    sumqx, sumq2 = _sums(weight, xval, Laux, 32)
                    if sumq2 > _ZERO and sumqx * sumqx > best * sumq2:
                        scale = sumqx / sumq2
                        best = scale * sumqx
                        L[:] = Laux
                        on_grid[:] = on_grid_aux
                if (not on_grid.all()) and scale > _ZERO:
                    idv = _ONE / scale
                    for k in range(8):  # every group, on the grid or not (the C skip is commented out)
                        _round_levels(idv, xval, 4 * k, 4, kmax, L, fbuf, ibuf)
                        g, _on = _grid_point(GRID, KMAP, NEIGH, xval, 4 * k, waux, scale, L, 4 * k, 3, err)
                        for i in range(4):
                            L[4 * k + i] = np.int64(GRID[g, i]) >> 1
                    sumqx, sumq2 = _sums(weight, xval, L, 32)
                    if sumq2 > _ZERO:
                        scale = sumqx / sumq2
                if scale < _ZERO:
                    scale = -scale
                    for k in range(4):
                        signs[k] = (~signs[k]) & 255
                for k in range(8):
                    u = 0
                    for i in range(4):
                        u |= L[4 * k + i] << (3 * i)
                    if u < 0 or u >= KMAP.size or KMAP[u] < 0:
                        return 1
                    g = KMAP[u]
                    OUT[r, qs + 8 * ib + k] = g & 255
                    OUT[r, qh + (ib * 8 + k) // 8] |= (g >> 8) << ((ib * 8 + k) % 8)
                for k in range(4):
                    OUT[r, sg + 4 * ib + k] = signs[k]
                scales[ib] = scale
                max_scale = _fmax(max_scale, scale)
            if max_scale == _ZERO:
                continue
            d = max_scale / np.float32(31)
            _store_fp16(OUT[r], o, _fp16_round(d * np.float32(1.033)), fbuf, ibuf)
            idv = _ONE / d
            for ib in range(0, 8, 2):
                l1 = max(0, min(15, _nearest_int(_HALF * (idv * scales[ib] - _ONE), fbuf, ibuf)))
                l2 = max(0, min(15, _nearest_int(_HALF * (idv * scales[ib + 1] - _ONE), fbuf, ibuf)))
                OUT[r, o + 106 + ib // 2] = l1 | (l2 << 4)
    return err[0]


@njit(nogil=True, cache=True, error_model="numpy")
def iq2_s(X, QW, use_qw, GRID, KMAP, NEIGH, OUT):  # pragma: no cover - compiled
    """quantize_row_iq2_s_impl: 82-byte blocks (d, grid low bytes[32], signs[32], qh[8], scales[8]);
    weights sigma2/4 + x^2 without an imatrix."""
    rows, n = X.shape
    kmax = 3
    scales = np.zeros(16, np.float32)
    weight = np.zeros(16, np.float32)
    waux = np.zeros(16, np.float32)
    xval = np.zeros(16, np.float32)
    L = np.zeros(16, np.int64)
    Laux = np.zeros(16, np.int64)
    on_grid = np.zeros(2, np.bool_)
    on_grid_aux = np.zeros(2, np.bool_)
    signs = np.zeros(2, np.int64)
    fbuf = np.empty(1, np.float32)
    ibuf = fbuf.view(np.int32)
    err = np.zeros(1, np.int64)
    quarter = np.float32(0.25)
    for r in range(rows):
        if err[0]:
            return 1
        for ibl in range(n // _QK_K):
            xbl = X[r, _QK_K * ibl : _QK_K * ibl + _QK_K]
            qwb = QW[_QK_K * ibl : _QK_K * ibl + _QK_K] if use_qw else QW
            o = 82 * ibl
            OUT[r, o : o + 82] = 0
            max_scale = _ZERO
            sigma2 = _sigma2(xbl, np.float32(2))
            for ib in range(16):
                xb = xbl[16 * ib : 16 * ib + 16]
                if use_qw:
                    _weights(xbl, qwb, 16 * ib, 16, True, sigma2, weight, waux)
                else:
                    for i in range(16):
                        weight[i] = quarter * sigma2 + xb[i] * xb[i]
                    for i in range(16):
                        waux[i] = np.sqrt(weight[i])
                for k in range(2):
                    s = 0
                    for i in range(8):
                        v = xb[8 * k + i]
                        if v >= _ZERO:
                            xval[8 * k + i] = v
                        else:
                            xval[8 * k + i] = -v
                            s |= 1 << i
                    signs[k] = s
                mx = xval[0]
                for i in range(1, 16):
                    mx = _fmax(mx, xval[i])
                L[:] = 0
                if mx < _EPS_IQ2_S:
                    scales[ib] = _ZERO
                    continue
                best = _ZERO
                scale = mx / np.float32(2 * kmax - 1)
                on_grid[:] = True
                for step in range(-9, 10):
                    idv = (np.float32(2 * kmax - 1) + np.float32(step) * _TENTH) / mx
                    this_scale = _ONE / idv
                    for k in range(2):
                        _round_levels(idv, xval, 8 * k, 8, kmax, Laux, fbuf, ibuf)
                        _g, on_grid_aux[k] = _grid_point(GRID, KMAP, NEIGH, xval, 8 * k, waux, this_scale, Laux, 8 * k, 2, err)
                    sumqx, sumq2 = _sums(weight, xval, Laux, 16)
                    if sumq2 > _ZERO and sumqx * sumqx > best * sumq2:
                        scale = sumqx / sumq2
                        best = scale * sumqx
                        L[:] = Laux
                        on_grid[:] = on_grid_aux
                if (not (on_grid[0] and on_grid[1])) and scale > _ZERO:
                    idv = _ONE / scale
                    for k in range(2):
                        if on_grid[k]:
                            continue
                        _round_levels(idv, xval, 8 * k, 8, kmax, L, fbuf, ibuf)
                        _grid_point(GRID, KMAP, NEIGH, xval, 8 * k, waux, scale, L, 8 * k, 2, err)
                    sumqx, sumq2 = _sums(weight, xval, L, 16)
                    if sumq2 > _ZERO:
                        scale = sumqx / sumq2
                if scale < _ZERO:
                    scale = -scale
                    for k in range(2):
                        signs[k] = (~signs[k]) & 255
                for k in range(2):
                    u = 0
                    for i in range(8):
                        u |= L[8 * k + i] << (2 * i)
                    if u < 0 or u >= KMAP.size or KMAP[u] < 0:
                        return 1
                    g = KMAP[u]
                    i8 = 2 * ib + k
                    OUT[r, o + 2 + i8] = g & 255
                    OUT[r, o + 66 + i8 // 4] |= (g >> 8) << (2 * (i8 % 4))
                    OUT[r, o + 34 + i8] = signs[k]
                scales[ib] = scale
                max_scale = _fmax(max_scale, scale)
            if max_scale == _ZERO:
                continue
            d = max_scale / np.float32(31)
            _store_fp16(OUT[r], o, _fp16_round(d * np.float32(0.9875)), fbuf, ibuf)
            idv = _ONE / d
            for ib in range(16):
                l = max(0, min(15, _nearest_int(_HALF * (idv * scales[ib] - _ONE), fbuf, ibuf)))
                OUT[r, o + 74 + ib // 2] |= l if ib % 2 == 0 else l << 4
    return err[0]
