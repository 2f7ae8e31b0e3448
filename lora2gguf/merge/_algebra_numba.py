"""numba kernel of the merge's per-tensor check (merge.algebra): one pass over each written tensor.

In numpy the check took about fifteen passes over every element (widen, matrix products, absolute
values, the bound, the ratio, the comparison): 25 CPU seconds on a 0.5B model, longer than the merge
itself, and bound by memory traffic. Here each row of the update ``s * left @ right`` (rank r) is built
in a buffer that stays in cache, and the written and base rows are read once, bf16 as stored.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# Rows one task of the parallel loop takes: its row buffers are allocated once for all of them.
_ROWS_PER_TASK = 64


@njit(cache=True, inline="always")
def _row_values(values, i, bits, out, is_bf16):  # pragma: no cover - compiled
    """Row ``i`` of ``values`` as float32 in ``out``; ``is_bf16``: bf16 bit patterns (uint16), widened by a shift."""
    if is_bf16:
        for j in range(values.shape[1]):
            bits[j] = np.uint32(values[i, j]) << np.uint32(16)
        out[:] = bits.view(np.float32)
    else:
        for j in range(values.shape[1]):
            out[j] = values[i, j]


@njit(cache=True, inline="always")
def _row_update(left, right, i, update, spread):  # pragma: no cover - compiled
    """Row ``i`` of ``left @ right`` into ``update``, and of ``|left| @ |right|`` into ``spread``."""
    update[:] = 0.0
    spread[:] = 0.0
    for k in range(left.shape[1]):
        factor = left[i, k]
        size = abs(factor)
        for j in range(right.shape[1]):
            update[j] += factor * right[k, j]
            spread[j] += size * abs(right[k, j])


@njit(cache=True, parallel=True, fastmath={"reassoc", "contract", "arcp", "nsz"})
def column_square_sums(w0, left, right, w0_bf16):  # pragma: no cover - compiled
    """Per column: the sum over these rows of ``(w0 + left @ right)^2``, in float64. DoRA on an
    embedding or a Conv1D weight normalises columns of the stored tensor, so the norms need every row
    before any element can be judged."""
    rows, cols = w0.shape
    blocks = (rows + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    partial = np.zeros((blocks, cols), dtype=np.float64)
    for block in prange(blocks):
        bits = np.empty(cols, dtype=np.uint32)
        base = np.empty(cols, dtype=np.float32)
        update = np.empty(cols, dtype=np.float32)
        spread = np.empty(cols, dtype=np.float32)
        for i in range(block * _ROWS_PER_TASK, min(rows, (block + 1) * _ROWS_PER_TASK)):
            _row_values(w0, i, bits, base, w0_bf16)
            _row_update(left, right, i, update, spread)
            for j in range(cols):
                combined = np.float64(base[j]) + np.float64(update[j])
                partial[block, j] += combined * combined
    return partial.sum(axis=0)


# Reassociation lets the sums vectorise; no "nnan"/"ninf": a NaN must still fail the comparison.
@njit(cache=True, parallel=True, fastmath={"reassoc", "contract", "arcp", "nsz"})
def judge_rows(w, w0, left, right, magnitude, column_scale, rel, target_weight, tiny, rank_error, w_bf16, w0_bf16):  # pragma: no cover
    """Per row of a tensor: the written ``w`` against ``(w0 + left @ right) * row_scale * column_scale``.

    ``w_bf16`` / ``w0_bf16``: the array holds bf16 bit patterns (uint16), else float32 values.
    ``left @ right`` is the scaled update (``left`` [rows, r], ``right`` [r, cols], the scaling folded
    into ``left``). With DoRA on a [out, in] weight (``magnitude`` non-empty) the row scale is
    magnitude / ||w0 + update||_row, else 1; ``column_scale`` (one float32 per column) carries DoRA's
    scale of an embedding or Conv1D weight, and is all ones otherwise. The bound per element is
    ``rel * (|w0| + |update| + target_weight * |target|)`` plus the float32 summation error over the
    rank (``rank_error * (|left| @ |right|)``) plus ``tiny``.

    Returns per row: the largest error/bound ratio among elements within bound, the count of elements
    beyond it (NaN included), the column of the first one (-1 if none), the squared error and the
    squared update (for the update's rounding error as a whole).
    """
    rows, cols = w.shape
    worst = np.zeros(rows, dtype=np.float64)
    bad = np.zeros(rows, dtype=np.int64)
    first = np.full(rows, -1, dtype=np.int64)
    error_sq = np.zeros(rows, dtype=np.float64)
    update_sq = np.zeros(rows, dtype=np.float64)
    for block in prange((rows + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK):
        # Row buffers allocated once per block of rows, not once per row.
        bits = np.empty(cols, dtype=np.uint32)
        written = np.empty(cols, dtype=np.float32)
        base = np.empty(cols, dtype=np.float32)
        update = np.empty(cols, dtype=np.float32)
        spread = np.empty(cols, dtype=np.float32)
        ratio = np.empty(cols, dtype=np.float32)
        for i in range(block * _ROWS_PER_TASK, min(rows, (block + 1) * _ROWS_PER_TASK)):
            _row_values(w, i, bits, written, w_bf16)
            _row_values(w0, i, bits, base, w0_bf16)
            _row_update(left, right, i, update, spread)
            scale = np.float32(1.0)
            if magnitude.size > 0:
                norm = 0.0
                for j in range(cols):
                    combined = np.float64(base[j]) + np.float64(update[j])
                    norm += combined * combined
                scale = np.float32(magnitude[i] / np.sqrt(norm))
            # A vectorisable pass for the ratios (NaN where the written value is NaN), then the tally.
            row_error, row_update = 0.0, 0.0
            for j in range(cols):
                target = (base[j] + update[j]) * scale * column_scale[j]
                off = written[j] - target
                bound = rel * (abs(base[j]) + abs(update[j]) + target_weight * abs(target)) + rank_error * spread[j] + tiny
                ratio[j] = abs(off) / bound
                moved = target - base[j]
                row_error += off * off
                row_update += moved * moved
            row_worst, row_bad, row_first = 0.0, 0, -1
            for j in range(cols):
                if ratio[j] <= 1.0:
                    row_worst = max(row_worst, ratio[j])
                else:
                    row_bad += 1
                    if row_first < 0:
                        row_first = j
            worst[i], bad[i], first[i], error_sq[i], update_sq[i] = row_worst, row_bad, row_first, row_error, row_update
    return worst, bad, first, error_sq, update_sq
