"""QLoRA runs: bitsandbytes' 4-bit quantization in torch (lora2gguf.qlora), how a run says it was trained,
and the merge into the base the adapter was trained against (merge.qlora_target).

The QLoRA run here is trained by lora2gguf.demo.train on the tiny Qwen2 with every layer bitsandbytes
quantizes replaced by its NF4 round trip: what QLoRA's forward pass multiplies by (activations stay
float32 on the CPU). bitsandbytes itself is optional (extra ``qlora``); the tests that compare with
it are skipped without it. benchmarks/bnb_parity.py compares with its CUDA kernels on a GPU.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import refused, run_snakemake, tiny_config, write_config
from lora2gguf import qlora
from lora2gguf.demo.train import train_lora
from lora2gguf.errors import Lora2ggufError
from lora2gguf.merge.merge import MergeOptions, merge_adapter
from lora2gguf.merge.verify import TOLERANCES

try:
    import bitsandbytes.functional as bnbf
except ImportError:  # the optional extra `qlora`
    bnbf = None

needs_bnb = pytest.mark.skipif(bnbf is None, reason="bitsandbytes is not installed (pip install -e '.[qlora]')")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def weights(shape: tuple[int, int] = (256, 320), seed: int = 0, heavy: bool = False):
    import torch

    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.02
    return w * torch.exp(torch.randn(shape, generator=gen)) if heavy else w


# --- the code books -------------------------------------------------------------------------------------


def test_code_books_have_their_defining_properties() -> None:
    import torch

    nf4 = qlora.nf4_levels()
    assert nf4.dtype == torch.float32 and nf4.numel() == 16
    assert torch.all(nf4[1:] > nf4[:-1]) and nf4[0] == -1 and nf4[-1] == 1 and nf4[7] == 0
    # Equal probability mass: each positive level is a normal quantile, scaled by the largest one.
    top = torch.special.ndtri(torch.tensor(0.9677083).double())
    cdf = torch.special.ndtr(nf4[8:].double() * top)
    steps = torch.diff(torch.cat([torch.tensor([0.5], dtype=torch.float64), cdf]))
    assert torch.allclose(steps, steps[0], rtol=1e-5)
    pivots = qlora.nf4_pivots()
    assert torch.all((nf4[:-1] < pivots) & (pivots < nf4[1:]))
    fp4 = qlora.fp4_levels()
    assert sorted(set((fp4[:8] * 12).tolist())) == [0.0, 0.0625, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]
    assert torch.equal(fp4[8:], -fp4[:8])
    fp4_pivots, order = qlora.fp4_pivots()
    magnitudes = fp4[:8][order.long()]
    assert torch.all((magnitudes[:-1] < fp4_pivots) & (fp4_pivots < magnitudes[1:]))
    dyn = qlora.dynamic_map()
    assert dyn.numel() == 256 and torch.all(dyn[1:] >= dyn[:-1]) and dyn.max() == 1 and dyn.min() > -1


@needs_bnb
def test_code_books_equal_bitsandbytes() -> None:
    import torch

    assert torch.equal(qlora.nf4_levels(), bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(qlora.fp4_levels(), bnbf.get_4bit_type("fp4", device="cpu"))  # +0.0 == -0.0
    assert torch.equal(qlora.dynamic_map(), bnbf.create_dynamic_map())


# --- quantize / dequantize ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", qlora.QUANT_KINDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_round_trip_stays_within_half_a_level_step(kind: str, dtype: str) -> None:
    """Without double quantization every value comes back as a level times its block's absmax, the
    nearest one up to the kernel's pivots: within half the widest level gap of the block's absmax."""
    import torch

    w = weights(heavy=True).to(getattr(torch, dtype))
    quant = qlora.quantize_4bit(w, kind, double_quant=False)
    back = qlora.dequantize_4bit(quant)
    assert back.dtype == w.dtype and back.shape == w.shape
    levels = (qlora.nf4_levels() if kind == "nf4" else qlora.fp4_levels()[:8]).sort().values
    gap = float(torch.diff(levels).max()) if kind == "nf4" else float(torch.diff(torch.cat([-levels.flip(0), levels])).max())
    absmax = w.float().reshape(-1, 64).abs().amax(dim=1, keepdim=True)
    error = (back.float() - w.float()).reshape(-1, 64).abs()
    rounding = back.float().reshape(-1, 64).abs() * float(torch.finfo(w.dtype).eps)
    assert torch.all(error <= absmax * gap / 2 * (1 + 1e-6) + rounding)
    assert torch.equal(quant.absmax, absmax.squeeze(1))


def test_double_quantization_keeps_the_absmax_close() -> None:
    import torch

    w = weights((1536, 256), heavy=True)
    plain = qlora.quantize_4bit(w, "nf4", double_quant=False)
    nested = qlora.quantize_4bit(w, "nf4", double_quant=True)
    assert nested.absmax.dtype == torch.uint8 and nested.absmax2.numel() == math.ceil(plain.absmax.numel() / 256)
    recovered = qlora.dequantize_blockwise_8bit(nested.absmax, nested.absmax2) + nested.offset
    centred = (plain.absmax - plain.absmax.mean()).reshape(-1)
    spread = torch.nn.functional.pad(centred, (0, -centred.numel() % 256)).reshape(-1, 256).abs().amax(dim=1)
    widest = float(torch.diff(qlora.dynamic_map()).max())
    bound = spread.repeat_interleave(256)[: centred.numel()] * widest / 2 * (1 + 1e-5) + 1e-7
    assert torch.all((recovered - plain.absmax).abs() <= bound)
    assert torch.equal(nested.packed, plain.packed)  # the 4-bit codes use the exact absmax


def test_all_zero_block_and_partial_block() -> None:
    """An all-zero block gives NaN after scaling (0 * 1/0) and code 0 (level -1), as in the kernel: it
    comes back as zeros with a plain absmax, and as -1 times the recovered absmax (not exactly 0) with
    double quantization. A length that is no multiple of 64 keeps its last, shorter block."""
    import torch

    w = weights((3, 1000))
    w[0, :64] = 0
    plain = qlora.quantize_4bit(w, "nf4", double_quant=False)
    nested = qlora.quantize_4bit(w, "nf4", double_quant=True)
    for quant in (plain, nested):
        assert torch.all(quant.packed[:32] == 0) and quant.packed.numel() == 1500
    assert torch.all(qlora.dequantize_4bit(plain)[0, :64] == 0)
    recovered = qlora.dequantize_blockwise_8bit(nested.absmax, nested.absmax2) + nested.offset
    back = qlora.dequantize_4bit(nested)
    assert back.shape == (3, 1000) and torch.all(back[0, :64] == -recovered[0])
    assert 0 < abs(float(recovered[0])) < 1e-3


@needs_bnb
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_nf4_equals_bitsandbytes_cpu(dtype: str) -> None:
    import torch

    w = weights((1536, 256), heavy=True).to(getattr(torch, dtype))
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    ours = qlora.quantize_4bit(w, "nf4", double_quant=False)
    assert torch.equal(ours.packed, packed.reshape(-1)) and torch.equal(ours.absmax, state.absmax)
    assert torch.equal(qlora.dequantize_4bit(ours), bnbf.dequantize_4bit(packed, state))


@needs_bnb
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fp4_differs_from_bitsandbytes_cpu_only_at_the_kernel_pivots(dtype: str) -> None:
    """bitsandbytes' CPU quantizer uses exact float32 midpoints and breaks ties towards minus infinity;
    its CUDA kernel (and lora2gguf.qlora) compares |x| with the pivots as written in dQuantizeFP4."""
    import torch

    w = weights((1536, 256), heavy=True).to(getattr(torch, dtype))
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="fp4")
    theirs = bnbf.dequantize_4bit(packed, state).reshape(-1)
    ours = qlora.dequantize_4bit(qlora.quantize_4bit(w, "fp4", double_quant=False)).reshape(-1)
    differ = ours != theirs
    scaled, _ = qlora._scaled(w.reshape(-1), 64, None)
    kernel, _ = qlora.fp4_pivots()
    distance = (scaled[differ].abs().unsqueeze(1) - kernel).abs().amin(dim=1)
    assert bool(torch.all(distance <= 5e-7)), distance.max()
    assert differ.float().mean() < 1e-3


@needs_bnb
def test_double_quantized_state_of_bitsandbytes_dequantizes_identically() -> None:
    """Given bitsandbytes' own quantized state, the dequantization is bit for bit bitsandbytes'; the 8-bit
    absmax codes themselves may differ by one step (its CPU quantizer looks them up in a 65536-bin table)."""
    import torch

    for kind in qlora.QUANT_KINDS:
        w = weights((1536, 256), seed=1, heavy=True).to(torch.bfloat16)
        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=kind)
        again = qlora.Quant4bit(packed.reshape(-1), state.absmax, tuple(w.shape), w.dtype, kind,
                                absmax2=state.state2.absmax, offset=state.offset)  # fmt: skip
        assert torch.equal(qlora.dequantize_4bit(again), bnbf.dequantize_4bit(packed, state))
        ours = qlora.quantize_4bit(w, kind, double_quant=True)
        assert torch.equal(ours.absmax2, state.state2.absmax) and torch.equal(ours.offset, state.offset)
        assert int((ours.absmax.long() - state.absmax.long()).abs().max()) <= 1


# --- how the run was trained ----------------------------------------------------------------------------


def write_args(run: Path, **values) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / qlora.TRAINING_ARGS).write_text(yaml.safe_dump(values), encoding="utf-8")
    return run


# The model card as peft (up to about 0.9) wrote it for a 4-bit run: create_or_update_model_card.
OLD_PEFT_CARD = """---
library_name: peft
---
## Training procedure


The following `bitsandbytes` quantization config was used during training:
- quant_method: bitsandbytes
- load_in_8bit: False
- load_in_4bit: True
- llm_int8_threshold: 6.0
- bnb_4bit_quant_type: fp4
- bnb_4bit_use_double_quant: False
- bnb_4bit_compute_dtype: float16

### Framework versions


- PEFT 0.6.2
"""


def test_trained_on_from_training_args_model_card_and_config(tmp_path: Path) -> None:
    run = write_args(tmp_path / "a", quantization_bit=4, quantization_method="bnb", double_quantization=True, bf16=True)
    found = qlora.read_trained_on(run, None, None, "cfg")
    assert (found.kind, found.double_quant, found.compute_dtype, found.blocksize) == ("nf4", True, "bfloat16", 64)
    assert found.source.startswith("training_args.yaml")
    assert qlora.read_trained_on(run, "float", None, "cfg").kind == "float"  # the config wins
    override = qlora.read_trained_on(run, "fp4", None, "cfg")
    assert (override.kind, override.compute_dtype) == ("fp4", "bfloat16") and "cfg" in override.source
    assert qlora.read_trained_on(write_args(tmp_path / "b", quantization_bit=8), None, None, "c").kind == "int8"
    assert qlora.read_trained_on(write_args(tmp_path / "c", lora_rank=8), None, None, "c").kind == "float"
    card = tmp_path / "d"
    card.mkdir()
    (card / qlora.MODEL_CARD).write_text(OLD_PEFT_CARD, encoding="utf-8")
    found = qlora.read_trained_on(card, None, None, "cfg")
    assert (found.kind, found.double_quant, found.compute_dtype) == ("fp4", False, "float16")
    nothing = qlora.read_trained_on(tmp_path / "e", None, None, "cfg")
    assert nothing.kind == "float" and "not recorded" in nothing.source


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"quantization_bit": 3}, "quantization_bit"),
        ({"quantization_bit": 4, "quantization_type": "nf3"}, "quantization_type"),
        ({"quantization_bit": 4, "quantization_method": "hqq"}, "quantization_method"),
        ({"quantization_bit": 4, "double_quantization": "maybe"}, "double_quantization"),
    ],
)
def test_bad_training_args_name_file_and_key(tmp_path: Path, values: dict, key: str) -> None:
    run = write_args(tmp_path / "run", **values)
    with pytest.raises(Lora2ggufError, match=rf"training_args.yaml: key '{key}'"):
        qlora.read_trained_on(run, None, None, "cfg")


def test_bad_model_card_and_override_name_file_and_key(tmp_path: Path) -> None:
    (tmp_path / qlora.MODEL_CARD).write_text(OLD_PEFT_CARD.replace("quant_type: fp4", "quant_type: int3"))
    with pytest.raises(Lora2ggufError, match=r"README.md: key 'bnb_4bit_quant_type'"):
        qlora.read_trained_on(tmp_path, None, None, "cfg")
    with pytest.raises(Lora2ggufError, match=r"candidates.x.trained_on: trained_on is 'nf3'"):
        qlora.read_trained_on(tmp_path, "nf3", None, "candidates.x.trained_on")


# --- the merge ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    """A real (short) LoRA training on the tiny base as bitsandbytes NF4 quantizes it (double
    quantization, bfloat16 compute): LLaMA-Factory's QLoRA defaults."""
    root = tmp_path_factory.mktemp("qlora-runs")
    return train_lora(tiny_base, root / "tiny-qlora", r=8, alpha=16, lr=5e-3, steps=6, seed=0, quantization="nf4")


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lora2gguf.demo.dataset import render_text

    path = tmp_path_factory.mktemp("qlora-text") / "eval.txt"
    path.write_text(render_text("eval"), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def auto_merge(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, qlora_run: Path, eval_file: Path):
    root = tmp_path_factory.mktemp("qlora-merged")
    options = MergeOptions(tiny_base, qlora_run, root / "tiny-qlora-merged", report=root / "merge_report.json",
                           eval_text=eval_file, device="cpu")  # fmt: skip
    return options.out, merge_adapter(options)


def test_auto_merge_keeps_the_target_closer_to_the_trained_model(auto_merge, tiny_base: Path) -> None:
    import torch
    from safetensors.torch import load_file

    out, report = auto_merge
    assert report["trained_on"]["kind"] == "nf4" and report["trained_on"]["source"].startswith("training_args.yaml")
    q = report["qlora"]
    measured = q["targets_vs_trained_reference"]
    assert set(measured) == {"float", "dequantized"} and q["target"] == "dequantized"
    assert measured["dequantized"]["mean_kl"] < TOLERANCES["float32"].mean_kl
    assert measured["float"]["mean_kl"] > 100 * max(measured["dequantized"]["mean_kl"], 1e-9)
    assert measured["float"]["top1_agreement"] < 1.0
    assert q["written_vs_trained_reference"]["mean_kl"] < TOLERANCES["float32"].mean_kl
    assert report["verification"]["passed"] and "as trained" in report["verification"]["compared"]
    errors = q["quantization_vs_lora_update"]
    assert errors["quantized_layers"] == 2 * 7 and errors["dequantized_exact_in_merge_dtype"]
    assert 0 < errors["relative_quantization_error"] < 0.2 and errors["error_to_delta"] > 0
    # Embeddings, norms and biases stay the float base's (bitsandbytes keeps them in float); every
    # linear weight moved off its float value.
    base, merged = load_file(tiny_base / "model.safetensors"), load_file(out / "model.safetensors")
    for name, tensor in merged.items():
        if "norm" in name or "embed" in name or name.endswith(".bias"):
            assert torch.equal(tensor, base[name]), name
        else:
            assert not torch.equal(tensor, base[name]), name


def test_explicit_targets_and_float_runs_merge_as_before(
    tmp_path: Path, tiny_base: Path, qlora_run: Path, eval_file: Path, auto_merge
) -> None:
    """dequantized gives the bytes auto chose; float gives the bytes of a plain float merge, which are
    the bytes peft's own merge_and_unload + save_pretrained write (the merge of a float run, unchanged)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, report = auto_merge
    deq = merge_adapter(MergeOptions(tiny_base, qlora_run, tmp_path / "deq", eval_text=eval_file,
                                     qlora_target="dequantized"))  # fmt: skip
    assert deq["output"]["sha256"] == report["output"]["sha256"]
    assert set(deq["qlora"]["targets_vs_trained_reference"]) == {"dequantized"}
    flt = merge_adapter(MergeOptions(tiny_base, qlora_run, tmp_path / "flt", eval_text=eval_file, qlora_target="float"))
    assert flt["qlora"]["target"] == "float" and flt["qlora"]["written_vs_trained_reference"]["mean_kl"] > 1e-5
    plain = merge_adapter(MergeOptions(tiny_base, qlora_run, tmp_path / "plain", eval_text=eval_file, trained_on="float"))
    assert plain["qlora"] is None and plain["trained_on"]["kind"] == "float"
    assert plain["output"]["sha256"]["model.safetensors"] == flt["output"]["sha256"]["model.safetensors"]
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32, local_files_only=True)
    PeftModel.from_pretrained(model, qlora_run).merge_and_unload(safe_merge=True).save_pretrained(tmp_path / "peft")
    assert (tmp_path / "peft" / "model.safetensors").read_bytes() == (tmp_path / "plain" / "model.safetensors").read_bytes()


@pytest.fixture
def int8_run(tmp_path: Path, qlora_run: Path) -> Path:
    run = shutil.copytree(qlora_run, tmp_path / "int8-run")
    write_args(run, quantization_bit=8, quantization_method="bnb", bf16=True)
    return run


def test_int8_run_without_bitsandbytes_is_refused_unless_float(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_base: Path, int8_run: Path
) -> None:
    """Without bitsandbytes an LLM.int8 run has no trained reference: refused (naming the run folder and
    the ways out) unless merge.qlora_target is float, which merges as a float run."""
    monkeypatch.setattr("lora2gguf.merge.merge._has_bitsandbytes", lambda: False)
    out = tmp_path / "out"
    message = refused(capsys, tmp_path, "merge", "--base", tiny_base, "--adapter", int8_run, "--out", out)
    assert str(int8_run) in message and "8-bit (LLM.int8)" in message and "qlora_target: float" in message
    report = merge_adapter(MergeOptions(tiny_base, int8_run, out, qlora_target="float"))
    assert report["trained_on"]["kind"] == "int8" and report["qlora"] is None
    assert any("bitsandbytes is not installed" in warning for warning in report["warnings"])


@needs_bnb
def test_int8_run_measured_against_bitsandbytes(tmp_path: Path, tiny_base: Path, int8_run: Path, eval_file: Path) -> None:
    """An LLM.int8 run's trained model is bitsandbytes' 8-bit forward pass (activations quantized too):
    both targets are measured against it, neither exactly."""
    run = int8_run
    report = merge_adapter(MergeOptions(tiny_base, run, tmp_path / "out", eval_text=eval_file, device="cpu",
                                        verify_sequences=2, verify_seq_len=32))  # fmt: skip
    q = report["qlora"]
    assert report["trained_on"]["compute_dtype"] == "bfloat16" and "LLM.int8" in q["trained_reference"]
    kl = {name: m["mean_kl"] for name, m in q["targets_vs_trained_reference"].items()}
    assert set(kl) == {"float", "dequantized"} and q["target"] == min(kl, key=kl.get)
    assert all(value > 0 for value in kl.values())  # neither target quantizes activations
    assert q["quantization_vs_lora_update"]["relative_quantization_error"] < 0.02  # 8 bits per row


def test_rank_records_trained_on_and_refuses_a_bad_one(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_base: Path, qlora_run: Path, tiny_run: Path
) -> None:
    from conftest import run_cli

    out = tmp_path / "analysis.json"
    status, log = run_cli(capsys, "rank", "--candidate", "q", qlora_run, tiny_base, "--candidate", "f", tiny_run,
                          tiny_base, "--trained-on", "f", "float", "--out", out)  # fmt: skip
    assert status == 0, log
    analysis = json.loads(out.read_text())
    assert analysis["candidates"]["q"]["trained_on"]["kind"] == "nf4"
    assert "training_args.yaml" in analysis["candidates"]["q"]["input_sha256"]
    assert analysis["candidates"]["f"]["trained_on"]["source"] == "candidates.f.trained_on"
    message = refused(capsys, tmp_path, "rank", "--candidate", "q", qlora_run, tiny_base, "--trained-on", "q", "nf5",
                      "--out", tmp_path / "bad.json")  # fmt: skip
    assert "candidates.q.trained_on: trained_on is 'nf5'" in message


# --- the workflow ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "value", "expected"),
    [
        ("candidate", "nf3", "'nf3' is not one of ['float', 'nf4', 'fp4', 'int8']"),
        ("merge", "closest", "'closest' is not one of ['auto', 'float', 'dequantized']"),
    ],
)
def test_bad_config_values_are_refused_naming_the_key(
    tmp_path: Path, tiny_base: Path, tiny_run: Path, where: str, value: str, expected: str
) -> None:
    config = tiny_config(tiny_base, {"mine": tiny_run}, tmp_path)
    if where == "candidate":
        config["candidates"]["mine"]["trained_on"] = value
    else:
        config["merge"]["qlora_target"] = value
    write_config(tmp_path, config)
    result = run_snakemake(tmp_path, "-n", timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and expected in output, output[-3000:]
    assert ("trained_on" if where == "candidate" else "qlora_target") in output
    assert not (tmp_path / "results").exists()


def test_config_trained_on_reaches_rank_and_merge(tmp_path: Path, tiny_base: Path, tiny_run: Path) -> None:
    config = tiny_config(tiny_base, {"mine": tiny_run}, tmp_path)
    config["candidates"]["mine"]["trained_on"] = "fp4"
    config["merge"]["qlora_target"] = "float"
    write_config(tmp_path, config)
    result = run_snakemake(tmp_path, "-n", "-p", "results/model_analysis.json", "models/mine-merged", timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "--trained-on mine fp4" in output and "--qlora-target float --trained-on fp4" in output


@pytest.mark.slow
def test_workflow_rank_to_compare_on_a_qlora_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, qlora_run: Path
) -> None:
    """rank -> merge (auto) -> convert -> quantize -> compare for the QLoRA run, its trained_on read from
    the run folder; the merge report holds both targets' KL against the trained reference and the choice."""
    workdir = tmp_path_factory.mktemp("qlora-workflow")
    config = tiny_config(tiny_base, {"tiny-qlora": qlora_run}, workdir)
    config["quantize"]["types"] = ["Q8_0"]
    write_config(workdir, config)
    targets = ["results/model_analysis.json", "results/tiny-qlora/compare_models.json"]
    result = run_snakemake(workdir, "--cores", "2", *targets)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    analysis = json.loads((workdir / targets[0]).read_text())
    assert analysis["candidates"]["tiny-qlora"]["trained_on"]["kind"] == "nf4"
    report = json.loads((workdir / "results/tiny-qlora/merge_report.json").read_text())
    q = report["qlora"]
    assert q["target_requested"] == "auto" and q["target"] == "dequantized"
    assert q["targets_vs_trained_reference"]["float"]["mean_kl"] > q["targets_vs_trained_reference"]["dequantized"]["mean_kl"]
    compare = json.loads((workdir / targets[1]).read_text())
    # The comparison scored the GGUFs of the chosen merge against that merged model.
    sha = report["output"]["sha256"]["model.safetensors"]
    assert compare["reference"]["sha256"]["model.safetensors"] == sha
    assert [m["label"] for m in compare["models"]] == ["F16", "Q8_0"]
