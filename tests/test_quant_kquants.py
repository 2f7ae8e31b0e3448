"""K-quant quantizers: byte parity with llama.cpp (ggml), layout via gguf-py, shapes."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from lora2gguf.quantize import kquants as kq
from llama_oracle import ggml_quantize_rows, llama_cpp_available

sys.path.insert(0, str(Path(__file__).parent))
import _kq_scalar_ref as scalar_ref  # noqa: E402

TYPES = ["Q4_K", "Q5_K", "Q6_K"]
BACKENDS = [
    "numpy",
    pytest.param(
        "numba",
        marks=pytest.mark.skipif(not kq.numba_available(), reason="numba not installed"),
    ),
]


def _distributions(seed: int, n_rows: int, n_cols: int) -> dict[str, np.ndarray]:
    """Data shaped like real weights and their awkward corners."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    out: dict[str, np.ndarray] = {}
    out["gaussian"] = (g * 0.02).astype(np.float32)
    out["heavy_tailed"] = (rng.standard_t(2.0, (n_rows, n_cols)) * 0.01).astype(np.float32)
    z = out["gaussian"].copy()
    z[0] = 0  # an all-zero row
    z[1, : n_cols // 2] = 0  # zero super-blocks next to normal ones
    z[2, ::3] = 0  # sparse
    z[3, 5:37] = 0  # one all-zero 32-value sub-block inside a block
    out["zeros"] = z
    c = np.empty((n_rows, n_cols), dtype=np.float32)
    c[:] = np.float32(-0.25)
    c[1::4] = np.float32(0.5)
    c[2::4] = np.float32(1e-3)
    c[3::4] = np.float32(-1e-3) + g[3::4] * np.float32(1e-9)  # near-constant: pathological rounding
    out["constant"] = c
    out["tiny"] = (g * 1e-6).astype(np.float32)
    out["subnormal_range"] = (g * 1e-20).astype(np.float32)
    out["large"] = (g * 1e3).astype(np.float32)
    out["offset"] = (g * 0.01 + 0.05).astype(np.float32)
    out["outliers"] = out["gaussian"].copy()
    out["outliers"][:, ::97] *= 200
    # near-constant blocks far from zero: the min/scale search degenerates
    out["near_constant_offset"] = (np.float32(1000) + g * np.float32(1e-4)).astype(np.float32)
    out["two_levels"] = np.where(g > 0, np.float32(2), np.float32(2.0000002)).astype(np.float32)
    # corrupt weights: llama.cpp quantizes them without complaint, so must we, identically
    bad = out["gaussian"].copy()
    bad[0, 3] = np.nan
    bad[1, n_cols - 5] = np.inf
    bad[2, 7] = -np.inf
    bad[3, :] = np.float32(3e38)
    out["non_finite_and_huge"] = bad
    # fp16-rounded values, as read from an F16 GGUF
    out["from_f16"] = (rng.standard_normal((n_rows, n_cols)) * 0.03).astype(np.float16).astype(np.float32)
    return out


# --------------------------------------------------------------------------- llama.cpp peer

needs_ggml = pytest.mark.skipif(
    not llama_cpp_available(), reason="llama_cpp (llama-cpp-python) with libggml not importable"
)


def ggml_quantize(type_name: str, x: np.ndarray) -> np.ndarray:
    """Quantize with llama.cpp's own ggml_quantize_chunk (no importance matrix)."""
    return ggml_quantize_rows(type_name, x)


def block_match(a: np.ndarray, b: np.ndarray, block_bytes: int) -> tuple[int, int]:
    ab = a.reshape(-1, block_bytes)
    bb = b.reshape(-1, block_bytes)
    same = np.all(ab == bb, axis=1)
    return int(same.sum()), int(same.size)


@needs_ggml
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("type_name", TYPES)
def test_byte_identical_to_ggml(type_name: str, backend: str) -> None:
    report = []
    for name, x in _distributions(seed=11, n_rows=24, n_cols=1024).items():
        ours = getattr(kq, f"quantize_{type_name.lower()}")(x, backend=backend)
        ref = ggml_quantize(type_name, x)
        same, total = block_match(ours, ref, kq.BLOCK_BYTES[type_name])
        report.append(f"{name}: {same}/{total}")
        assert same == total, f"{type_name} {name}: only {same}/{total} blocks identical ({report})"


@needs_ggml
@pytest.mark.parametrize("backend", BACKENDS)
def test_byte_identical_to_ggml_larger_gaussian(backend: str) -> None:
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((64, 4096)) * 0.02).astype(np.float32)
    for type_name in TYPES:
        ours = getattr(kq, f"quantize_{type_name.lower()}")(x, backend=backend)
        ref = ggml_quantize(type_name, x)
        same, total = block_match(ours, ref, kq.BLOCK_BYTES[type_name])
        assert same == total, f"{type_name}: {same}/{total}"


# --------------------------------------------------------------------------- scalar transcription (no llama.cpp needed)


@functools.lru_cache(maxsize=None)
def _scalar_cases(type_name: str) -> tuple[tuple[str, np.ndarray, tuple[bytes, ...]], ...]:
    """(name, rows, expected bytes per row) from the slow transcription, computed once per type."""
    block = scalar_ref.BLOCK_FUNCS[type_name]
    cases = []
    for name, x in _distributions(seed=3, n_rows=4, n_cols=256).items():
        x = x[[0, 3]]  # rows 0 and 3 carry the zero / near-constant corner cases (slow reference)
        with np.errstate(all="ignore"):  # the corrupt-weights case overflows, as in C
            expected = tuple(block(x[r]) for r in range(x.shape[0]))
        cases.append((name, x, expected))
    return tuple(cases)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("type_name", TYPES)
def test_matches_scalar_transcription(type_name: str, backend: str) -> None:
    """Both backends equal a loop-by-loop float32 transcription, block by block."""
    for name, x, expected in _scalar_cases(type_name):
        ours = getattr(kq, f"quantize_{type_name.lower()}")(x, backend=backend)
        for r, exp in enumerate(expected):
            assert ours[r].tobytes() == exp, f"{type_name} {name} row {r}"


# --------------------------------------------------------------------------- layout and quality via gguf-py


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K"])
def test_exact_nearest_path_agrees(type_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bit-exact nearest_int branch of the scale search (taken when rint could
    differ) gives the same bytes as the fast rint branch where both apply."""
    fn = getattr(kq, f"quantize_{type_name.lower()}")
    xs = _distributions(seed=4, n_rows=4, n_cols=512)
    fast = {k: fn(v, backend="numpy") for k, v in xs.items()}
    monkeypatch.setattr(kq, "_rint_safe", lambda *a: False)
    for k, v in xs.items():
        assert np.array_equal(fn(v, backend="numpy"), fast[k]), k


@pytest.mark.skipif(not kq.numba_available(), reason="numba not installed")
@pytest.mark.parametrize("type_name", TYPES)
def test_backends_agree(type_name: str) -> None:
    fn = getattr(kq, f"quantize_{type_name.lower()}")
    for name, x in _distributions(seed=8, n_rows=8, n_cols=1024).items():
        assert np.array_equal(fn(x, backend="numpy"), fn(x, backend="numba")), name


@pytest.mark.skipif(not kq.numba_available(), reason="numba not installed")
@pytest.mark.parametrize("type_name", TYPES)
def test_numba_scalar_fallback_agrees(type_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-sub-block-at-a-time numba kernels (used when the vectorised ones
    decline a chunk) give the same bytes."""
    from lora2gguf.quantize import _kq_numba

    fn = getattr(kq, f"quantize_{type_name.lower()}")
    xs = _distributions(seed=9, n_rows=4, n_cols=512)
    fast = {k: fn(v, backend="numba") for k, v in xs.items()}
    monkeypatch.setattr(_kq_numba, "qkx2_search_vec", lambda *a: False)
    monkeypatch.setattr(_kq_numba, "qx_rmse1_search_vec", lambda *a: False)
    for k, v in xs.items():
        assert np.array_equal(fn(v, backend="numba"), fast[k]), k
        assert np.array_equal(fn(v, backend="numpy"), fast[k]), k


def test_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA2GGUF_KQUANTS_BACKEND", "numpy")
    assert kq.resolve_backend() == "numpy"
    assert kq.resolve_backend("numpy") == "numpy"
    monkeypatch.delenv("LORA2GGUF_KQUANTS_BACKEND")
    assert kq.resolve_backend() == ("numba" if kq.numba_available() else "numpy")
    with pytest.raises(ValueError, match="unknown K-quant backend"):
        kq.resolve_backend("cuda")


@pytest.mark.parametrize("type_name,max_rel_rmse", [("Q4_K", 0.085), ("Q5_K", 0.043), ("Q6_K", 0.021)])
def test_dequantized_round_trip(type_name: str, max_rel_rmse: float) -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rng = np.random.default_rng(7)
    x = (rng.standard_normal((32, 768)) * 0.02).astype(np.float32)
    q = getattr(kq, f"quantize_{type_name.lower()}")(x)
    y = dequantize(q, GGMLQuantizationType[type_name]).reshape(x.shape)
    rel = float(np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x**2)))
    assert rel < max_rel_rmse, rel
    # per super-block, no value is off by more than a few quantization steps
    blocks_x = x.reshape(-1, 256)
    blocks_y = y.reshape(-1, 256)
    levels = {"Q4_K": 15, "Q5_K": 31, "Q6_K": 63}[type_name]
    span = blocks_x.max(axis=1) - np.minimum(blocks_x.min(axis=1), 0)
    worst = np.abs(blocks_x - blocks_y).max(axis=1)
    assert np.all(worst <= 2.0 * span / levels), (worst / span).max()
    # a zero row stays exactly zero
    x[0] = 0
    y0 = dequantize(getattr(kq, f"quantize_{type_name.lower()}")(x[:1]), GGMLQuantizationType[type_name])
    assert np.all(y0 == 0)


@pytest.mark.parametrize("type_name", TYPES)
def test_shapes_and_errors(type_name: str) -> None:
    fn = getattr(kq, f"quantize_{type_name.lower()}")
    bb = kq.BLOCK_BYTES[type_name]
    x = np.zeros((3, 512), dtype=np.float32)
    q = fn(x)
    assert q.shape == (3, 2 * bb) and q.dtype == np.uint8
    assert fn(np.zeros((0, 256), dtype=np.float32)).shape == (0, bb)
    # rows are independent of how many rows are quantized together (chunking)
    rng = np.random.default_rng(1)
    big = rng.standard_normal((kq._CHUNK_SUPERBLOCKS // 2 + 3, 768)).astype(np.float32)
    full = fn(big)
    assert np.array_equal(full[5:9], fn(big[5:9]))
    # float16 / float64 input is converted to float32 first
    assert np.array_equal(fn(big.astype(np.float16)), fn(big.astype(np.float16).astype(np.float32)))
    with pytest.raises(ValueError, match="multiple of 256"):
        fn(np.zeros((2, 300), dtype=np.float32))
    with pytest.raises(ValueError, match="2-D"):
        fn(np.zeros(256, dtype=np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_thread_pool_gives_same_bytes(backend: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(2)
    x = (rng.standard_normal((16, 1024)) * 0.02).astype(np.float32)
    whole = kq.quantize_q4_k(x, backend=backend)
    with ThreadPoolExecutor(max_workers=2) as pool:
        parts = list(pool.map(lambda a: kq.quantize_q4_k(a, backend=backend), [x[:8], x[8:]]))
    assert np.array_equal(np.concatenate(parts), whole)


if os.environ.get("LORA2GGUF_KQ_REPORT"):  # pragma: no cover - manual diagnostics

    def test_print_match_report() -> None:
        for type_name in TYPES:
            for name, x in _distributions(seed=11, n_rows=64, n_cols=2048).items():
                ours = getattr(kq, f"quantize_{type_name.lower()}")(x)
                same, total = block_match(ours, ggml_quantize(type_name, x), kq.BLOCK_BYTES[type_name])
                print(type_name, name, f"{same}/{total}")
