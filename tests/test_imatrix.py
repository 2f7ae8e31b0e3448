"""Importance matrices: the file format, the PyTorch collection, and importance-weighted quantization.

Checked against llama.cpp itself where it is installed: the weighted block quantizers against
``ggml_quantize_chunk(..., quant_weights)``, whole files against ``llama_model_quantize`` given the
same imatrix; and, when LORA2GGUF_LLAMA_BIN names a folder with llama.cpp's ``llama-quantize`` and
``llama-imatrix`` binaries, that the tools read our imatrix and agree with our collection.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lora2gguf.errors import Lora2ggufError
from lora2gguf.formats.imatrix import Imatrix, ImatrixEntry, read_imatrix, write_imatrix
from lora2gguf.quantize import blocks
from llama_oracle import ggml_quantize_rows, llama_cpp_available, llama_quantize_file
from lora2gguf.quantize.iquants import NEED_WEIGHTS
from lora2gguf.quantize.types import NEEDS_IMATRIX, SUPPORTED, quant_file_tag, split_quant_tag

sys.path.insert(0, str(Path(__file__).parent))
from _imatrix_scalar_ref import ROW_ENCODERS  # noqa: E402

needs_llama = pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed")
LLAMA_BIN = os.environ.get("LORA2GGUF_LLAMA_BIN")
needs_llama_tools = pytest.mark.skipif(
    not LLAMA_BIN, reason="set LORA2GGUF_LLAMA_BIN to a folder with llama-quantize and llama-imatrix"
)


# ----------------------------------------------------------------------------- weighted quantizers


def _rows_and_weights(n_rows: int, n_cols: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n_rows, n_cols)) * 0.05).astype(np.float32)
    x[0] = 0.0  # all-zero row
    x[1, :64] = np.float32(1e-3)  # constant blocks
    x[2] = np.abs(x[2])  # all positive (min clipped to 0 in the K-quants)
    x[3] *= 1e4  # large range
    x[4] = np.round(x[4] * 64) / 64  # ties
    x[5] = np.float32(1e-8) * rng.standard_normal(n_cols)  # fp16-subnormal scales
    x[6] = rng.standard_t(2, n_cols).astype(np.float32) * 0.02  # heavy tails
    qw = (rng.standard_normal(n_cols) ** 2).astype(np.float32) * np.float32(rng.uniform(0.01, 100))
    qw[:40] = 0.0  # columns no calibration token used
    qw[100] = np.float32(1e4)  # one dominant column (outlier activations)
    return x, qw


@needs_llama
@pytest.mark.parametrize("qtype", [*blocks.WEIGHTED_TYPES, "Q8_0"])
def test_weighted_blocks_byte_identical_to_ggml(qtype: str) -> None:
    x, qw = _rows_and_weights(32, 512, seed=7)
    ours = blocks.encode(qtype, x, qw)
    ref = ggml_quantize_rows(qtype, x, qw)
    same = (ours == ref).all(axis=1)
    assert same.all(), f"{qtype}: rows differ from ggml: {np.flatnonzero(~same)[:10]}"


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_1", "Q4_K", "Q6_K"])
def test_non_finite_row_takes_the_scalar_search_with_same_bytes_for_the_others(qtype: str) -> None:
    """The weighted kernels search a tile of sub-blocks at once unless a value in it is not finite;
    then that tile goes one sub-block at a time, as C does. Finite rows must not notice."""
    x, qw = _rows_and_weights(8, 512, seed=3)
    clean = blocks.encode(qtype, x, qw)
    with_inf = np.vstack([x, np.full((1, 512), np.inf, np.float32)])
    assert np.array_equal(blocks.encode(qtype, with_inf, qw)[:8], clean)


@pytest.mark.parametrize("qtype", sorted(ROW_ENCODERS))
def test_weighted_blocks_match_scalar_transcription(qtype: str) -> None:
    """The numba kernels against a loop-by-loop float32 transcription of the C *_impl functions."""
    x, qw = _rows_and_weights(8, 256, seed=11)
    ours = blocks.encode(qtype, x, qw)
    for r in range(x.shape[0]):
        assert bytes(ours[r]) == ROW_ENCODERS[qtype](list(x[r]), list(qw)), f"{qtype} row {r}"


@pytest.mark.parametrize("qtype", [t for t in blocks.WEIGHTED_TYPES if t not in NEED_WEIGHTS])
def test_weights_steer_the_error_to_important_columns(qtype: str) -> None:
    """Not a no-op: with the weights, the importance-weighted squared error drops on every row."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((16, 512)) * 0.05).astype(np.float32)
    qw = np.where(rng.random(512) < 0.1, 100.0, 0.01).astype(np.float32)
    plain = blocks.decode(qtype, blocks.encode(qtype, x), 512)
    weighted = blocks.decode(qtype, blocks.encode(qtype, x, qw), 512)
    err_plain = ((plain - x) ** 2 * qw).sum(axis=1)
    err_weighted = ((weighted - x) ** 2 * qw).sum(axis=1)
    assert (err_weighted < err_plain).all(), (qtype, err_plain / err_weighted)


def test_q8_0_ignores_weights_as_ggml_does() -> None:
    x, qw = _rows_and_weights(8, 256, seed=3)
    assert np.array_equal(blocks.encode("Q8_0", x, qw), blocks.encode("Q8_0", x))


# ----------------------------------------------------------------------------- file format


def _sample_imatrix() -> Imatrix:
    rng = np.random.default_rng(0)
    entries = {
        "blk.0.attn_q.weight": ImatrixEntry(rng.random((1, 64), dtype=np.float32) * 9, np.array([9.0], np.float32)),
        "blk.0.ffn_down.weight": ImatrixEntry(rng.random((1, 128), dtype=np.float32), np.array([0.0], np.float32)),
    }
    return Imatrix(entries=entries, datasets=["train.txt"], chunk_count=3, chunk_size=512)


def test_imatrix_file_reads_back_with_gguf_py_in_llama_cpp_layout(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "imatrix.gguf"
    write_imatrix(path, _sample_imatrix())
    reader = gguf.GGUFReader(path)
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(fields) == ["general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]
    assert fields["general.type"].contents() == "imatrix"
    assert fields["imatrix.datasets"].contents() == ["train.txt"]
    assert fields["imatrix.chunk_count"].types == [gguf.GGUFValueType.UINT32]
    assert (fields["imatrix.chunk_count"].contents(), fields["imatrix.chunk_size"].contents()) == (3, 512)
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {
        "blk.0.attn_q.weight.in_sum2", "blk.0.attn_q.weight.counts",
        "blk.0.ffn_down.weight.in_sum2", "blk.0.ffn_down.weight.counts",
    }
    # ggml shapes: in_sum2 (n_in, n_mat), counts (1, n_mat); all F32
    assert [int(n) for n in tensors["blk.0.attn_q.weight.in_sum2"].shape] == [64, 1]
    assert [int(n) for n in tensors["blk.0.attn_q.weight.counts"].shape] == [1, 1]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)
    assert float(tensors["blk.0.attn_q.weight.counts"].data.reshape(-1)[0]) == 9.0

    back = read_imatrix(path)
    q = back.entries["blk.0.attn_q.weight"]
    src = _sample_imatrix().entries["blk.0.attn_q.weight"]
    assert np.array_equal(q.sums, src.sums)
    # llama-quantize's importance: sums / count, and all ones for a zero count
    assert np.array_equal(q.importance(), (src.sums / np.float32(9)).reshape(-1))
    assert np.array_equal(back.entries["blk.0.ffn_down.weight"].importance(), np.ones(128, np.float32))


def test_bad_imatrix_files_name_file_and_key(tmp_path: Path, tiny_f16: Path) -> None:
    with pytest.raises(Lora2ggufError, match=r"model\.gguf: general\.type is .*expected 'imatrix'"):
        read_imatrix(tiny_f16)
    bad = _sample_imatrix()
    bad.entries["blk.0.attn_q.weight"].sums[0, 3] = np.nan
    write_imatrix(tmp_path / "nan.gguf", bad)
    with pytest.raises(Lora2ggufError, match=r"nan\.gguf: tensor blk\.0\.attn_q\.weight\.in_sum2 holds non-finite"):
        read_imatrix(tmp_path / "nan.gguf")
    with pytest.raises(Lora2ggufError, match=r"missing\.gguf: imatrix file not found"):
        read_imatrix(tmp_path / "missing.gguf")


# ----------------------------------------------------------------------------- collection


@pytest.fixture(scope="module")
def tiny_imatrix(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lora2gguf.cli import main
    from lora2gguf.demo.dataset import render_text

    folder = tmp_path_factory.mktemp("imatrix")
    text = folder / "train.txt"
    text.write_text(render_text("train"), encoding="utf-8")
    out = folder / "imatrix.gguf"
    status = main(
        ["imatrix", "--model", str(tiny_base), "--text", str(text), "--out", str(out),
         "--chunk-size", "128", "--max-tokens", "700", "--device", "cpu", "--threads", "2"]
    )
    assert status == 0
    return out


def test_collected_sums_equal_the_squared_inputs(tiny_imatrix: Path, tiny_base: Path) -> None:
    """blk.0.attn_q's input is the first RMSNorm of the token embeddings: recompute its sums directly."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora2gguf.demo.dataset import render_text

    imatrix = read_imatrix(tiny_imatrix)
    config = json.loads((tiny_base / "config.json").read_text())
    n_layer = config["num_hidden_layers"]
    expected_names = {
        f"blk.{i}.{kind}.weight"
        for i in range(n_layer)
        for kind in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    }
    assert set(imatrix.entries) == expected_names
    report = json.loads(tiny_imatrix.with_suffix(".json").read_text())
    assert report["calibration"]["tokens_used"] == 700 and report["calibration"]["chunks"] == 6
    assert imatrix.chunk_count == 6 and imatrix.chunk_size == 128
    assert all(float(e.counts[0]) == 700 for e in imatrix.entries.values())

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    ids = tokenizer(render_text("train"))["input_ids"][:700]
    expected = torch.zeros(config["hidden_size"], dtype=torch.float64)
    with torch.inference_mode():
        for start in range(0, 700, 128):
            chunk = torch.tensor([ids[start : start + 128]])
            h = model.model.layers[0].input_layernorm(model.model.embed_tokens(chunk))
            expected += (h.double() ** 2).sum(dim=(0, 1))
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight"):
        np.testing.assert_allclose(imatrix.entries[name].sums[0], expected.numpy(), rtol=1e-5)
    # ffn_down sees the SwiGLU product, a different width
    assert imatrix.entries["blk.0.ffn_down.weight"].sums.shape == (1, config["intermediate_size"])


def _bf16_copy(model: Any, folder: Path) -> Path:
    import torch

    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    return folder


def _bf16_gemma3(folder: Path) -> Path:
    """Gemma 3 keeps its embedding scale sqrt(hidden) in a buffer that a bf16 load rounds (sqrt(288)
    is not a bf16 number) and its scaled embedding is not a plain nn.Embedding."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=512, hidden_size=288, intermediate_size=320, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=64, sliding_window=16,
                              query_pre_attn_scalar=64, tie_word_embeddings=True)  # fmt: skip
    config.architectures = ["Gemma3ForCausalLM"]
    return _bf16_copy(Gemma3ForCausalLM(config), folder)


def _float32_hooked_sums(model_dir: Path, chunks: list[list[int]]) -> dict[str, Any]:
    """The collection as first written: the whole float32 model, one chunk per pass, a float64 pre-hook
    on every linear layer of the blocks."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums: dict[str, Any] = {}

    def hook_for(name: str) -> Any:
        def hook(_module: Any, inputs: tuple[Any, ...]) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)

        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            module.register_forward_pre_hook(hook_for(name))
    with torch.inference_mode():
        for chunk in chunks:
            model(torch.tensor([chunk]), use_cache=False)
    return sums


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_collection_on_bf16_weights_equals_the_float32_model(
    family: str, tiny_base: Path, tmp_path: Path
) -> None:
    """Run on a bf16 checkpoint as loaded (weights widened per matmul, body only, chunks batched), the
    sums are those of the float32 model run chunk by chunk through a hook, and the model is left as it was."""
    import torch
    from transformers import AutoModelForCausalLM

    from lora2gguf.imatrix.collect import collect, gguf_names

    if family == "qwen2":
        model_dir = _bf16_copy(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), tmp_path / "m")
    else:
        model_dir = _bf16_gemma3(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").eval()
    assert model.dtype == torch.bfloat16
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, 300).tolist()
    chunks = [ids[i : i + 64] for i in range(0, 300, 64)]  # 4 chunks batched together, then 44 tokens alone
    before = {n: (p.dtype, p.data_ptr()) for n, p in model.named_parameters()}

    imatrix, stats = collect(model, lambda text, verbose: {"input_ids": ids}, model_dir, "unused",
                             chunk_size=64, max_tokens=None, dataset="random ids")  # fmt: skip
    assert stats.chunks == 5 and stats.tokens_used == 300
    assert {n: (p.dtype, p.data_ptr()) for n, p in model.named_parameters()} == before
    assert not any("forward" in vars(m) for m in model.modules())

    expected = _float32_hooked_sums(model_dir, chunks)
    names = gguf_names(model, model_dir)
    assert set(names) == set(expected)
    for module_name, gguf_name in names.items():
        entry = imatrix.entries[gguf_name]
        assert float(entry.counts[0]) == 300, gguf_name
        np.testing.assert_allclose(entry.sums[0], expected[module_name].numpy(), rtol=1e-6, err_msg=gguf_name)


# ----------------------------------------------------------------------------- quantize --imatrix


@pytest.fixture(scope="module")
def tiny_f16(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lora2gguf.convert.convert import convert

    out = tmp_path_factory.mktemp("tiny-gguf") / "model.gguf"
    convert(tiny_base, out, "f16", progress=False)
    return out


def _quantize(src: Path, dst: Path, ftype: str, **kw: Any) -> dict[str, Any]:
    from lora2gguf.quantize.quantize import QuantizeOptions, quantize_gguf

    return quantize_gguf(src, dst, QuantizeOptions(ftype, threads=2, **kw))


@needs_llama
@pytest.mark.parametrize("ftype", SUPPORTED)
def test_imatrix_quantization_byte_identical_to_llama_model_quantize(
    ftype: str, tiny_f16: Path, tiny_imatrix: Path, tmp_path: Path
) -> None:
    ours, ref = tmp_path / "ours.gguf", tmp_path / "llama.gguf"
    report = _quantize(tiny_f16, ours, ftype, imatrix=str(tiny_imatrix))
    llama_quantize_file(tiny_f16, ref, ftype, threads=2, imatrix=tiny_imatrix)
    assert ours.read_bytes() == ref.read_bytes(), f"{ftype}: differs from llama_model_quantize with the imatrix"
    assert report["imatrix"]["tensors_matched"] > 0 and report["imatrix"]["sha256"]
    # Q8_0 has no weighted path (same bytes as without the imatrix); the IQ2 types and IQ3_XXS have no plain one
    if ftype != "Q8_0" and ftype not in NEEDS_IMATRIX:
        plain = tmp_path / "plain.gguf"
        _quantize(tiny_f16, plain, ftype)
        assert plain.read_bytes() != ours.read_bytes()


def test_imatrix_recipe_guards_first_ffn_down_layers_for_q4_0() -> None:
    from lora2gguf.quantize.recipe import ModelInfo, TensorSpec, plan_types

    specs = [TensorSpec(f"blk.{i}.ffn_down.weight", [256, 64], "F16") for i in range(16)]
    model = ModelInfo(arch="qwen2", n_layer=16, n_expert=0)
    plain = plan_types(specs, model, "Q4_0")
    weighted = plan_types(specs, model, "Q4_0", has_imatrix=True)
    assert {c.dst_type for c in plain.choices} == {"Q4_0"}
    # llama.cpp: with an imatrix, ffn_down of layers < n_layer/8 becomes Q4_1 (Q5_1 for Q5_0)
    assert [c.dst_type for c in weighted.choices] == ["Q4_1", "Q4_1"] + ["Q4_0"] * 14


def test_imatrix_of_another_model_is_refused_before_writing(tiny_f16: Path, tmp_path: Path) -> None:
    wrong = _sample_imatrix()
    wrong.entries["blk.0.attn_q.weight"] = ImatrixEntry(np.ones((1, 96), np.float32), np.array([4.0], np.float32))
    write_imatrix(tmp_path / "wrong.gguf", wrong)
    out = tmp_path / "out.gguf"
    with pytest.raises(Lora2ggufError, match=r"wrong\.gguf: imatrix entry blk\.0\.attn_q\.weight has 96 values"):
        _quantize(tiny_f16, out, "Q4_K_M", imatrix=str(tmp_path / "wrong.gguf"))
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_cli_quantize_with_model_file_as_imatrix_fails_cleanly(tiny_f16: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "lora2gguf"), "quantize", str(tiny_f16), str(out), "Q4_K_M", "--imatrix", str(tiny_f16)],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2
    assert f"{tiny_f16}: general.type is" in proc.stderr and "expected 'imatrix'" in proc.stderr
    assert not out.exists()


def test_tags_round_trip() -> None:
    assert quant_file_tag("Q4_K_M", imatrix=True) == "q4_km-imat"
    assert split_quant_tag("q4_km-imat") == ("Q4_K_M", True)
    assert split_quant_tag("q8_0") == ("Q8_0", False)


# ----------------------------------------------------------------------------- llama.cpp's tools


@needs_llama_tools
def test_llama_cpp_tools_read_our_imatrix_and_agree(
    tiny_f16: Path, tiny_imatrix: Path, tiny_base: Path, tmp_path: Path
) -> None:
    """llama-quantize --imatrix OUR_FILE writes our bytes; llama-imatrix's own matrix matches ours."""
    from lora2gguf.demo.dataset import render_text

    bin_dir = Path(LLAMA_BIN)  # type: ignore[arg-type]
    for ftype in ("Q4_K_M", "Q4_0"):
        tool_out, ours = tmp_path / f"tool-{ftype}.gguf", tmp_path / f"ours-{ftype}.gguf"
        subprocess.run(
            [str(bin_dir / "llama-quantize"), "--imatrix", str(tiny_imatrix), str(tiny_f16), str(tool_out), ftype, "2"],
            check=True, capture_output=True,
        )
        _quantize(tiny_f16, ours, ftype, imatrix=str(tiny_imatrix))
        assert tool_out.read_bytes() == ours.read_bytes(), ftype
    text = tmp_path / "train.txt"
    text.write_text(render_text("train"), encoding="utf-8")
    # the same 5 full chunks of 128 tokens for both (llama-imatrix uses whole chunks only)
    ours_imatrix, theirs = tmp_path / "ours-imatrix.gguf", tmp_path / "llama-imatrix.gguf"
    from lora2gguf.cli import main

    assert main(["imatrix", "--model", str(tiny_base), "--text", str(text), "--out", str(ours_imatrix),
                 "--chunk-size", "128", "--max-tokens", "640", "--device", "cpu"]) == 0
    subprocess.run(
        [str(bin_dir / "llama-imatrix"), "-m", str(tiny_f16), "-f", str(text), "-o", str(theirs),
         "-c", "128", "--chunks", "5", "--no-ppl", "-t", "2"],
        check=True, capture_output=True,
    )
    a, b = read_imatrix(ours_imatrix), read_imatrix(theirs)
    assert set(a.entries) == set(b.entries)
    for name in a.entries:
        assert float(a.entries[name].counts[0]) == float(b.entries[name].counts[0]) == 640, name
        x, y = a.entries[name].importance(), b.entries[name].importance()
        # ours runs the float32 model, llama.cpp the F16 GGUF: equal up to that rounding
        assert float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)) > 0.999, name


# ----------------------------------------------------------------------------- workflow


@pytest.mark.slow
def test_workflow_builds_compares_and_reruns_the_imatrix_variant(
    tmp_path: Path, tiny_base: Path, tiny_runs: dict[str, Path]
) -> None:
    import json

    from conftest import run_snakemake, tiny_config, write_config
    from test_workflow import planned_jobs

    config = tiny_config(tiny_base, tiny_runs, tmp_path)
    config["quantize"]["types"] = ["Q4_K_M", {"type": "Q4_K_M", "imatrix": True}]
    write_config(tmp_path, config)
    result = run_snakemake(tmp_path, "--cores", "2", "all")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    best = json.loads((tmp_path / "results/model_analysis.json").read_text())["best"]
    gguf_dir = tmp_path / f"models/{best}-merged-gguf"
    assert read_imatrix(gguf_dir / "imatrix.gguf").chunk_count == 2  # 256 tokens in chunks of 128
    compare = json.loads((tmp_path / f"results/{best}/compare_models.json").read_text())
    by_label = {m["label"]: m for m in compare["models"]}
    assert {"F16", "Q4_K_M", "Q4_K_M imatrix"} <= set(by_label)
    imat = by_label["Q4_K_M imatrix"]
    assert imat["file"].endswith("model-q4_km-imat.gguf")
    assert imat["imatrix"]["entries_count"] > 0 and imat["sidecar"]["imatrix"]["tensors_weighted"] > 0
    assert by_label["Q4_K_M"]["quantized_with_imatrix"] is False and "imatrix" not in by_label["Q4_K_M"]
    assert imat["quantized_with_imatrix"] is True
    manifest = json.loads((tmp_path / f"results/{best}/manifest.json").read_text())
    rules = {Path(o["path"]).name: o.get("rule") for o in manifest["outputs"]}
    assert rules["imatrix.gguf"] == "compute_imatrix" and rules["model-q4_km-imat.gguf"] == "quantize_gguf"

    assert planned_jobs(run_snakemake(tmp_path, "-n", "all").stdout) == {}
    changed = json.loads(json.dumps(config))
    changed["calibration"]["max_tokens"] = 128
    write_config(tmp_path, changed)
    jobs = planned_jobs(run_snakemake(tmp_path, "-n", "all").stdout)
    # the calibration reaches only the imatrix, its quantization and what reads every quant file
    assert jobs == {"compute_imatrix": 1, "quantize_gguf": 1, "compare_models": 1, "plot_comparison": 1,
                    "write_manifest": 1, "all": 1}

    changed["calibration"]["text"] = config["evaluation"]["text"]
    write_config(tmp_path, changed)
    refused = run_snakemake(tmp_path, "-n", "all")
    assert refused.returncode != 0
    assert "calibration.text: is evaluation.text" in refused.stdout + refused.stderr
