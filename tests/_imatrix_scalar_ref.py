"""Slow scalar transcription of llama.cpp's importance-weighted quantizers, for tests only.

Written from the formulas of ggml-quants.c's ``quantize_row_{q4_0,q4_1,q5_0,q5_1,q4_K,q5_K,q6_K}_impl`` with numpy
float32 scalars (each operation rounded to float32, in the C order), independently of the numba
kernels in lora2gguf.quantize._weighted_numba, so the tests can check those on a few blocks even
where llama.cpp is not installed.  Each function returns the bytes of one row.
"""

from __future__ import annotations

import struct

import numpy as np

from _kq_scalar_ref import f32, fp16_bits, fp16_val, make_qkx2, nearest_int

EPS = f32(1e-15)


def make_qx_weighted(x, nmax, qw):
    """make_qx_quants(n, nmax, x, L, 1, qw): returns (scale, L with levels + nmax)."""
    n = len(x)
    amax, vmax = f32(0), f32(0)
    for v in x:
        if abs(v) > amax:
            amax, vmax = f32(abs(v)), v
    if amax < EPS:
        return f32(0), [0] * n

    def sums(iscale):
        slx, sl2, levels = f32(0), f32(0), []
        for i in range(n):
            l = max(-nmax, min(nmax - 1, nearest_int(f32(iscale * x[i]))))
            levels.append(l + nmax)
            slx = f32(slx + f32(f32(qw[i] * x[i]) * f32(l)))
            sl2 = f32(sl2 + f32(f32(qw[i] * f32(l)) * f32(l)))
        return slx, sl2, levels

    sumlx, suml2, L = sums(f32(f32(-nmax) / vmax))
    scale = f32(sumlx / suml2) if suml2 != 0 else f32(0)
    best = f32(scale * sumlx)
    for step in range(-9, 10):
        if step == 0:
            continue
        slx, sl2, levels = sums(f32(f32(-f32(f32(nmax) + f32(f32(0.1) * f32(step)))) / vmax))
        if sl2 > 0 and f32(slx * slx) > f32(best * sl2):
            L, scale = levels, f32(slx / sl2)
            best = f32(scale * slx)
    return scale, L


def make_qkx3(x, w, nmax):
    """make_qkx3_quants(n, nmax, x, w, L, &the_min, Laux, -0.9, 0.05, 36, false): (scale, the_min, L).

    With explicit weights and nstep >= 1 it is make_qkx2_quants: the C bodies differ only in the
    degenerate test (max <= min vs max == min), which cannot differ since min <= max."""
    return make_qkx2(x, w, nmax, -0.9, 0.05, 36)


def make_qp(x, nmax, qw):
    """make_qp_quants(n, nmax, x, L, qw): (scale, L) with L as uint8 levels."""
    n = len(x)
    mx = max(f32(0), *x)
    if mx < EPS:
        return f32(0), [0] * n
    iscale = f32(f32(nmax) / mx)
    L = [nearest_int(f32(iscale * v)) & 0xFF for v in x]
    scale = f32(f32(1) / iscale)
    best = f32(0)
    for i in range(n):
        d = f32(x[i] - f32(scale * f32(L[i])))
        best = f32(best + f32(f32(qw[i] * d) * d))
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = f32(f32(f32(f32(0.1) * f32(step)) + f32(nmax)) / mx)
        scale_is = f32(f32(1) / iscale_is)
        mse = f32(0)
        for i in range(n):
            l = min(nmax, nearest_int(f32(iscale_is * x[i])))
            d = f32(x[i] - f32(scale_is * f32(l)))
            mse = f32(mse + f32(f32(qw[i] * d) * d))
        if mse < best:
            best, iscale = mse, iscale_is
    L = [min(nmax, nearest_int(f32(iscale * v))) & 0xFF for v in x]
    sumlx, suml2 = f32(0), f32(0)
    for i in range(n):
        sumlx = f32(sumlx + f32(f32(qw[i] * x[i]) * f32(L[i])))
        suml2 = f32(suml2 + f32(f32(qw[i] * f32(L[i])) * f32(L[i])))
    for _ in range(5):
        changed = 0
        for i in range(n):
            w = qw[i]
            slx = f32(sumlx - f32(f32(w * x[i]) * f32(L[i])))
            sl2 = f32(suml2 - f32(f32(w * f32(L[i])) * f32(L[i])))
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, nearest_int(f32(f32(x[i] * sl2) / slx)))
                if new_l != L[i]:
                    slx = f32(slx + f32(f32(w * x[i]) * f32(new_l)))
                    sl2 = f32(sl2 + f32(f32(w * f32(new_l)) * f32(new_l)))
                    if f32(f32(slx * slx) * suml2) > f32(f32(sumlx * sumlx) * sl2):
                        L[i], sumlx, suml2 = new_l & 0xFF, slx, sl2
                        changed += 1
        if not changed:
            break
    return (f32(sumlx / suml2) if suml2 > 0 else f32(0)), L


def _sigma2(row) -> np.float32:
    s = f32(0)
    for v in row:
        s = f32(s + f32(v * v))
    return f32(s / f32(len(row)))


def _qh_pack(L) -> tuple[bytes, int]:
    """Low nibbles of a 32-weight block (pairs j, j+16) and the fifth bits as a uint32."""
    qh = 0
    for j in range(16):
        qh |= ((L[j] & 0x10) >> 4) << j
        qh |= ((L[j + 16] & 0x10) >> 4) << (j + 16)
    return bytes((L[j] & 0xF) | ((L[j + 16] & 0xF) << 4) for j in range(16)), qh


def _legacy_row(row, qw, nmax, with_min) -> bytes:
    """quantize_row_q{4,5}_0_impl (make_qx_quants(32, nmax)) and _1_impl (make_qkx3_quants(32, 2 nmax - 1))."""
    sigma2 = _sigma2(row)
    out = b""
    for b in range(len(row) // 32):
        xb, wb = row[32 * b : 32 * b + 32], qw[32 * b : 32 * b + 32]
        weight = [f32(wb[j] * np.sqrt(f32(sigma2 + f32(xb[j] * xb[j])))) for j in range(32)]
        if with_min:
            d, the_min, L = make_qkx3(xb, weight, 2 * nmax - 1)
            out += struct.pack("<HH", fp16_bits(d), fp16_bits(f32(-the_min)))
        else:
            d, L = make_qx_weighted(xb, nmax, weight)
            out += struct.pack("<H", fp16_bits(d))
        qs, qh = _qh_pack(L)
        out += (struct.pack("<I", qh) if nmax == 16 else b"") + qs
    return out


def q4_0_row(row, qw) -> bytes:
    return _legacy_row(row, qw, 8, False)


def q4_1_row(row, qw) -> bytes:
    return _legacy_row(row, qw, 8, True)


def q5_0_row(row, qw) -> bytes:
    return _legacy_row(row, qw, 16, False)


def q5_1_row(row, qw) -> bytes:
    return _legacy_row(row, qw, 16, True)


def q4_k_row(row, qw) -> bytes:
    return _k_row(row, qw, 15)


def q5_k_row(row, qw) -> bytes:
    return _k_row(row, qw, 31)


def _k_row(row, qw, nmax) -> bytes:
    """quantize_row_q4_K_impl (nmax 15) / quantize_row_q5_K_impl (nmax 31, scales clamped to 63)."""
    out = b""
    for b in range(len(row) // 256):
        x, w = row[256 * b : 256 * b + 256], qw[256 * b : 256 * b + 256]
        s = f32(0)
        for v in x:
            s = f32(s + f32(v * v))
        sigma2 = f32(f32(f32(2) * s) / f32(256))
        scales, mins, sw, L = [], [], [], []
        for j in range(8):
            xs = x[32 * j : 32 * j + 32]
            weight = [f32(w[32 * j + i] * np.sqrt(f32(sigma2 + f32(xs[i] * xs[i])))) for i in range(32)]
            total = f32(0)
            for v in weight:
                total = f32(total + v)
            sw.append(total)
            sc, mn, lv = make_qkx3(xs, weight, nmax)
            scales.append(sc)
            mins.append(mn)
            L.extend(lv)
        d_block, Ls = make_qp(scales, 63, sw)
        m_block, Lm = make_qp(mins, 63, sw)
        if nmax == 31:
            Ls, Lm = [min(63, v) for v in Ls], [min(63, v) for v in Lm]
        packed = [0] * 12
        for j in range(8):
            if j < 4:
                packed[j], packed[j + 4] = Ls[j], Lm[j]
            else:
                packed[j + 4] = (Ls[j] & 0xF) | ((Lm[j] & 0xF) << 4)
                packed[j - 4] |= (Ls[j] >> 4) << 6
                packed[j] |= (Lm[j] >> 4) << 6
        packed = [p & 0xFF for p in packed]
        d16, m16 = fp16_bits(d_block), fp16_bits(m_block)
        for j in range(8):
            if j < 4:
                sc, m = packed[j] & 63, packed[j + 4] & 63
            else:
                sc = (packed[j + 4] & 0xF) | ((packed[j - 4] >> 6) << 4)
                m = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4)
            d = f32(fp16_val(d16) * f32(sc))
            if d == 0:
                continue
            dm = f32(fp16_val(m16) * f32(m))
            for i in range(32):
                L[32 * j + i] = max(0, min(nmax, nearest_int(f32(f32(x[32 * j + i] + dm) / d))))
        if nmax == 15:
            qs = bytes(L[j + i] | (L[j + i + 32] << 4) for j in range(0, 256, 64) for i in range(32))
            out += struct.pack("<HH", d16, m16) + bytes(packed) + qs
            continue
        qh = bytearray(32)
        ql = bytearray(128)
        for k, j in enumerate(range(0, 256, 64)):
            for i in range(32):
                lo, hi = L[j + i], L[j + i + 32]
                qh[i] |= ((lo >> 4) & 1) << (2 * k) | ((hi >> 4) & 1) << (2 * k + 1)
                ql[32 * k + i] = (lo & 0xF) | ((hi & 0xF) << 4)
        out += struct.pack("<HH", d16, m16) + bytes(packed) + bytes(qh) + bytes(ql)
    return out


def q6_k_row(row, qw) -> bytes:
    out = b""
    for b in range(len(row) // 256):
        x, w = row[256 * b : 256 * b + 256], qw[256 * b : 256 * b + 256]
        scales, L = [], []
        max_scale, max_abs = f32(0), f32(0)
        for ib in range(16):
            s, lv = make_qx_weighted(x[16 * ib : 16 * ib + 16], 32, w[16 * ib : 16 * ib + 16])
            scales.append(s)
            L.extend(lv)
            if abs(s) > max_abs:
                max_abs, max_scale = f32(abs(s)), s
        if max_abs < EPS:
            out += bytes(210)
            continue
        iscale = f32(f32(-128) / max_scale)
        d16 = fp16_bits(f32(f32(1) / iscale))
        isc = [min(127, nearest_int(f32(iscale * s))) for s in scales]
        for j in range(16):
            d = f32(fp16_val(d16) * f32(isc[j]))
            if d == 0:
                continue
            for i in range(16):
                L[16 * j + i] = max(-32, min(31, nearest_int(f32(x[16 * j + i] / d)))) + 32
        ql, qh = bytearray(128), bytearray(64)
        for half in range(2):
            j = 128 * half
            for i in range(32):
                q = [L[j + i + 32 * k] for k in range(4)]
                ql[64 * half + i] = (q[0] & 0xF) | ((q[2] & 0xF) << 4)
                ql[64 * half + i + 32] = (q[1] & 0xF) | ((q[3] & 0xF) << 4)
                qh[32 * half + i] = (q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6)
        out += bytes(ql) + bytes(qh) + bytes(v & 0xFF for v in isc) + struct.pack("<H", d16)
    return out


ROW_ENCODERS = {
    "Q4_0": q4_0_row,
    "Q4_1": q4_1_row,
    "Q5_0": q5_0_row,
    "Q5_1": q5_1_row,
    "Q4_K": q4_k_row,
    "Q5_K": q5_k_row,
    "Q6_K": q6_k_row,
}
