"""lora2gguf adapter: the run's LoRA as a llama.cpp LoRA GGUF.

- Byte parity with llama.cpp's convert_lora_to_gguf.py (llama-cpp-python 0.3.36 sdist, the same
  cache as tests/test_convert.py) for a plain LoRA: a real (short) training on the tiny Qwen2, and a
  random peft LoRA on a tiny Llama (q/k permutation of lora_b, an untied lm_head, a LoRA on the token
  embedding: transposed lora_a).
- rsLoRA and rank_pattern/alpha_pattern adapters (peft, on the tiny Qwen2): llama.cpp (base F32 GGUF
  + our adapter) gives PyTorch+peft's logits; the reference converter's adapter does not.
- Refusals (DoRA, modules_to_save, LoRA on a tied embedding, trained biases, pickle) name the module
  and leave nothing behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import refused, run_cli
from lora2gguf.adapter.export import AdapterOptions, export_adapter
from lora2gguf.convert.convert import convert
from lora2gguf.demo.dataset import render_text

PY = sys.executable
SDIST_VERSION = "0.3.36"
SDIST_CACHE = Path(os.environ.get("LORA2GGUF_SDIST_CACHE", Path.home() / ".cache" / "lora2gguf" / "sdist"))
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_EVAL = 64


# ---------------------------------------------------------------------------------------------
# Adapters and bases
# ---------------------------------------------------------------------------------------------


def make_peft_adapter(base: Path, out: Path, seed: int = 1, b_scale: float = 0.2, safe: bool = True,
                      **config: Any) -> Path:
    """A peft LoRA on ``base`` with random A and (scaled) B, saved with save_pretrained (no training)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    config.setdefault("target_modules", ALL_LINEAR)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.mul_(b_scale)
    peft_model.save_pretrained(out, safe_serialization=safe)
    return out


def build_tiny_llama_base(out: Path) -> Path:
    """A random untied LlamaForCausalLM with GQA (config + weights only: adapters need no tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    llama = build_tiny_llama_base(root / "tiny-llama")
    return {
        "llama_base": llama,
        # plain LoRA on the llama: every linear layer, the untied head and the token embedding
        "llama": make_peft_adapter(llama, root / "llama-lora", r=8, lora_alpha=16,
                                   target_modules=[*ALL_LINEAR, "lm_head", "embed_tokens"]),
        "rslora": make_peft_adapter(tiny_base, root / "rslora", r=16, lora_alpha=8, use_rslora=True),
        "pattern": make_peft_adapter(
            tiny_base, root / "pattern", r=4, lora_alpha=8, rank_pattern={"q_proj": 8, "down_proj": 2},
            alpha_pattern={"v_proj": 32, "layers.1.mlp.up_proj": 2},
        ),
    }


# ---------------------------------------------------------------------------------------------
# The reference converter
# ---------------------------------------------------------------------------------------------

REFERENCE_RUNNER = textwrap.dedent("""
    import json, os, runpy, sys
    llama_dir = sys.argv[1]
    sys.path.insert(0, os.path.join(llama_dir, "gguf-py"))
    sys.path.insert(0, llama_dir)
    for job in json.loads(sys.argv[2]):
        sys.argv = ["convert_lora_to_gguf.py", "--outtype", job["outtype"], "--outfile", job["out"],
                    "--base", job["base"], job["run"]]
        runpy.run_path(os.path.join(llama_dir, "convert_lora_to_gguf.py"), run_name="__main__")
""")


def _vendored_llama_cpp() -> Path | None:
    """convert_lora_to_gguf.py with the conversion package and gguf-py, from the cached sdist."""
    llama_dir = SDIST_CACHE / f"llama_cpp_python-{SDIST_VERSION}" / "vendor" / "llama.cpp"
    wanted = ("convert_lora_to_gguf.py", "conversion", "gguf-py")
    if all((llama_dir / name).exists() for name in wanted):
        return llama_dir
    tarball = SDIST_CACHE / f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
    if not tarball.is_file():
        return None  # tests/test_convert.py downloads it; not repeated here
    prefix = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/"
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(tuple(prefix + name for name in wanted))]
        tar.extractall(SDIST_CACHE, members=members, filter="data")
    return llama_dir if all((llama_dir / name).exists() for name in wanted) else None


# (case, outtype): byte parity cases; rslora/pattern only for the KL comparison
PARITY_CASES = [("qwen", "f32"), ("qwen", "f16"), ("qwen", "bf16"), ("qwen", "q8_0"),
                ("llama", "f32"), ("llama", "f16"), ("llama", "q8_0")]
KL_CASES = ("rslora", "pattern")


def _case(key: str, adapters: dict[str, Path], tiny_run: Path, tiny_base: Path) -> tuple[Path, Path]:
    """(run folder, base folder) of a case."""
    if key == "qwen":
        return tiny_run, tiny_base
    if key == "llama":
        return adapters["llama"], adapters["llama_base"]
    return adapters[key], tiny_base


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, adapters: dict[str, Path], tiny_run: Path,
              tiny_base: Path) -> dict[tuple[str, str], Path]:
    llama_dir = _vendored_llama_cpp()
    if llama_dir is None:
        pytest.skip(f"llama-cpp-python {SDIST_VERSION} sdist not cached in {SDIST_CACHE} (run tests/test_convert.py)")
    root = tmp_path_factory.mktemp("reference")
    jobs, outs = [], {}
    for key, outtype in [*PARITY_CASES, *((k, "f32") for k in KL_CASES)]:
        run, base = _case(key, adapters, tiny_run, tiny_base)
        outs[key, outtype] = root / f"{key}-{outtype}.gguf"
        jobs.append({"outtype": outtype, "out": str(outs[key, outtype]), "base": str(base), "run": str(run)})
    res = subprocess.run([PY, "-c", REFERENCE_RUNNER, str(llama_dir), json.dumps(jobs)], capture_output=True,
                         text=True, check=False, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return outs


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory, adapters: dict[str, Path], tiny_run: Path, tiny_base: Path):
    root = tmp_path_factory.mktemp("ours")
    cache: dict[tuple[str, str], tuple[Path, dict[str, Any]]] = {}

    def get(key: str, outtype: str) -> tuple[Path, dict[str, Any]]:
        if (key, outtype) not in cache:
            run, base = _case(key, adapters, tiny_run, tiny_base)
            out = root / f"{key}-{outtype}.gguf"
            cache[key, outtype] = out, export_adapter(AdapterOptions(run, base, out, outtype))
        return cache[key, outtype]

    return get


def read_gguf(path: Path) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], str, bytes]]]:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = [(t.name, tuple(int(x) for x in t.shape), t.tensor_type.name, t.data.tobytes()) for t in reader.tensors]
    return fields, tensors


# ---------------------------------------------------------------------------------------------
# Byte parity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key,outtype", PARITY_CASES)
def test_same_bytes_as_convert_lora_to_gguf(reference, ours, key: str, outtype: str) -> None:
    path, body = ours(key, outtype)
    ref = reference[key, outtype]
    if path.read_bytes() != ref.read_bytes():  # say where, for the failure message
        (mine_f, mine_t), (ref_f, ref_t) = read_gguf(path), read_gguf(ref)
        assert [t[:3] for t in mine_t] == [t[:3] for t in ref_t]
        assert [t[0] for t, r in zip(mine_t, ref_t) if t[3] != r[3]] == []
        keys = set(mine_f) | set(ref_f)
        assert {k: (mine_f.get(k), ref_f.get(k)) for k in keys if mine_f.get(k) != ref_f.get(k)} == {}
        pytest.fail("files differ in layout only")
    fields, tensors = read_gguf(path)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert body["same_as_reference_converter"] and body["folded_modules"] == 0
    assert fields["adapter.lora.alpha"] == body["alpha_written"] == body["lora_alpha"]
    names = [t[0] for t in tensors]
    assert len(names) == 2 * body["n_pairs"] and all(n.endswith((".lora_a", ".lora_b")) for n in names)
    if key == "llama":  # the head, the embedding (lora_a transposed: [vocab, r] in numpy, ne = [r, vocab])
        shapes = {t[0]: t[1] for t in tensors}
        assert shapes["token_embd.weight.lora_a"] == (8, 320) and shapes["output.weight.lora_b"] == (8, 320)


# ---------------------------------------------------------------------------------------------
# rsLoRA and per-module patterns, in llama.cpp
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_ids(tiny_base: Path) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base, local_files_only=True)(render_text("eval"))["input_ids"][:N_EVAL]


@pytest.fixture(scope="module")
def base_f32(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    out = tmp_path_factory.mktemp("base") / "base-f32.gguf"
    convert(tiny_base, out, "f32", progress=False)
    return out


def _peft_logits(base: Path, run: Path, ids: list[int]) -> np.ndarray:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, local_files_only=True)
    model = PeftModel.from_pretrained(model, run).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def _llama_cpp_logits(base_gguf: Path, adapter: Path | None, ids: list[int]) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    # F32 KV cache: the comparison is about the adapter, not llama.cpp's default F16 cache.
    llm = llama_cpp.Llama(model_path=str(base_gguf), lora_path=None if adapter is None else str(adapter),
                          n_ctx=128, n_batch=128, n_threads=2, logits_all=True, type_k=0, type_v=0, verbose=False)
    llm.eval(ids)
    return np.asarray(llm.scores[: len(ids)], dtype=np.float64)


def kl_top1(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(got)
    return float((np.exp(lp) * (lp - lq)).sum(axis=-1).mean()), float((ref.argmax(-1) == got.argmax(-1)).mean())


@pytest.mark.parametrize("key", KL_CASES)
def test_llama_cpp_equals_peft_where_the_reference_does_not(
    key: str, adapters, reference, ours, base_f32: Path, tiny_base: Path, eval_ids: list[int]
) -> None:
    expected = _peft_logits(tiny_base, adapters[key], eval_ids)
    path, body = ours(key, "f32")
    kl, top1 = kl_top1(expected, _llama_cpp_logits(base_f32, path, eval_ids))
    kl16, top16 = kl_top1(expected, _llama_cpp_logits(base_f32, ours(key, "f16")[0], eval_ids))
    kl_ref, top_ref = kl_top1(expected, _llama_cpp_logits(base_f32, reference[key, "f32"], eval_ids))
    kl_base, _ = kl_top1(expected, _llama_cpp_logits(base_f32, None, eval_ids))
    print(f"{key}: ours F32 KL {kl:.2e} top1 {top1:.3f}; ours F16 KL {kl16:.2e} top1 {top16:.3f}; "
          f"reference F32 KL {kl_ref:.2e} top1 {top_ref:.3f}; base alone KL {kl_base:.2e}")
    assert kl < 1e-5 and top1 == 1.0
    assert kl16 < 1e-5 and top16 == 1.0
    assert kl_ref > 1e-3 and kl_ref > 1000 * kl  # the reference's scale is measurably wrong
    assert kl_base > 1e-3  # and the adapter matters
    modules = body["modules"]
    assert all(abs(m["llama_cpp_scale"] - m["peft_scaling"]) <= 1e-12 * abs(m["peft_scaling"]) for m in modules)
    if key == "rslora":  # alpha 8 * sqrt(16) and no tensor touched: same tensors as the reference
        assert body["alpha_written"] == 32.0 and body["folded_modules"] == 0 and body["corrected_modules"] == 14
        assert read_gguf(path)[1] == read_gguf(reference[key, "f32"])[1]
    else:  # v_proj (alpha 32, both layers) and layers.1 up_proj (alpha 2) folded into lora_b
        folded = sorted(m["module"] for m in modules if m["lora_b_factor"] != 1.0)
        assert folded == ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj",
                          "model.layers.1.self_attn.v_proj"]
        assert body["alpha_written"] == 8.0 and body["ranks"] == [2, 4, 8]


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------

REFUSALS = {
    # name: (peft config, text the message must hold)
    "dora": ({"use_dora": True, "target_modules": ["q_proj", "v_proj"]},
             "module 'model.layers.0.self_attn.q_proj' has a DoRA magnitude vector"),
    "modules_to_save": ({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
                        "lists module 'lm_head': a full trained copy"),
    "tied_embedding": ({"target_modules": ["embed_tokens", "q_proj"]},
                       "module 'model.embed_tokens' is LoRA-adapted but the base ties"),
    "tied_head": ({"target_modules": ["lm_head", "q_proj"]},
                  "module 'lm_head' is LoRA-adapted but the base ties"),
    "bias": ({"target_modules": ["q_proj"], "bias": "lora_only"},
             "module 'model.layers.0.self_attn.q_proj' has a trained bias"),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_refuses_what_llama_cpp_cannot_express(name: str, tmp_path: Path, tiny_base: Path, capsys) -> None:
    config, expected = REFUSALS[name]
    run = make_peft_adapter(tiny_base, tmp_path / "run", r=4, lora_alpha=8, **config)
    out = tmp_path / "out" / "adapter.gguf"
    report = tmp_path / "out" / "r.json"
    message = refused(capsys, tmp_path, "adapter", run, out, "--base", tiny_base, "--report", report)
    assert message.startswith(f"{run}/adapter_") and expected in message
    assert "a llama.cpp LoRA adapter cannot" in message and "merge instead" in message


def test_pickle_refused_unless_allowed(tmp_path: Path, tiny_base: Path, capsys) -> None:
    run = make_peft_adapter(tiny_base, tmp_path / "run", r=4, lora_alpha=8, safe=False)
    assert (run / "adapter_model.bin").is_file() and not (run / "adapter_model.safetensors").exists()
    out = tmp_path / "out" / "adapter.gguf"
    message = refused(capsys, tmp_path, "adapter", run, out, "--base", tiny_base)
    assert message.startswith(f"{run / 'adapter_model.bin'}: pickle adapter weights are refused")
    assert "--allow-pickle" in message
    status, log = run_cli(capsys, "adapter", run, out, "--base", tiny_base, "--allow-pickle", "--outtype", "f32")
    assert status == 0, log[-3000:]
    safe = make_peft_adapter(tiny_base, tmp_path / "safe", r=4, lora_alpha=8)
    same = tmp_path / "safe.gguf"
    export_adapter(AdapterOptions(safe, tiny_base, same, "f32"))
    # the same tensors (in the pickle's own order, as convert_lora_to_gguf.py reads it)
    assert sorted(read_gguf(out)[1]) == sorted(read_gguf(same)[1])


# ---------------------------------------------------------------------------------------------
# CLI and report
# ---------------------------------------------------------------------------------------------


def test_cli_writes_adapter_and_report(tmp_path: Path, tiny_run: Path, tiny_base: Path, ours, capsys) -> None:
    out, report = tmp_path / "a.gguf", tmp_path / "a.json"
    status, log = run_cli(capsys, "adapter", tiny_run, out, "--base", tiny_base, "--report", report)
    assert status == 0, log[-3000:]
    assert out.read_bytes() == ours("qwen", "f16")[0].read_bytes()
    body = json.loads(report.read_text(encoding="utf-8"))
    assert body["schema"] == "lora2gguf/adapter/1" and body["outtype"] == "f16"
    assert body["file_bytes"] == out.stat().st_size
    import hashlib

    assert body["output_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert body["ranks"] == [4] and body["n_pairs"] == 14 and body["alpha_written"] == 8.0
    assert set(body["input_sha256"]) == {"adapter_config.json", "adapter_model.safetensors", "base/config.json"}


def test_wrong_base_is_refused(tmp_path: Path, adapters, tiny_run: Path, capsys) -> None:
    out = tmp_path / "out" / "a.gguf"
    message = refused(capsys, tmp_path, "adapter", tiny_run, out, "--base", adapters["llama_base"])
    assert "module 'model." in message and "different base model" in message
