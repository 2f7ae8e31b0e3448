"""lora2gguf convert --backend auto | native | llama.cpp: llama.cpp's own converter for the architectures
lora2gguf has no table for, and the rest of the workflow on its file.

The architecture without a native converter is a tiny random OlmoForCausalLM (tests/olmo.py) with a
GPT-NeoX-style byte-level BPE tokenizer trained here, and a short real LoRA run on it, merged by
``lora2gguf merge``. Through ``auto`` it must come out as a GGUF that llama.cpp loads (HF fp32 vs GGUF
F32: mean KL < 1e-5, top-1 1.0; tokenization identical to Hugging Face), that ``lora2gguf quantize``
turns into files byte-identical to ``llama_model_quantize``'s, and the workflow (rank -> compare) must
run on it, in one Snakemake run with a Qwen3 candidate (a family converted natively, tests/families.py).
On the tiny Qwen2, ``--backend llama.cpp`` is a cross-check of the native converter.

Needs the llama-cpp-python sources (``make llama-tools`` downloads them): skipped without them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import ROOT, _root_logger_kept, refused, run_snakemake, tiny_config, write_config
from families import build_qwen3
from llama_oracle import llama_cpp_available, llama_quantize_file
from lora2gguf.artifacts import sha256_file
from lora2gguf.cli import main
from lora2gguf.convert import external
from lora2gguf.demo.train import train_lora
from lora2gguf.errors import Lora2ggufError
from lora2gguf.formats.gguf import read_gguf
from lora2gguf.layout import CHAT_PARITY, COMPARE_REPORT, MANIFEST, MODEL_ANALYSIS, TEST_REPORT
from lora2gguf.quantize.recipe import ModelInfo, TensorSpec, plan_types
from olmo import build_tiny_olmo
from test_convert import MIXED_TEXT, _kl_and_top1

needs_llama = pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed")


def _cli(*argv: str | os.PathLike[str]) -> None:
    with _root_logger_kept():
        assert main([str(a) for a in argv]) == 0, argv


@pytest.fixture(scope="session")
def converter() -> external.Converter:
    try:
        return external.find_converter()
    except Lora2ggufError as exc:
        pytest.skip(f"llama.cpp's converter is not available: {exc}")


@pytest.fixture(scope="session")
def olmo_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    return build_tiny_olmo(tmp_path_factory.mktemp("bases") / "tiny-olmo", seed=0)


@pytest.fixture(scope="session")
def olmo_run(tmp_path_factory: pytest.TempPathFactory, olmo_base: Path) -> Path:
    return train_lora(olmo_base, tmp_path_factory.mktemp("olmo-runs") / "olmo-a", r=4, alpha=8, lr=5e-3, steps=4, seed=0)


@pytest.fixture(scope="session")
def olmo_merged(tmp_path_factory: pytest.TempPathFactory, olmo_base: Path, olmo_run: Path) -> Path:
    out = tmp_path_factory.mktemp("olmo-merged") / "olmo-a-merged"
    _cli("merge", "--base", olmo_base, "--adapter", olmo_run, "--out", out, "--device", "cpu")
    return out


@pytest.fixture(scope="session")
def olmo_gguf(tmp_path_factory: pytest.TempPathFactory, converter: external.Converter, olmo_merged: Path) -> Any:
    """``lora2gguf convert`` (backend auto) of the merged OLMo, once per outtype: (gguf, report, log)."""
    root = tmp_path_factory.mktemp("olmo-gguf")
    done: dict[str, tuple[Path, dict[str, Any], str]] = {}

    def get(outtype: str) -> tuple[Path, dict[str, Any], str]:
        if outtype not in done:
            out, report, log = (root / f"{name}-{outtype}" for name in ("model.gguf", "convert.json", "convert.log"))
            _cli("--log-file", log, "convert", olmo_merged, out, "--outtype", outtype, "--no-progress", "--report", report,
                 "--base-model", "tiny-olmo", "--adapter", "olmo-a")  # fmt: skip
            done[outtype] = (out, json.loads(report.read_text()), log.read_text())
            assert not [p.name for p in root.iterdir() if p.name.startswith(".")], "temporary files left"
        return done[outtype]

    return get


# ---------------------------------------------------------------------------------------------
# backend choice, refusals, and what the converter's process may not do


def test_native_refuses_an_architecture_without_table(capsys: pytest.CaptureFixture[str], tmp_path: Path, olmo_base: Path) -> None:
    message = refused(capsys, [olmo_base, tmp_path], "convert", olmo_base, tmp_path / "x.gguf", "--backend", "native")
    assert "config.json" in message and "'OlmoForCausalLM' is not supported" in message
    assert "Qwen2ForCausalLM" in message and "LlamaForCausalLM" in message  # the supported list
    assert "--backend auto" in message


def test_pickle_weights_are_refused_before_the_converter_runs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, olmo_base: Path, converter: external.Converter
) -> None:
    src = tmp_path / "pickled"
    src.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(olmo_base / name, src / name)
    # Not even a real pickle: the refusal must come from the file name, before anything reads it.
    (src / "pytorch_model.bin").write_bytes(b"not read")
    message = refused(capsys, [src, tmp_path], "convert", src, tmp_path / "out" / "x.gguf")
    assert "pytorch_model.bin" in message and "pickle" in message


def test_a_missing_converter_names_the_file_and_make_llama_tools(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, olmo_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(external.ENV_LLAMA_CPP, raising=False)
    monkeypatch.setenv(external.ENV_SDIST_CACHE, str(tmp_path / "empty-cache"))
    message = refused(capsys, [olmo_base, tmp_path], "convert", olmo_base, tmp_path / "x.gguf")
    assert "convert_hf_to_gguf.py" in message and "make llama-tools" in message
    checkout = tmp_path / "not-llama.cpp"
    checkout.mkdir()
    message = refused(capsys, [olmo_base, tmp_path], "convert", olmo_base, tmp_path / "x.gguf", "--llama-cpp", checkout)
    assert str(checkout) in message and "convert_hf_to_gguf.py, conversion, gguf-py missing" in message


def test_an_architecture_neither_converter_knows_is_refused_by_both(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_base: Path, converter: external.Converter
) -> None:
    src = shutil.copytree(tiny_base, tmp_path / "foo")
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["FooForCausalLM"]
    (src / "config.json").write_text(json.dumps(config))
    message = refused(capsys, [src, tmp_path], "convert", src, tmp_path / "out" / "foo.gguf")
    assert "convert_hf_to_gguf.py failed" in message and "Model FooForCausalLM is not supported" in message
    assert "no native converter for FooForCausalLM" in message


def test_checkpoint_code_never_runs(tmp_path: Path, olmo_base: Path, converter: external.Converter) -> None:
    """A converter that asks transformers for trust_remote_code=True (as llama.cpp's does for several
    tokenizers) on a folder whose tokenizer is Python code of its own: the code must not run."""
    src = shutil.copytree(olmo_base, tmp_path / "custom-code")
    marker = tmp_path / "code-ran"
    (src / "tokenization_custom.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\nclass CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config = json.loads((src / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="CustomTokenizer", auto_map={"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]})
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    # A llama.cpp folder (its conversion/ and gguf-py/) whose converter only loads the tokenizer.
    checkout = tmp_path / "llama.cpp"
    checkout.mkdir()
    for name in ("conversion", "gguf-py"):
        (checkout / name).symlink_to(converter.folder / name)
    (checkout / "convert_hf_to_gguf.py").write_text(
        "import sys\nfrom transformers import AutoTokenizer\nAutoTokenizer.from_pretrained(sys.argv[-1], trust_remote_code=True)\n"
    )
    try:
        external.run_child(external.Converter(checkout, "test", None), src, [str(src)], {}, progress=False)
    except Lora2ggufError as exc:  # transformers may refuse the folder instead of reading tokenizer.json
        assert "never runs a checkpoint's own code" in str(exc)
    assert not marker.exists(), "the checkpoint's code ran under lora2gguf's converter process"
    # The same converter without lora2gguf's guard does run it: the check above can fail.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    subprocess.run([sys.executable, str(checkout / "convert_hf_to_gguf.py"), str(src)], env=env, stdin=subprocess.DEVNULL,
                   capture_output=True, timeout=300, check=False)  # fmt: skip
    assert marker.read_text() == "ran"


def test_config_backend_is_validated_and_defaults_to_auto(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    config["convert"]["backend"] = "llamacpp"
    write_config(tmp_path / "bad", config)
    result = run_snakemake(tmp_path / "bad", "-n", timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "'llamacpp' is not one of ['auto', 'native', 'llama.cpp']" in output
    assert "instance['convert']['backend']" in output
    del config["convert"]["backend"]  # a config written before the key existed
    write_config(tmp_path / "old", config)
    result = run_snakemake(tmp_path / "old", "-n", "-p", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "lora2gguf convert" in output and "--backend auto" in output


# ---------------------------------------------------------------------------------------------
# OLMo through auto


@needs_llama
def test_auto_converts_olmo_with_llama_cpp(olmo_gguf, converter: external.Converter) -> None:
    out, report, log = olmo_gguf("f16")
    assert "with llama.cpp's convert_hf_to_gguf.py" in log and "no native converter for OlmoForCausalLM" in log
    assert report["backend"] == "llama.cpp" and report["architecture"] == "olmo"
    assert report["hf_architecture"] == "OlmoForCausalLM" and report["outtype"] == "f16"
    assert report["output_sha256"] == sha256_file(out)
    assert report["converter"]["sha256"] == sha256_file(converter.script)
    assert report["converter"]["llama_cpp_python"] == converter.llama_cpp_python
    assert report["converter"]["gguf_py"]["path"] == str(converter.folder / "gguf-py" / "gguf")
    assert report["peak_rss_mb"] > 50 and report["seconds"] > 0
    assert report["tokenizer_pre"] == "gpt-2" and "lora2gguf" in report["pre_tokenizer_source"]
    gguf_file = read_gguf(out)
    assert gguf_file.metadata["general.architecture"] == "olmo"
    assert gguf_file.metadata["general.basename"] == "tiny-olmo" and gguf_file.metadata["general.finetune"] == "olmo-a"
    assert report["n_tensors"] == len(gguf_file.tensors) == 16  # embeddings, head, 7 matrices x 2 layers
    assert report["tensor_types"] == {"F16": 16}


@needs_llama
def test_olmo_logits_match_hf_fp32(olmo_gguf, olmo_merged: Path) -> None:
    import llama_cpp

    path, report, _ = olmo_gguf("f32")
    assert report["tensor_types"] == {"F32": 16}
    kl, top1 = _kl_and_top1(path, olmo_merged, llama_cpp)
    print(f"olmo F32 via llama.cpp's converter: mean KL {kl:.2e}, top-1 {top1:.3f}")
    assert kl < 1e-5 and top1 == 1.0


@needs_llama
def test_olmo_tokenization_matches_hf(olmo_gguf, olmo_merged: Path) -> None:
    import llama_cpp
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(olmo_merged, local_files_only=True)
    llm = llama_cpp.Llama(model_path=str(olmo_gguf("f16")[0]), vocab_only=True, verbose=False)
    chat = hf.apply_chat_template([{"role": "user", "content": "我最近很焦虑 😀 def f(x): return x"}],
                                  tokenize=False, add_generation_prompt=True)  # fmt: skip
    for text in (MIXED_TEXT, "", "   multiple   spaces  \n\n", chat):
        expected = hf(text)["input_ids"]
        assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) == expected, text[:60]
    assert llm.token_eos() == hf.eos_token_id


@needs_llama
@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q8_0", "Q4_0"])
def test_olmo_quantized_byte_identical_to_llama_cpp(olmo_gguf, tmp_path: Path, qtype: str) -> None:
    src = olmo_gguf("f16")[0]
    ours, ref = tmp_path / "ours.gguf", tmp_path / "llama.gguf"
    _cli("quantize", src, ours, qtype, "--threads", "2")
    llama_quantize_file(src, ref, qtype, threads=2)
    assert ours.read_bytes() == ref.read_bytes(), f"{qtype}: differs from llama_model_quantize"
    types = {t.type_name for t in read_gguf(ours).tensors}
    print(f"olmo {qtype}: byte-identical to llama_model_quantize; tensor types {sorted(types)}")


# ---------------------------------------------------------------------------------------------
# the llama.cpp backend as a cross-check of the native converter


@needs_llama
def test_llama_cpp_backend_matches_native_on_qwen2(tmp_path: Path, tiny_base: Path, converter: external.Converter) -> None:
    """(tests/test_convert.py compares every outtype with the converter run directly; this is the backend's plumbing.)"""
    native, theirs = tmp_path / "native.gguf", tmp_path / "llama.gguf"
    template = tmp_path / "training.jinja"  # a template carried instead of the folder's (as the workflow does)
    template.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    common = ("--outtype", "f16", "--name", "tiny", "--base-model", "tiny-qwen2", "--adapter", "none", "--no-progress",
              "--chat-template", template)  # fmt: skip
    _cli("convert", tiny_base, native, *common, "--backend", "native")
    _cli("convert", tiny_base, theirs, *common, "--backend", "llama.cpp", "--report", tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["backend"] == "llama.cpp"
    assert read_gguf(theirs).metadata["tokenizer.chat_template"] == template.read_text()
    # llama.cpp's converter and ours write the same bytes: metadata, tensor table and data.
    assert native.read_bytes() == theirs.read_bytes()


# ---------------------------------------------------------------------------------------------
# the recipe refuses what it does not transcribe


def test_recipe_refuses_architecture_rules_it_does_not_transcribe() -> None:
    specs = [TensorSpec("token_embd.weight", (256, 512), "F16"), TensorSpec("blk.0.attn_q_a.weight", (256, 256), "F16")]
    model = ModelInfo(arch="glm5-next", n_layer=1, n_head=4, n_head_kv=4)
    with pytest.raises(Lora2ggufError, match=r"blk\.0\.attn_q_a\.weight.*glm5-next.*Q8_0"):
        plan_types(specs, model, "Q4_K_M")
    # Q8_0 is what that rule gives anyway: no refusal, and the plan says Q8_0
    plan = plan_types(specs, model, "Q8_0")
    assert [c.dst_type for c in plan.choices] == ["Q8_0", "Q8_0"]
    hc = [TensorSpec("blk.0.hc_attn_fn.weight", (256, 256), "F16")]
    with pytest.raises(Lora2ggufError, match=r"blk\.0\.hc_attn_fn\.weight.*does not quantize.*glm5-next"):
        plan_types(hc, model, "Q8_0")
    # the same names in another architecture follow the ordinary rules
    assert plan_types(specs, ModelInfo(arch="llama", n_layer=1, n_head=4, n_head_kv=4), "Q4_K_M").choices


# ---------------------------------------------------------------------------------------------
# the workflow on an OLMo and a Qwen3 candidate

# candidate -> (HF class, GGUF architecture, the converter its convert log names)
WORKFLOW_CANDIDATES = {
    "olmo-a": ("OlmoForCausalLM", "olmo", "llama.cpp's convert_hf_to_gguf.py"),
    "qwen3-a": ("Qwen3ForCausalLM", "qwen3", "converted natively as qwen3"),
}


@pytest.fixture(scope="session")
def qwen3_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    return build_qwen3(tmp_path_factory.mktemp("bases") / "tiny-qwen3", seed=0)


@pytest.fixture(scope="session")
def qwen3_run(tmp_path_factory: pytest.TempPathFactory, qwen3_base: Path) -> Path:
    out = tmp_path_factory.mktemp("qwen3-runs") / "qwen3-a"
    return train_lora(qwen3_base, out, r=4, alpha=8, lr=5e-3, steps=4, seed=0)


@needs_llama
@pytest.mark.slow
def test_workflow_runs_on_olmo_and_qwen3_candidates(tmp_path: Path, olmo_base: Path, olmo_run: Path, qwen3_base: Path,
                                                    qwen3_run: Path, converter: external.Converter) -> None:
    """One Snakemake run, two candidates on different bases: the ranking, then for each (not only the
    winner) merge, convert (OLMo through llama.cpp's converter, Qwen3 natively), quantize, the
    inference test, the comparison, deploy, chat parity and the manifest."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    config = tiny_config(olmo_base, {}, workdir)
    config["candidates"] = {"olmo-a": {"base": str(olmo_base), "run": str(olmo_run)},
                            "qwen3-a": {"base": str(qwen3_base), "run": str(qwen3_run)}}  # fmt: skip
    config["quantize"]["types"] = ["Q4_K_M"]
    write_config(workdir, config)
    # `all` builds the winner's artifacts; the manifests (which need every artifact of their model) the other's.
    manifests = [MANIFEST.format(model=name) for name in WORKFLOW_CANDIDATES]
    result = run_snakemake(workdir, "--cores", "2", "all", *manifests)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    analysis = json.loads((workdir / MODEL_ANALYSIS).read_text())
    assert set(analysis["ranking"]) == set(WORKFLOW_CANDIDATES)
    for name, (hf_arch, arch, converter_line) in WORKFLOW_CANDIDATES.items():
        _check_workflow_candidate(workdir, name, hf_arch, arch, converter_line)


def _check_workflow_candidate(workdir: Path, name: str, hf_arch: str, arch: str, converter_line: str) -> None:
    assert converter_line in (workdir / "logs" / "convert_gguf" / f"{name}.log").read_text()
    gguf_dir = workdir / "models" / f"{name}-merged-gguf"
    assert read_gguf(gguf_dir / "model.gguf").metadata["general.architecture"] == arch
    assert (gguf_dir / "model-q4_km.gguf").is_file() and (workdir / MANIFEST.format(model=name)).is_file()
    test = json.loads((workdir / TEST_REPORT.format(model=name)).read_text())
    assert test["model"]["architecture"] == hf_arch and len(test["cases"]) == 2
    compare = json.loads((workdir / COMPARE_REPORT.format(model=name)).read_text())
    assert compare["reference"]["architecture"] == hf_arch
    f16 = next(m for m in compare["models"] if m["label"] == "F16")
    # A random tiny model's next-token distribution is nearly flat (perplexity in the thousands): F16
    # rounding may flip a near-tie at one of 63 positions (seen on an Intel host: KL 1.9e-6, top-1 62/63),
    # so the distribution is held by KL and top-1 only to "almost every position", as test_families does.
    assert f16["kl_divergence"]["mean"] < 1e-4 and f16["top1_agreement"] >= 0.95, f16["kl_divergence"]
    parity = json.loads((workdir / CHAT_PARITY.format(model=name)).read_text())
    assert all(r["identical"] == r["of"] for r in parity["renderers"].values() if r["measured"]), parity["summary"]
    served = parity["summary"]["served"]
    assert served["all_prompt_tokens_match"] and served["forced_stop_ends_at_stop"], served
    print(f"{name} workflow:", {m["label"]: (m["kl_divergence"]["mean"], m["top1_agreement"]) for m in compare["models"]},
          parity["summary"])  # fmt: skip
