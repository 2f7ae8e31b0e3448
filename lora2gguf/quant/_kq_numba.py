"""Optional numba kernels for the two K-quant search loops (same bytes, ~C speed).

Imported only by lora2gguf.quant.kquants when numba is installed.  Each kernel
walks one sub-block at a time in the order of ggml's C loops, with float32
scalars throughout (numba keeps float32 for float32 operands and, without
fastmath, neither reorders nor fuses float operations), so the results are
bit-identical to the numpy path and to llama.cpp.  ``nogil=True`` lets a thread
pool over row chunks use every core.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_F32 = np.float32
_MAGIC = np.float32(12582912.0)
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_EPS = np.float32(1e-15)


@njit(inline="always", cache=True)
def _nearest_int(v, fbuf, ibuf):  # pragma: no cover - compiled
    """ggml nearest_int for a float32 scalar; fbuf/ibuf: a 1-float buffer and its int32 view."""
    r = v + _MAGIC
    if abs(v) <= 4194303.0:
        return np.int64(r - _MAGIC)
    # out of range (or nan): the C trick returns low mantissa bits of r
    fbuf[0] = r
    return np.int64(ibuf[0] & 0x7FFFFF) - 0x400000


@njit(nogil=True, cache=True)
def qkx2_search(X, nmax, rmin, rdelta, nstep, scales, the_mins, L):  # pragma: no cover - compiled
    """Weights av_x + |x| and make_qkx2_quants for every row of X (S, n) float32.

    Fills scales (S,), the_mins (S,) float32 and L (S, n) uint8.
    """
    S, n = X.shape
    W = np.empty(n, dtype=np.float32)
    Laux = np.empty(n, dtype=np.int64)
    fbuf = np.empty(1, dtype=np.float32)
    ibuf = fbuf.view(np.int32)
    nmaxf = np.float32(nmax)
    rminf = np.float32(rmin)
    rdeltaf = np.float32(rdelta)
    nf = np.float32(n)
    for s in range(S):
        x = X[s]
        sum_x2 = _ZERO
        for i in range(n):
            sum_x2 = sum_x2 + x[i] * x[i]
        av_x = np.sqrt(sum_x2 / nf)
        for i in range(n):
            W[i] = av_x + abs(x[i])
        mn = x[0]
        mx = x[0]
        sum_w = W[0]
        sum_x = sum_w * x[0]
        for i in range(1, n):
            if x[i] < mn:
                mn = x[i]
            if x[i] > mx:
                mx = x[i]
            sum_w = sum_w + W[i]
            sum_x = sum_x + W[i] * x[i]
        if mn > _ZERO:
            mn = _ZERO
        if mx == mn:
            for i in range(n):
                L[s, i] = 0
            the_mins[s] = -mn
            scales[s] = _ZERO
            continue
        iscale = nmaxf / (mx - mn)
        scale = _ONE / iscale
        best_error = _ZERO
        for i in range(n):
            l = _nearest_int(iscale * (x[i] - mn), fbuf, ibuf)
            l = max(0, min(nmax, l))
            L[s, i] = l
            diff = scale * np.float32(l) + mn - x[i]
            diff = diff * diff
            best_error = best_error + W[i] * diff
        for step in range(nstep + 1):
            iscale = (rminf + rdeltaf * np.float32(step) + nmaxf) / (mx - mn)
            sum_l = _ZERO
            sum_l2 = _ZERO
            sum_xl = _ZERO
            for i in range(n):
                l = _nearest_int(iscale * (x[i] - mn), fbuf, ibuf)
                l = max(0, min(nmax, l))
                Laux[i] = l
                fl = np.float32(l)
                wl = W[i] * fl
                sum_l = sum_l + wl
                sum_l2 = sum_l2 + wl * fl
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
                    diff = this_scale * np.float32(Laux[i]) + this_min - x[i]
                    diff = diff * diff
                    cur_error = cur_error + W[i] * diff
                if cur_error < best_error:
                    for i in range(n):
                        L[s, i] = Laux[i]
                    best_error = cur_error
                    scale = this_scale
                    mn = this_min
        the_mins[s] = -mn
        scales[s] = scale


@njit(nogil=True, cache=True)
def qx_rmse1_search(X, nmax, scales, L):  # pragma: no cover - compiled
    """make_qx_quants(n, nmax, x, L, rmse_type=1, NULL) for every row of X (S, n) float32.

    Fills scales (S,) float32 and L (S, n) uint8 (levels + nmax; 0 for all-zero rows).
    """
    S, n = X.shape
    fbuf = np.empty(1, dtype=np.float32)
    ibuf = fbuf.view(np.int32)
    nmaxf = np.float32(nmax)
    tenth = np.float32(0.1)
    for s in range(S):
        x = X[s]
        amax = _ZERO
        vmax = _ZERO
        for i in range(n):
            ax = abs(x[i])
            if ax > amax:
                amax = ax
                vmax = x[i]
        if amax < _EPS:
            for i in range(n):
                L[s, i] = 0
            scales[s] = _ZERO
            continue
        iscale = -nmaxf / vmax
        sumlx = _ZERO
        suml2 = _ZERO
        for i in range(n):
            l = _nearest_int(iscale * x[i], fbuf, ibuf)
            l = max(-nmax, min(nmax - 1, l))
            L[s, i] = l + nmax
            fl = np.float32(l)
            w = x[i] * x[i]
            sumlx = sumlx + w * x[i] * fl
            suml2 = suml2 + w * fl * fl
        scale = sumlx / suml2 if suml2 != _ZERO else _ZERO
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(nmaxf + tenth * np.float32(step)) / vmax
            sumlx = _ZERO
            suml2 = _ZERO
            for i in range(n):
                l = _nearest_int(iscale * x[i], fbuf, ibuf)
                l = max(-nmax, min(nmax - 1, l))
                fl = np.float32(l)
                w = x[i] * x[i]
                sumlx = sumlx + w * x[i] * fl
                suml2 = suml2 + w * fl * fl
            if suml2 > _ZERO and sumlx * sumlx > best * suml2:
                for i in range(n):
                    l = _nearest_int(iscale * x[i], fbuf, ibuf)
                    L[s, i] = nmax + max(-nmax, min(nmax - 1, l))
                scale = sumlx / suml2
                best = scale * sumlx
        scales[s] = scale
