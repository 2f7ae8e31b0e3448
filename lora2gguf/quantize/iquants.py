"""Lattice ("i-quant") block quantizers, byte-identical to llama.cpp: IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S,
IQ1_S, IQ1_M.

What ``ggml_quantize_chunk`` writes for these types: the C functions of ggml-quants.c
(``quantize_row_iq2_xxs_impl``, ``quantize_row_iq2_xs_impl``, ``quantize_row_iq2_s_impl``,
``quantize_row_iq3_xxs_impl``, ``quantize_row_iq3_s_impl``, ``quantize_row_iq1_s_impl``,
``quantize_row_iq1_m_impl``) transcribed into numba kernels (:mod:`lora2gguf.quantize._iq_numba`,
:mod:`lora2gguf.quantize._iq1_numba`), checked block by block against llama.cpp in
``tests/test_quant_iq.py``.

The grids are format facts, read from gguf-py (``gguf.quants.<TYPE>.grid``, the tables llama.cpp
dequantizes with); the quantizer's lookup tables (the map from a lattice point to its grid index
and the neighbour lists of the points off the grid) are generated from them exactly as
``iq2xs_init_impl`` / ``iq3xs_init_impl`` do, once per process (IQ1_S and IQ1_M share one grid,
and its shift ``delta``, also from gguf-py).

IQ2_XXS, IQ2_XS and IQ1_S need importance weights (ggml asserts them); IQ2_S, IQ3_XXS, IQ3_S and
IQ1_M fall back to their own weights (sigma2/4 + x^2, x^2) without.
"""

from __future__ import annotations

import functools
import logging

import gguf
import numpy as np

from lora2gguf.quantize.lowbit import checked_rows

logger = logging.getLogger(__name__)

# type -> (grid points per entry packed with `bits` bits each, neighbour distances kept, kmap size)
_LATTICE = {
    "IQ2_XXS": (2, 2, 43692),
    "IQ2_XS": (2, 2, 43692),
    "IQ2_S": (2, 1, 43692),
    "IQ3_XXS": (3, 2, 4096),
    "IQ3_S": (3, 3, 4096),
    "IQ1_S": (2, 3, 43692),
    "IQ1_M": (2, 3, 43692),
}
TYPES = tuple(_LATTICE)
# ggml_quantize_requires_imatrix: ggml aborts when these are quantized without importance weights.
NEED_WEIGHTS = frozenset({"IQ2_XXS", "IQ2_XS", "IQ1_S"})
IQ1_TYPES = ("IQ1_S", "IQ1_M")
# the kernels' status codes other than 0
_ABORTS = {
    1: "a block has no grid point or no valid scale (llama.cpp aborts on this input)",
    2: "no grid neighbour is closer than FLT_MAX (llama.cpp aborts or reads past the block on this input)",
}


def _kernels():  # type: ignore[no-untyped-def]
    from lora2gguf.quantize import _iq_numba

    return _iq_numba


def _iq1_kernels():  # type: ignore[no-untyped-def]
    from lora2gguf.quantize import _iq1_numba

    return _iq1_numba


def lattice(type_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid in the quantizer's 2*l+1 coordinates as int8, kmap, neighbours) of ``type_name``."""
    return _lattice("IQ1_S" if type_name == "IQ1_M" else type_name)  # IQ1_M uses IQ1_S's grid


@functools.cache
def _lattice(type_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    bits, nwant, kmap_size = _LATTICE[type_name]
    cls = getattr(gguf.quants, type_name)
    cls.init_grid()
    values = np.asarray(cls.grid, dtype=np.float32).reshape(cls.grid_shape)
    levels = np.asarray(cls.grid_map, dtype=np.float32)
    index = np.searchsorted(levels, values)  # grid_map is ascending: the level number l
    assert np.array_equal(levels[index], values), type_name
    grid = (2 * index + 1).astype(np.int8)
    kmap, neighbours = _kernels().neighbour_tables(grid, bits, nwant, kmap_size)
    logger.debug("%s: %d grid points, %d neighbour entries", type_name, grid.shape[0], neighbours.size)
    return grid, kmap, neighbours


@functools.cache
def _float_grid(type_name: str) -> np.ndarray:
    """The grid as the IQ2 / IQ3 kernels take it: float32 (exact: small odd integers)."""
    return lattice(type_name)[0].astype(np.float32)


def quantize(type_name: str, rows: np.ndarray, quant_weights: np.ndarray | None = None) -> np.ndarray:
    """float32 ``(rows, n_per_row)`` -> uint8 ``(rows, row_bytes)``; the row length must be a
    multiple of 256. ``quant_weights``: one importance per column (required for IQ2_XXS / IQ2_XS /
    IQ1_S)."""
    if type_name not in TYPES:
        raise ValueError(f"no lattice quantizer for {type_name}; supported: {', '.join(TYPES)}")
    x, checked, out = checked_rows(type_name, rows, quant_weights)
    if checked is None and type_name in NEED_WEIGHTS:
        raise ValueError(f"{type_name} needs importance weights (llama.cpp refuses it without an imatrix)")
    qw = np.zeros(1, np.float32) if checked is None else checked
    if x.size == 0:
        return out
    grid, kmap, neighbours = lattice(type_name)
    if type_name in IQ1_TYPES:
        kernel = getattr(_iq1_kernels(), type_name.lower())
        args: tuple[object, ...] = (grid, kmap, neighbours, np.float32(gguf.quants.IQ1_S.delta))
    else:
        kernel = getattr(_kernels(), type_name.lower())
        args = (_float_grid(type_name), kmap, neighbours)
    with np.errstate(all="ignore"):  # C semantics on degenerate blocks (inf / nan), as in C
        if type_name in NEED_WEIGHTS:
            status = kernel(x, qw, *args, out)
        else:
            status = kernel(x, qw, checked is not None, *args, out)
    if status:
        # where llama.cpp aborts (GGML_ASSERT, "Oops: found point not on grid"), never write something else
        raise ValueError(f"{type_name}: {_ABORTS[int(status)]}")
    return out
