"""Slow scalar transcription of ggml's reference K-quantizers, for tests only.

Written loop by loop from the C algorithm with numpy float32 scalars (every
operation rounded to float32, in the C order).  It is independent of the
vectorised implementation in lora2gguf.quantize.kquants and lets the tests check
it on a few blocks even where llama.cpp is not installed.
"""

from __future__ import annotations

import struct

import numpy as np

f32 = np.float32


def nearest_int(v: np.float32) -> int:
    s = np.array([f32(v) + f32(12582912.0)], dtype=np.float32)
    i = int(s.view(np.int32)[0])
    return (i & 0x7FFFFF) - 0x400000


def fp16_bits(v: np.float32) -> int:
    return int(np.array([v], dtype=np.float32).astype(np.float16).view(np.uint16)[0])


def fp16_val(bits: int) -> np.float32:
    return f32(np.array([bits], dtype=np.uint16).view(np.float16)[0])


def make_qkx2(x, w, nmax, rmin, rdelta, nstep):
    n = len(x)
    L = [0] * n
    mn = x[0]
    mx = x[0]
    sum_w = w[0]
    sum_x = f32(sum_w * x[0])
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        sum_w = f32(sum_w + w[i])
        sum_x = f32(sum_x + f32(w[i] * x[i]))
    if mn > 0:
        mn = f32(0)
    if mx == mn:
        return f32(0), f32(-mn), [0] * n
    iscale = f32(f32(nmax) / f32(mx - mn))
    scale = f32(f32(1) / iscale)
    best_error = f32(0)
    for i in range(n):
        l = nearest_int(f32(iscale * f32(x[i] - mn)))
        L[i] = max(0, min(nmax, l))
        diff = f32(f32(f32(scale * f32(L[i])) + mn) - x[i])
        diff = f32(diff * diff)
        best_error = f32(best_error + f32(w[i] * diff))
    for st in range(nstep + 1):
        iscale = f32(f32(f32(f32(rmin) + f32(f32(rdelta) * f32(st))) + f32(nmax)) / f32(mx - mn))
        sum_l = sum_l2 = sum_xl = f32(0)
        Laux = [0] * n
        for i in range(n):
            l = nearest_int(f32(iscale * f32(x[i] - mn)))
            l = max(0, min(nmax, l))
            Laux[i] = l
            wl = f32(w[i] * f32(l))
            sum_l = f32(sum_l + wl)
            sum_l2 = f32(sum_l2 + f32(wl * f32(l)))
            sum_xl = f32(sum_xl + f32(wl * x[i]))
        D = f32(f32(sum_w * sum_l2) - f32(sum_l * sum_l))
        if D > 0:
            this_scale = f32(f32(f32(sum_w * sum_xl) - f32(sum_x * sum_l)) / D)
            this_min = f32(f32(f32(sum_l2 * sum_x) - f32(sum_l * sum_xl)) / D)
            if this_min > 0:
                this_min = f32(0)
                this_scale = f32(sum_xl / sum_l2)
            cur = f32(0)
            for i in range(n):
                diff = f32(f32(f32(this_scale * f32(Laux[i])) + this_min) - x[i])
                diff = f32(diff * diff)
                cur = f32(cur + f32(w[i] * diff))
            if cur < best_error:
                L = list(Laux)
                best_error = cur
                scale = this_scale
                mn = this_min
    return scale, f32(-mn), L


def make_qx_rmse1(x, nmax):
    n = len(x)
    amax = f32(0)
    vmax = f32(0)
    for v in x:
        if abs(v) > amax:
            amax = f32(abs(v))
            vmax = v
    if amax < f32(1e-15):
        return f32(0), [0] * n
    iscale = f32(f32(-nmax) / vmax)
    L = [0] * n
    sumlx = suml2 = f32(0)
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nearest_int(f32(iscale * x[i]))))
        L[i] = l + nmax
        w = f32(x[i] * x[i])
        sumlx = f32(sumlx + f32(f32(w * x[i]) * f32(l)))
        suml2 = f32(suml2 + f32(f32(w * f32(l)) * f32(l)))
    scale = f32(sumlx / suml2) if suml2 != 0 else f32(0)
    best = f32(scale * sumlx)
    for st in range(-9, 10):
        if st == 0:
            continue
        iscale = f32(-f32(f32(nmax) + f32(f32(0.1) * f32(st))) / vmax)
        sumlx = suml2 = f32(0)
        for i in range(n):
            l = max(-nmax, min(nmax - 1, nearest_int(f32(iscale * x[i]))))
            w = f32(x[i] * x[i])
            sumlx = f32(sumlx + f32(f32(w * x[i]) * f32(l)))
            suml2 = f32(suml2 + f32(f32(w * f32(l)) * f32(l)))
        if suml2 > 0 and f32(sumlx * sumlx) > f32(best * suml2):
            for i in range(n):
                L[i] = nmax + max(-nmax, min(nmax - 1, nearest_int(f32(iscale * x[i]))))
            scale = f32(sumlx / suml2)
            best = f32(scale * sumlx)
    return scale, L


def _qkx_block(x, nmax, rmin, rdelta, nstep):
    L = [0] * 256
    scales, mins = [], []
    for j in range(8):
        xs = [f32(v) for v in x[32 * j : 32 * j + 32]]
        s2 = f32(0)
        for v in xs:
            s2 = f32(s2 + f32(v * v))
        av = f32(np.sqrt(f32(s2 / f32(32))))
        w = [f32(av + f32(abs(v))) for v in xs]
        sc, mi, Ls = make_qkx2(xs, w, nmax, rmin, rdelta, nstep)
        scales.append(sc)
        mins.append(mi)
        L[32 * j : 32 * j + 32] = Ls
    max_scale = f32(0)
    max_min = f32(0)
    for j in range(8):
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    inv_s = f32(f32(63) / max_scale) if max_scale > 0 else f32(0)
    inv_m = f32(f32(63) / max_min) if max_min > 0 else f32(0)
    ls = [min(63, nearest_int(f32(inv_s * scales[j])) & 0xFF) for j in range(8)]
    lm = [min(63, nearest_int(f32(inv_m * mins[j])) & 0xFF) for j in range(8)]
    sc12 = [0] * 12
    for j in range(8):
        if j < 4:
            sc12[j] = ls[j]
            sc12[j + 4] = lm[j]
        else:
            sc12[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            sc12[j - 4] |= (ls[j] >> 4) << 6
            sc12[j] |= (lm[j] >> 4) << 6
    d = fp16_bits(f32(max_scale / f32(63)))
    dmin = fp16_bits(f32(max_min / f32(63)))
    for j in range(8):
        dd = f32(fp16_val(d) * f32(ls[j]))
        if dd == 0:
            continue
        dm = f32(fp16_val(dmin) * f32(lm[j]))
        for ii in range(32):
            L[32 * j + ii] = max(0, min(nmax, nearest_int(f32(f32(f32(x[32 * j + ii]) + dm) / dd))))
    return d, dmin, sc12, L


def q4_k_block(x) -> bytes:
    d, dmin, sc12, L = _qkx_block(x, 15, -1.0, 0.1, 20)
    qs = []
    for j in range(0, 256, 64):
        qs += [L[j + l] | (L[j + l + 32] << 4) for l in range(32)]
    return struct.pack("<HH", d, dmin) + bytes(sc12) + bytes(qs)


def q5_k_block(x) -> bytes:
    d, dmin, sc12, L = _qkx_block(x, 31, -0.5, 0.1, 15)
    qh = [0] * 32
    ql = []
    m1, m2 = 1, 2
    for n in range(0, 256, 64):
        for j in range(32):
            l1 = L[n + j]
            if l1 > 15:
                l1 -= 16
                qh[j] |= m1
            l2 = L[n + j + 32]
            if l2 > 15:
                l2 -= 16
                qh[j] |= m2
            ql.append(l1 | (l2 << 4))
        m1 <<= 2
        m2 <<= 2
    return struct.pack("<HH", d, dmin) + bytes(sc12) + bytes(qh) + bytes(ql)


def q6_k_block(x) -> bytes:
    xs = [f32(v) for v in x]
    L = [0] * 256
    scales = []
    max_scale = f32(0)
    max_abs = f32(0)
    for ib in range(16):
        s, Ls = make_qx_rmse1(xs[16 * ib : 16 * ib + 16], 32)
        scales.append(s)
        L[16 * ib : 16 * ib + 16] = Ls
        if abs(s) > max_abs:
            max_abs = f32(abs(s))
            max_scale = s
    if max_abs < f32(1e-15):
        return bytes(210)
    iscale = f32(f32(-128) / max_scale)
    d = fp16_bits(f32(f32(1) / iscale))
    sc = [min(127, nearest_int(f32(iscale * scales[ib]))) for ib in range(16)]
    sc8 = [((v & 0xFF) ^ 0x80) - 0x80 for v in sc]
    for j in range(16):
        dd = f32(fp16_val(d) * f32(sc8[j]))
        if dd == 0:
            continue
        for ii in range(16):
            L[16 * j + ii] = max(-32, min(31, nearest_int(f32(xs[16 * j + ii] / dd)))) + 32
    ql = [0] * 128
    qh = [0] * 64
    for h in range(2):
        j = 128 * h
        for l in range(32):
            ql[64 * h + l] = (L[j + l] & 0xF) | ((L[j + l + 64] & 0xF) << 4)
            ql[64 * h + l + 32] = (L[j + l + 32] & 0xF) | ((L[j + l + 96] & 0xF) << 4)
            qh[32 * h + l] = (
                (L[j + l] >> 4)
                | ((L[j + l + 32] >> 4) << 2)
                | ((L[j + l + 64] >> 4) << 4)
                | ((L[j + l + 96] >> 4) << 6)
            )
    return bytes(ql) + bytes(qh) + bytes(v & 0xFF for v in sc8) + struct.pack("<H", d)


BLOCK_FUNCS = {"Q4_K": q4_k_block, "Q5_K": q5_k_block, "Q6_K": q6_k_block}
