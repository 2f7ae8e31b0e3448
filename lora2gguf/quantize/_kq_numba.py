"""Optional numba kernels for the two K-quant search loops (same bytes, ~C speed).

Imported only by lora2gguf.quantize.kquants when numba is installed.  Each kernel
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


@njit(inline="always", cache=True, error_model="numpy")
def _nearest_int(v, fbuf, ibuf):  # pragma: no cover - compiled
    """ggml nearest_int for a float32 scalar; fbuf/ibuf: a 1-float buffer and its int32 view."""
    r = v + _MAGIC
    if abs(v) <= 4194303.0:
        return np.int64(r - _MAGIC)
    # out of range (or nan): the C trick returns low mantissa bits of r
    fbuf[0] = r
    return np.int64(ibuf[0] & 0x7FFFFF) - 0x400000


@njit(cache=True, error_model="numpy")
def _make_qkx_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, fbuf, ibuf):  # pragma: no cover - compiled
    """ggml's make_qkx2_quants(n, nmax, x, weights, L, &the_min, Laux, rmin, rdelta, nstep, false),
    which is also make_qkx3_quants with explicit weights and nstep >= 1 (their degenerate tests,
    max == min and max <= min, cannot differ: min <= max). Returns (scale, the_min = -min)."""
    nmaxf = np.float32(nmax)
    rminf = np.float32(rmin)
    rdeltaf = np.float32(rdelta)
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
    iscale = nmaxf / (mx - mn)
    scale = _ONE / iscale
    best_error = _ZERO
    for i in range(n):
        l = _nearest_int(iscale * (x[i] - mn), fbuf, ibuf)
        l = max(0, min(nmax, l))
        L[i] = l
        diff = scale * np.float32(l) + mn - x[i]
        diff = diff * diff
        best_error = best_error + weights[i] * diff
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
            wl = weights[i] * fl
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
                cur_error = cur_error + weights[i] * diff
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(nogil=True, cache=True, error_model="numpy")
def qkx2_search(X, nmax, rmin, rdelta, nstep, scales, the_mins, L):  # pragma: no cover - compiled
    """Weights av_x + |x| and make_qkx2_quants for every row of X (S, n) float32.

    Fills scales (S,), the_mins (S,) float32 and L (S, n) uint8.
    """
    S, n = X.shape
    W = np.empty(n, dtype=np.float32)
    Laux = np.empty(n, dtype=np.int64)
    fbuf = np.empty(1, dtype=np.float32)
    ibuf = fbuf.view(np.int32)
    nf = np.float32(n)
    for s in range(S):
        x = X[s]
        sum_x2 = _ZERO
        for i in range(n):
            sum_x2 = sum_x2 + x[i] * x[i]
        av_x = np.sqrt(sum_x2 / nf)
        for i in range(n):
            W[i] = av_x + abs(x[i])
        scales[s], the_mins[s] = _make_qkx_quants(n, nmax, x, W, L[s], Laux, rmin, rdelta, nstep, fbuf, ibuf)


@njit(cache=True, error_model="numpy")
def _make_qx_quants(n, nmax, x, L, qw, fbuf, ibuf):  # pragma: no cover - compiled
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw) with weights: L gets levels + nmax."""
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
    nmaxf = np.float32(nmax)
    iscale = -nmaxf / vmax
    sumlx = _ZERO
    suml2 = _ZERO
    for i in range(n):
        l = _nearest_int(iscale * x[i], fbuf, ibuf)
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l + nmax
        fl = np.float32(l)
        w = qw[i]
        sumlx = sumlx + w * x[i] * fl
        suml2 = suml2 + w * fl * fl
    scale = sumlx / suml2 if suml2 != _ZERO else _ZERO
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(nmaxf + np.float32(0.1) * np.float32(step)) / vmax
        sumlx = _ZERO
        suml2 = _ZERO
        for i in range(n):
            l = _nearest_int(iscale * x[i], fbuf, ibuf)
            l = max(-nmax, min(nmax - 1, l))
            fl = np.float32(l)
            w = qw[i]
            sumlx = sumlx + w * x[i] * fl
            suml2 = suml2 + w * fl * fl
        if suml2 > _ZERO and sumlx * sumlx > best * suml2:
            for i in range(n):
                l = _nearest_int(iscale * x[i], fbuf, ibuf)
                L[i] = nmax + max(-nmax, min(nmax - 1, l))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(nogil=True, cache=True, error_model="numpy")
def qx_rmse1_search(X, nmax, scales, L):  # pragma: no cover - compiled
    """make_qx_quants(n, nmax, x, L, rmse_type=1, NULL) for every row of X (S, n) float32: the
    weights are x^2 (what C computes inline when no quant_weights are given).

    Fills scales (S,) float32 and L (S, n) uint8 (levels + nmax; 0 for all-zero rows).
    """
    S, n = X.shape
    fbuf = np.empty(1, dtype=np.float32)
    ibuf = fbuf.view(np.int32)
    w = np.empty(n, dtype=np.float32)
    for s in range(S):
        x = X[s]
        for i in range(n):
            w[i] = x[i] * x[i]
        scales[s] = _make_qx_quants(n, nmax, x, L[s], w, fbuf, ibuf)


# --------------------------------------------------------------------------- SIMD-friendly variants
# Same arithmetic, but the innermost loop runs across sub-blocks (columns of a
# position-major (n, S) array), so LLVM vectorises it; per-sub-block state
# lives in (S,) arrays and every decision is taken per column afterwards.
# nearest_int is the float form (v + 1.5*2**23) - 1.5*2**23, equal to the C
# trick while |v| < 2**22; a kernel returns False when a bound says some v
# could leave that range (then the caller uses the scalar kernel above).

_SAFE = np.float32(2097152.0)  # 2**21: half the exact range, margin for rounding of the bound


@njit(nogil=True, cache=True, error_model="numpy")
def qkx2_search_vec(XT, nmax, rmin, rdelta, nstep, scales, the_mins, LT):  # pragma: no cover - compiled
    """Vectorised twin of qkx2_search on XT (n, S); fills LT (n, S). False: use the scalar kernel."""
    n, S = XT.shape
    nf = np.float32(n)
    W = np.empty((n, S), dtype=np.float32)
    sum_x2 = np.zeros(S, dtype=np.float32)
    for i in range(n):
        for s in range(S):
            sum_x2[s] = sum_x2[s] + XT[i, s] * XT[i, s]
    av_x = np.empty(S, dtype=np.float32)
    for s in range(S):
        av_x[s] = np.sqrt(sum_x2[s] / nf)
    for i in range(n):
        for s in range(S):
            W[i, s] = av_x[s] + abs(XT[i, s])
    return qkx_search_vec(XT, W, nmax, rmin, rdelta, nstep, scales, the_mins, LT)


@njit(nogil=True, cache=True, error_model="numpy")
def qkx_search_vec(XT, W, nmax, rmin, rdelta, nstep, scales, the_mins, LT):  # pragma: no cover - compiled
    """_make_qkx_quants for the S columns of XT (n, S) at once with weights W (n, S): each column's
    sums in C's order, the loop over columns the one the compiler vectorises. Fills scales,
    the_mins (S,) and LT (n, S); False: some value may leave the rounding trick's exact range."""
    n, S = XT.shape
    nmaxf = np.float32(nmax)
    rminf = np.float32(rmin)
    rdeltaf = np.float32(rdelta)
    xmin = XT[0].copy()
    xmax = XT[0].copy()
    sum_w = W[0].copy()
    sum_x = np.empty(S, dtype=np.float32)
    for s in range(S):
        sum_x[s] = W[0, s] * XT[0, s]
    for i in range(1, n):
        for s in range(S):
            v = XT[i, s]
            xmin[s] = v if v < xmin[s] else xmin[s]
            xmax[s] = v if v > xmax[s] else xmax[s]
            sum_w[s] = sum_w[s] + W[i, s]
            sum_x[s] = sum_x[s] + W[i, s] * v
    mn = np.empty(S, dtype=np.float32)
    for s in range(S):
        mn[s] = _ZERO if xmin[s] > _ZERO else xmin[s]
    const = np.empty(S, dtype=np.bool_)
    for s in range(S):
        const[s] = xmax[s] == mn[s]
    isc = np.empty(S, dtype=np.float32)
    scale = np.empty(S, dtype=np.float32)
    best_error = np.zeros(S, dtype=np.float32)
    best_isc = np.empty(S, dtype=np.float32)
    best_mn = mn.copy()
    ts = np.empty(S, dtype=np.float32)
    tm = np.empty(S, dtype=np.float32)
    ok = np.empty(S, dtype=np.bool_)
    sl = np.empty(S, dtype=np.float32)
    sl2 = np.empty(S, dtype=np.float32)
    sxl = np.empty(S, dtype=np.float32)
    err = np.empty(S, dtype=np.float32)
    for c in range(-1, nstep + 1):
        # c == -1: the initial iscale = nmax/(max - min); then the nstep+1 candidates
        if c < 0:
            num = nmaxf
        else:
            num = rminf + rdeltaf * np.float32(c) + nmaxf
        for s in range(S):
            if const[s]:
                isc[s] = _ZERO
                continue
            isc[s] = num / (xmax[s] - mn[s])
            span = max(abs(xmax[s] - mn[s]), abs(xmin[s] - mn[s]))
            if not abs(isc[s]) * span < _SAFE:  # also catches inf / nan
                return False
        if c < 0:
            for s in range(S):
                scale[s] = _ONE / isc[s]
                best_isc[s] = isc[s]
                ts[s] = scale[s]
                tm[s] = mn[s]
        else:
            for s in range(S):
                sl[s] = _ZERO
                sl2[s] = _ZERO
                sxl[s] = _ZERO
            for i in range(n):
                for s in range(S):
                    r = (isc[s] * (XT[i, s] - mn[s]) + _MAGIC) - _MAGIC
                    r = _ZERO if r < _ZERO else r
                    r = nmaxf if r > nmaxf else r
                    wl = W[i, s] * r
                    sl[s] = sl[s] + wl
                    sl2[s] = sl2[s] + wl * r
                    sxl[s] = sxl[s] + wl * XT[i, s]
            for s in range(S):
                D = sum_w[s] * sl2[s] - sl[s] * sl[s]
                ok[s] = D > _ZERO and not const[s]
                if ok[s]:
                    t_scale = (sum_w[s] * sxl[s] - sum_x[s] * sl[s]) / D
                    t_min = (sl2[s] * sum_x[s] - sl[s] * sxl[s]) / D
                    if t_min > _ZERO:
                        t_min = _ZERO
                        t_scale = sxl[s] / sl2[s]
                    ts[s] = t_scale
                    tm[s] = t_min
                else:
                    ts[s] = _ZERO
                    tm[s] = _ZERO
        for s in range(S):
            err[s] = _ZERO
        for i in range(n):
            for s in range(S):
                r = (isc[s] * (XT[i, s] - mn[s]) + _MAGIC) - _MAGIC
                r = _ZERO if r < _ZERO else r
                r = nmaxf if r > nmaxf else r
                diff = ts[s] * r + tm[s] - XT[i, s]
                err[s] = err[s] + W[i, s] * (diff * diff)
        if c < 0:
            for s in range(S):
                best_error[s] = err[s]
        else:
            for s in range(S):
                if ok[s] and err[s] < best_error[s]:
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
            LT[i, s] = 0 if const[s] else np.uint8(r)
    for s in range(S):
        scales[s] = _ZERO if const[s] else scale[s]
        the_mins[s] = -mn[s]
    return True


@njit(nogil=True, cache=True, error_model="numpy")
def qx_rmse1_search_vec(XT, nmax, scales, LT):  # pragma: no cover - compiled
    """Vectorised twin of qx_rmse1_search on XT (n, S); fills LT (n, S). False: use the scalar kernel."""
    n, S = XT.shape
    W = np.empty((n, S), dtype=np.float32)
    for i in range(n):
        for s in range(S):
            W[i, s] = XT[i, s] * XT[i, s]
    return qx_search_vec(XT, W, nmax, scales, LT)


@njit(nogil=True, cache=True, error_model="numpy")
def qx_search_vec(XT, W, nmax, scales, LT):  # pragma: no cover - compiled
    """make_qx_quants(n, nmax, x, L, rmse_type=1, weights) for the S columns of XT (n, S) at once,
    weights W (n, S). Each column's sums run in C's order; the loop over columns is the one the
    compiler vectorises. Fills scales (S,) and LT (n, S) (levels + nmax); False when a column's
    scaled values leave the exact range of the rounding trick (then use the scalar kernel)."""
    n, S = XT.shape
    nmaxf = np.float32(nmax)
    lo = np.float32(-nmax)
    hi = np.float32(nmax - 1)
    tenth = np.float32(0.1)
    amax = np.zeros(S, dtype=np.float32)
    vmax = np.zeros(S, dtype=np.float32)
    for i in range(n):
        for s in range(S):
            ax = abs(XT[i, s])
            if ax > amax[s]:
                amax[s] = ax
                vmax[s] = XT[i, s]
    zero = np.empty(S, dtype=np.bool_)
    for s in range(S):
        zero[s] = amax[s] < _EPS
    WX = np.empty((n, S), dtype=np.float32)
    for i in range(n):
        for s in range(S):
            WX[i, s] = W[i, s] * XT[i, s]
    isc = np.empty(S, dtype=np.float32)
    best_isc = np.empty(S, dtype=np.float32)
    best = np.empty(S, dtype=np.float32)
    sumlx = np.empty(S, dtype=np.float32)
    suml2 = np.empty(S, dtype=np.float32)
    for c in range(-10, 10):
        # c == -10: the initial iscale = -nmax/max; then is = -9..9 without 0
        if c == 0:
            continue
        if c == -10:
            num = -nmaxf
        else:
            num = -(nmaxf + tenth * np.float32(c))
        for s in range(S):
            if zero[s]:
                isc[s] = _ZERO
                continue
            isc[s] = num / vmax[s]
            if not abs(isc[s]) * amax[s] < _SAFE:
                return False
        for s in range(S):
            sumlx[s] = _ZERO
            suml2[s] = _ZERO
        for i in range(n):
            for s in range(S):
                r = (isc[s] * XT[i, s] + _MAGIC) - _MAGIC
                r = lo if r < lo else r
                r = hi if r > hi else r
                sumlx[s] = sumlx[s] + WX[i, s] * r
                suml2[s] = suml2[s] + W[i, s] * r * r
        if c == -10:
            for s in range(S):
                sc = sumlx[s] / suml2[s] if suml2[s] != _ZERO else _ZERO
                scales[s] = sc
                best[s] = sc * sumlx[s]
                best_isc[s] = isc[s]
        else:
            for s in range(S):
                if suml2[s] > _ZERO and sumlx[s] * sumlx[s] > best[s] * suml2[s]:
                    sc = sumlx[s] / suml2[s]
                    scales[s] = sc
                    best[s] = sc * sumlx[s]
                    best_isc[s] = isc[s]
    for i in range(n):
        for s in range(S):
            r = (best_isc[s] * XT[i, s] + _MAGIC) - _MAGIC
            r = lo if r < lo else r
            r = hi if r > hi else r
            LT[i, s] = 0 if zero[s] else np.uint8(r + nmaxf)
    for s in range(S):
        if zero[s]:
            scales[s] = _ZERO
    return True
