"""numba kernel widening IEEE half floats to float32 through a 65,536-entry table.

numpy's float16 -> float32 cast measured about 2 ns per value here, a sixth of a Q4_K_M run's CPU
time on a 0.5B model; a table lookup (256 KiB, cache resident) is exact for every bit pattern and
about 3x faster. Compiled with ``nogil`` for the quantizer's thread pool.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Every half-precision bit pattern's float32 value: numpy's cast is exact, so the table is too.
F16_TABLE = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@njit(cache=True, nogil=True)
def _widen(bits, table, out):  # pragma: no cover - compiled
    """Widen through the table; returns the index of the first NaN/Inf pattern (exponent all ones), or -1."""
    first = -1
    for i in range(bits.size):
        out[i] = table[bits[i]]
        if first < 0 and (bits[i] & 0x7C00) == 0x7C00:
            first = i
    return first


def widen_f16(bits: np.ndarray) -> tuple[np.ndarray, int]:
    """float32 values of ``bits`` (uint16 half-float patterns, any shape), and the flat index of the
    first NaN/Inf among them (-1: all finite), found in the same pass."""
    out = np.empty(bits.shape, dtype=np.float32)
    first = _widen(np.ascontiguousarray(bits).reshape(-1), F16_TABLE, out.reshape(-1))
    return out, int(first)
