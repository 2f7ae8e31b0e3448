"""lora2gguf convert: metadata, streaming, bad input, and proof in real llama.cpp.

Models: the tiny Qwen2 (conftest's ``tiny_base``), a bf16 copy of it, a tiny random Llama with a
SmolLM-style tokenizer (built here; untied head, grouped-query attention, so the q/k permutation and
output.weight are exercised), and the demo's SmolLM2-135M when resources/demo/bases/smollm2-135m
exists (those tests skip otherwise).

The comparison with llama.cpp's own converter uses convert_hf_to_gguf.py and its gguf-py from the
llama-cpp-python 0.3.36 sdist (cached under ~/.cache/lora2gguf/sdist, or $LORA2GGUF_SDIST_CACHE);
it needs torch and transformers, which is fine for a test, and is skipped when the sdist cannot be
found or downloaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lora2gguf.convert import convert as convert_module
from lora2gguf.convert.convert import convert
from lora2gguf.demo.dataset import SPLITS, load_dataset_split, render_text
from lora2gguf.errors import Lora2ggufError

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SDIST_VERSION = "0.3.36"
SDIST_CACHE = Path(os.environ.get("LORA2GGUF_SDIST_CACHE", Path.home() / ".cache" / "lora2gguf" / "sdist"))
SMOLLM2_DIR = Path(os.environ.get("LORA2GGUF_SMOLLM2_DIR", ROOT / "resources" / "demo" / "bases" / "smollm2-135m"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

MIXED_TEXT = (
    "我最近考试很焦虑，晚上睡不着，怎么办？Hello World! I'm 23 years old, born in 2001: 3.14159, 1,000,000 and 42nd.\n"
    "😀🚀👍🏽 ✅ naïve café — «quotes» ‘single’\n"
    "def square(x: int) -> int:\n    return x ** 2  # comment\n\n\tif x != 0 and y >= 1: print(f\"{x:08.3f}\")\n"
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n好的<|im_end|><|endoftext|>"
    "   multiple   spaces  \n\n\n trailing "
)

# ---------------------------------------------------------------------------------------------
# Model fixtures
# ---------------------------------------------------------------------------------------------


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def build_tiny_llama(out_dir: Path, seed: int = 0) -> Path:
    """A random LlamaForCausalLM (GQA, q/k/v biases, untied head) with a SmolLM2-style byte-level BPE tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    corpus = [turn["value"] for split in SPLITS for rec in load_dataset_split(split) for turn in rec["conversations"]]
    corpus += ["def f(x):\n    return x + 1\n", "for i in range(10): print(i)", "2024-01-01 12:30 3.14 1,000"] * 20
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=900, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=specials,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    n_vocab = tok.get_vocab_size(with_added_tokens=True)
    config = LlamaConfig(
        vocab_size=n_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        initializer_range=0.2, attention_bias=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():  # non-zero q/k biases, so their per-head permutation is visible
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save(str(out_dir / "tokenizer.json"))
    template = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "clean_up_tokenization_spaces": False, "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": 512, "chat_template": template,
    }, indent=2), encoding="utf-8")
    return out_dir


@pytest.fixture(scope="session")
def qwen_dir(tiny_base: Path) -> Path:
    return tiny_base


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny-llama")


@pytest.fixture(scope="session")
def qwen_bf16_dir(tmp_path_factory: pytest.TempPathFactory, qwen_dir: Path) -> Path:
    """The tiny Qwen2 saved in bfloat16 (the usual dtype of merged checkpoints)."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("bf16") / "tiny-qwen2-bf16"
    model = AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=torch.bfloat16, local_files_only=True)
    model.save_pretrained(out, safe_serialization=True)
    _copy_tokenizer(qwen_dir, out)
    return out


@pytest.fixture(scope="session")
def qwen_padded_dir(tmp_path_factory: pytest.TempPathFactory, qwen_dir: Path) -> Path:
    """The tiny Qwen2 with added tokens and an embedding matrix padded beyond the tokenizer (as Qwen2 ships:
    151,936 rows for 151,665 tokens): a non-special "<think>"/"</think>" pair (user-defined), a non-special
    "<|tool|>" that looks like a control token, and 61 rows no token uses."""
    from safetensors.numpy import load_file, save_file

    out = _copy_model(qwen_dir, tmp_path_factory.mktemp("padded") / "tiny-qwen2-padded")
    tok = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    next_id = 1 + max(max(tok["model"]["vocab"].values()), *(t["id"] for t in tok["added_tokens"]))
    for i, (content, special) in enumerate((("<think>", False), ("</think>", False), ("<|tool|>", False))):
        tok["added_tokens"].append({"id": next_id + i, "content": content, "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": special})
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False, indent=1), encoding="utf-8")
    # transformers takes added tokens from tokenizer_config.json, so list them there too (as it saves them)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    for entry in tok["added_tokens"]:
        tok_cfg["added_tokens_decoder"][str(entry["id"])] = {k: v for k, v in entry.items() if k != "id"}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, ensure_ascii=False, indent=1), encoding="utf-8")
    cfg = json.loads((out / "config.json").read_text())
    cfg["vocab_size"] = next_id + 64
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tensors = load_file(out / "model.safetensors")
    emb = tensors["model.embed_tokens.weight"]
    rng = np.random.default_rng(1)
    extra = (rng.standard_normal((cfg["vocab_size"] - emb.shape[0], emb.shape[1])) * 0.02).astype(np.float32)
    tensors["model.embed_tokens.weight"] = np.concatenate([emb, extra])
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    if not (SMOLLM2_DIR / "config.json").is_file():
        pytest.skip(f"SmolLM2 demo base not built at {SMOLLM2_DIR} (lora2gguf demo / rules/demo.smk builds it)")
    return SMOLLM2_DIR


MODEL_FIXTURES = {
    "qwen": "qwen_dir", "llama": "llama_dir", "qwen_bf16": "qwen_bf16_dir", "qwen_padded": "qwen_padded_dir",
    "smol": "smol_dir",
}


@pytest.fixture(scope="session")
def model_dir_of(request: pytest.FixtureRequest):
    def get(key: str) -> Path:
        return request.getfixturevalue(MODEL_FIXTURES[key])

    return get


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory, model_dir_of) -> Any:
    """Our conversion of (model, outtype), made once per session."""
    cache: dict[tuple[str, str], Path] = {}
    root = tmp_path_factory.mktemp("ours")

    def get(key: str, outtype: str) -> Path:
        if (key, outtype) not in cache:
            out = root / f"{key}-{outtype}.gguf"
            convert(model_dir_of(key), out, outtype, progress=False)
            cache[key, outtype] = out
        return cache[key, outtype]

    return get


# ---------------------------------------------------------------------------------------------
# Reading GGUF files
# ---------------------------------------------------------------------------------------------


def read_gguf(path: Path) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], str, bytes]]]:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = [(t.name, tuple(int(x) for x in t.shape), t.tensor_type.name, t.data.tobytes()) for t in reader.tensors]
    return fields, tensors


# ---------------------------------------------------------------------------------------------
# CLI and metadata
# ---------------------------------------------------------------------------------------------


def test_cli_help_documents_options() -> None:
    res = subprocess.run([PY, "-m", "lora2gguf.cli", "convert", "--help"], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    for flag in ("--outtype", "--base-model", "--adapter", "--name", "f16", "bf16", "f32", "q8_0", "IN_DIR", "OUT.gguf"):
        assert flag in res.stdout


def test_qwen_metadata(tmp_path: Path, qwen_dir: Path) -> None:
    out = tmp_path / "model.gguf"
    summary = convert(qwen_dir, out, "f16", base_model="tiny-qwen2", adapter="counsel-r8", name="tiny-counsel", progress=False)
    config = json.loads((qwen_dir / "config.json").read_text())
    tok = json.loads((qwen_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((qwen_dir / "tokenizer_config.json").read_text())
    f, tensors = read_gguf(out)
    assert f["general.architecture"] == "qwen2"
    assert f["general.type"] == "model"
    assert f["general.name"] == "tiny-counsel"
    assert f["general.basename"] == "tiny-qwen2"
    assert f["general.finetune"] == "counsel-r8"
    assert f["general.base_model.count"] == 1 and f["general.base_model.0.name"] == "tiny-qwen2"
    assert f["general.size_label"] == "1.3M"
    assert f["general.file_type"] == 1 and f["general.quantization_version"] == 2
    assert f["qwen2.block_count"] == config["num_hidden_layers"]
    assert f["qwen2.context_length"] == config["max_position_embeddings"]
    assert f["qwen2.embedding_length"] == config["hidden_size"]
    assert f["qwen2.feed_forward_length"] == config["intermediate_size"]
    assert f["qwen2.attention.head_count"] == config["num_attention_heads"]
    assert f["qwen2.attention.head_count_kv"] == config["num_key_value_heads"]
    assert f["qwen2.rope.freq_base"] == pytest.approx(config["rope_parameters"]["rope_theta"])
    assert f["qwen2.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "qwen2"
    assert len(f["tokenizer.ggml.tokens"]) == config["vocab_size"] == len(f["tokenizer.ggml.token_type"])
    # merges in the "a b" form, in tokenizer.json's order
    merges = tok["model"]["merges"]
    expected = [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert f["tokenizer.ggml.merges"] == expected
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    assert f["tokenizer.ggml.eos_token_id"] == ids[tok_cfg["eos_token"]]
    assert f["tokenizer.ggml.padding_token_id"] == ids[tok_cfg["pad_token"]]
    assert f["tokenizer.ggml.bos_token_id"] == config["bos_token_id"]
    assert f["tokenizer.ggml.add_bos_token"] is False and f["tokenizer.ggml.add_eos_token"] is False
    assert f["tokenizer.chat_template"] == tok_cfg["chat_template"]
    types = f["tokenizer.ggml.token_type"]
    assert all(types[i] == 3 for i in ids.values())  # CONTROL
    # tied embeddings: the head is token_embd.weight, no output.weight
    names = [t[0] for t in tensors]
    assert "output.weight" not in names and "token_embd.weight" in names
    assert summary.tied_embeddings and summary.n_tensors == len(names)
    norm_types = {t[2] for t in tensors if t[0].endswith("_norm.weight") or t[0].endswith(".bias")}
    assert norm_types == {"F32"}


def test_padded_vocabulary_and_added_token_types(converted, qwen_padded_dir: Path) -> None:
    from gguf import TokenType

    f, _ = read_gguf(converted("qwen_padded", "f16"))
    cfg = json.loads((qwen_padded_dir / "config.json").read_text())
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == cfg["vocab_size"]
    kinds = {tokens[i]: types[i] for i in range(len(tokens))}
    assert kinds["<think>"] == kinds["</think>"] == TokenType.USER_DEFINED
    assert kinds["<|tool|>"] == kinds["<|im_end|>"] == TokenType.CONTROL
    assert tokens[-1] == f"[PAD{cfg['vocab_size'] - 1}]" and types[-1] == TokenType.UNUSED
    assert sum(t == TokenType.UNUSED for t in types) == 61


def test_llama_metadata_and_untied_head(converted, llama_dir: Path) -> None:
    f, tensors = read_gguf(converted("llama", "f16"))
    config = json.loads((llama_dir / "config.json").read_text())
    assert f["general.architecture"] == "llama"
    assert f["llama.vocab_size"] == config["vocab_size"]
    assert f["llama.rope.dimension_count"] == config["hidden_size"] // config["num_attention_heads"]
    assert f["tokenizer.ggml.pre"] == "smollm"
    assert f["tokenizer.ggml.add_space_prefix"] is False
    assert f["tokenizer.ggml.bos_token_id"] == 1 and f["tokenizer.ggml.eos_token_id"] == 2
    assert "output.weight" in [t[0] for t in tensors]


def test_merges_in_both_forms_give_same_file(tmp_path: Path, qwen_dir: Path) -> None:
    outs = []
    for form in ("pairs", "strings"):
        src = _copy_model(qwen_dir, tmp_path / form)
        tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
        merges = tok["model"]["merges"]
        if form == "pairs":
            tok["model"]["merges"] = [m.split(" ") if isinstance(m, str) else m for m in merges]
        else:
            tok["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in merges]
        (src / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
        outs.append(tmp_path / f"{form}.gguf")
        convert(src, outs[-1], "f16", name="same", progress=False)
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_output_is_deterministic(tmp_path: Path, qwen_dir: Path, converted) -> None:
    again = tmp_path / "again.gguf"
    convert(qwen_dir, again, "q8_0", progress=False)
    assert again.read_bytes() == converted("qwen", "q8_0").read_bytes()


def test_convert_never_imports_torch(tmp_path: Path, qwen_bf16_dir: Path) -> None:
    """The bf16 reader and the whole CLI path work with torch and transformers made unimportable."""
    out = tmp_path / "m.gguf"
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None; sys.modules["transformers"] = None
        from lora2gguf.cli import main
        rc = main(["convert", {str(qwen_bf16_dir)!r}, {str(out)!r}, "--outtype", "bf16", "--no-progress",
                   "--report", {str(tmp_path / "report.json")!r}])
        assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
        raise SystemExit(rc)
    """)
    res = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert out.is_file()
    # the closing line: tensor count, size, time, memory
    assert re.search(r"wrote .*: \d+ tensors .* MiB, \d+ parameters, in [\d.]+ s .* peak RSS [\d.]+ MiB", res.stderr)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["outtype"] == "bf16" and report["tensor_types"] == {"BF16": 15, "F32": 11}
    assert report["input_sha256"]["model.safetensors"] and report["output_sha256"]
    assert report["peak_rss_mb"] > 0 and report["versions"]["gguf"] == "0.19.0"


def test_bf16_source_roundtrip(converted, qwen_bf16_dir: Path) -> None:
    """BF16 safetensors (no numpy dtype) are widened exactly: BF16 output equals the source bits."""
    from safetensors import safe_open

    f, tensors = read_gguf(converted("qwen_bf16", "bf16"))
    by_name = {t[0]: t for t in tensors}
    with safe_open(qwen_bf16_dir / "model.safetensors", framework="pt") as st:
        src = st.get_tensor("model.layers.0.mlp.down_proj.weight")
    import torch

    expected = src.view(torch.int16).numpy().tobytes()
    assert by_name["blk.0.ffn_down.weight"][2] == "BF16"
    assert by_name["blk.0.ffn_down.weight"][3] == expected


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def _rewrite_tensors(model_dir: Path, edit) -> None:
    from safetensors.numpy import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_f16_overflow_names_tensor_and_suggests_bf16(tmp_path: Path, qwen_dir: Path) -> None:
    src = _copy_model(qwen_dir, tmp_path / "big")

    def poison(t: dict[str, np.ndarray]) -> None:
        t["model.layers.1.mlp.down_proj.weight"][3, 5] = 1.0e5

    _rewrite_tensors(src, poison)
    out = tmp_path / "out" / "model.gguf"
    with pytest.raises(Lora2ggufError) as err:
        convert(src, out, "f16", progress=False)
    msg = str(err.value)
    assert "model.layers.1.mlp.down_proj.weight" in msg and "bf16" in msg and "100000" in msg
    # the folder the failed command created is gone too, with no temporary file left in it
    assert not out.exists() and not out.parent.exists()
    # the CLI reports it and exits 2
    res = subprocess.run([PY, "-m", "lora2gguf.cli", "convert", str(src), str(out)], capture_output=True, text=True, check=False)
    assert res.returncode == 2 and "error:" in res.stderr and "bf16" in res.stderr
    assert not out.exists()
    convert(src, out, "bf16", progress=False)  # the suggested fix works
    assert out.is_file()


def test_unsupported_architecture_is_named(tmp_path: Path, qwen_dir: Path) -> None:
    src = _copy_model(qwen_dir, tmp_path / "gpt2")
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Lora2ggufError, match=r"config\.json.*GPT2LMHeadModel.*not supported"):
        convert(src, tmp_path / "x.gguf", progress=False)
    assert not (tmp_path / "x.gguf").exists()


def test_vocab_size_mismatch_is_reported(tmp_path: Path, qwen_dir: Path) -> None:
    src = _copy_model(qwen_dir, tmp_path / "resized")
    cfg = json.loads((src / "config.json").read_text())
    cfg["vocab_size"] += 64
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Lora2ggufError, match=r"embed_tokens.*shape.*vocab_size"):
        convert(src, tmp_path / "x.gguf", progress=False)


def test_pickle_only_folder_is_refused(tmp_path: Path, qwen_dir: Path) -> None:
    src = _copy_model(qwen_dir, tmp_path / "pickle")
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(Lora2ggufError, match=r"pytorch_model\.bin.*safetensors"):
        convert(src, tmp_path / "x.gguf", progress=False)


def test_tied_head_copy_is_dropped_but_a_diverged_head_is_refused(tmp_path: Path, qwen_dir: Path, converted) -> None:
    copy = _copy_model(qwen_dir, tmp_path / "copy")
    _rewrite_tensors(copy, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].copy()))
    out = tmp_path / "copy.gguf"
    convert(copy, out, "f16", progress=False)
    assert read_gguf(out)[1] == read_gguf(converted("qwen", "f16"))[1]  # no output.weight, same tensors

    diverged = _copy_model(qwen_dir, tmp_path / "diverged")
    _rewrite_tensors(diverged, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"] + 0.01))
    with pytest.raises(Lora2ggufError, match=r"lm_head\.weight.*differs.*tie_word_embeddings"):
        convert(diverged, tmp_path / "d.gguf", progress=False)


def test_peak_memory_stays_near_largest_tensor(tmp_path: Path, qwen_dir: Path) -> None:
    """A 24-layer model of ~230 MB converts with far less extra memory than its size (streaming)."""
    from safetensors.numpy import save_file

    src = tmp_path / "deep"
    src.mkdir()
    _copy_tokenizer(qwen_dir, src)
    cfg = json.loads((qwen_dir / "config.json").read_text())
    hidden, ffn, layers, kv = 512, 1024, 24, 256
    cfg.update(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=8,
               num_key_value_heads=4, layer_types=["full_attention"] * layers)
    (src / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02)

    tensors = {"model.embed_tokens.weight": w(cfg["vocab_size"], hidden), "model.norm.weight": np.ones(hidden, np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": np.ones(hidden, np.float32),
            p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
            p + "self_attn.q_proj.weight": w(hidden, hidden), p + "self_attn.q_proj.bias": w(hidden),
            p + "self_attn.k_proj.weight": w(kv, hidden), p + "self_attn.k_proj.bias": w(kv),
            p + "self_attn.v_proj.weight": w(kv, hidden), p + "self_attn.v_proj.bias": w(kv),
            p + "self_attn.o_proj.weight": w(hidden, hidden),
            p + "mlp.gate_proj.weight": w(ffn, hidden), p + "mlp.up_proj.weight": w(ffn, hidden),
            p + "mlp.down_proj.weight": w(hidden, ffn),
        }
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    input_mib = sum(t.nbytes for t in tensors.values()) / 2**20
    largest_mib = max(t.nbytes for t in tensors.values()) / 2**20
    del tensors
    out = tmp_path / "deep.gguf"
    res = subprocess.run([PY, "-m", "lora2gguf.cli", "convert", str(src), str(out), "--no-progress"],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    m = re.search(r"peak RSS ([\d.]+) MiB \(([\d.]+) MiB at start, largest tensor ([\d.]+) MiB\)", res.stderr)
    assert m, res.stderr[-2000:]
    peak, start, largest = map(float, m.groups())
    assert largest == pytest.approx(largest_mib, abs=0.1)
    growth = peak - start
    assert input_mib > 200
    assert growth < 2 * largest + 64, f"peak grew by {growth:.1f} MiB for a {input_mib:.0f} MiB model"


@pytest.mark.parametrize("key,outtype", [("qwen", "f16"), ("qwen", "q8_0"), ("qwen_bf16", "f16"), ("qwen_bf16", "bf16")])
def test_row_block_conversion_gives_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, converted,
                                               model_dir_of, key: str, outtype: str) -> None:
    """Large tensors are converted in row blocks; force tiny blocks and compare with whole tensors."""
    monkeypatch.setattr(convert_module, "_CHUNK_BYTES", 3000)
    out = tmp_path / "blocks.gguf"
    convert_module.convert(model_dir_of(key), out, outtype, progress=False)
    assert out.read_bytes() == converted(key, outtype).read_bytes()


# ---------------------------------------------------------------------------------------------
# llama.cpp: loading, tokenization, logits
# ---------------------------------------------------------------------------------------------

LOAD_SCRIPT = textwrap.dedent("""
    import sys
    from llama_cpp import Llama
    llm = Llama(model_path=sys.argv[1], n_ctx=64, n_threads=2, verbose=True)
    toks = llm.tokenize("Hello, 你好 123".encode(), add_bos=True, special=True)
    llm.eval(toks)
    print("N_VOCAB", llm.n_vocab(), "N_TOKENS", len(toks))
""")
# What llama.cpp prints when a vocabulary or pre-tokenizer is missing or wrong (src/llama-vocab.cpp).
VOCAB_WARNINGS = re.compile(
    r"missing pre-tokenizer|GENERATION QUALITY|unknown pre-tokenizer|control-looking token|not in special_eog_ids"
    r"|bad special token|out of vocab range|empty token|cannot find tokenizer merges|adding \d+ dummy tokens"
    r"|special_\w+_id is not|override .* to 'true'",
    re.IGNORECASE,
)


@pytest.fixture(scope="session")
def llama_cpp() -> Any:
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python 0.3.36 not installed")


@pytest.mark.parametrize("key", ["qwen", "llama", "qwen_bf16", "qwen_padded"])
@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_llama_cpp_loads_without_vocab_warnings(llama_cpp, converted, key: str, outtype: str) -> None:
    path = converted(key, outtype)
    res = subprocess.run([PY, "-c", LOAD_SCRIPT, str(path)], capture_output=True, text=True, check=False, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    warnings = [line for line in res.stderr.splitlines() if VOCAB_WARNINGS.search(line)]
    assert warnings == []
    n_vocab = int(re.search(r"N_VOCAB (\d+)", res.stdout).group(1))
    assert n_vocab == len(read_gguf(path)[0]["tokenizer.ggml.tokens"])


def test_smollm2_loads_without_vocab_warnings(llama_cpp, converted, smol_dir: Path) -> None:
    res = subprocess.run([PY, "-c", LOAD_SCRIPT, str(converted("smol", "f16"))], capture_output=True, text=True,
                         check=False, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [line for line in res.stderr.splitlines() if VOCAB_WARNINGS.search(line)] == []


def _prompts(model_dir: Path) -> list[str]:
    """The mixed text, the configured test prompts, and the same prompts through the chat template."""
    import yaml
    from transformers import AutoTokenizer

    config = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    texts = [MIXED_TEXT, "", " ", "\n\n", "1234567890 12 3", "  leading spaces and trailing  ",
             "<think>plan</think> answer <|tool|>call<|im_end|>"]
    texts += [p["text"] for p in config.get("test_prompts", [])]
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    for p in config.get("test_prompts", [])[:3]:
        texts.append(tok.apply_chat_template([{"role": "user", "content": p["text"]}], tokenize=False, add_generation_prompt=True))
    return texts


@pytest.mark.parametrize("key", ["qwen", "llama", "qwen_padded", "smol"])
def test_tokenization_parity_with_hf(llama_cpp, converted, model_dir_of, key: str) -> None:
    from transformers import AutoTokenizer

    model_dir = model_dir_of(key)
    hf = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    llm = llama_cpp.Llama(model_path=str(converted(key, "f16")), vocab_only=True, verbose=False)
    for text in _prompts(model_dir):
        expected = hf(text)["input_ids"]
        got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        assert got == expected, f"{key}: {text[:60]!r}"
        # and back: llama.cpp detokenizes to the same text as HF's decode
        assert llm.detokenize(got, special=True).decode("utf-8", errors="replace") == hf.decode(expected)


def _eval_ids(model_dir: Path, n: int) -> list[int]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)(render_text("eval"))["input_ids"]
    assert len(ids) >= n
    return ids[:n]


def _kl_and_top1(path: Path, model_dir: Path, llama_cpp: Any, n: int = 64) -> tuple[float, float]:
    import torch
    from transformers import AutoModelForCausalLM

    ids = _eval_ids(model_dir, n)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].double().numpy()
    # F32 KV cache: the comparison is about the weights we wrote, not llama.cpp's default F16 cache.
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(128, n), n_batch=max(128, n), n_threads=2, logits_all=True,
                          type_k=0, type_v=0, verbose=False)
    llm.eval(ids)
    got = np.asarray(llm.scores[:n], dtype=np.float64)

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(got)
    kl = float((np.exp(lp) * (lp - lq)).sum(axis=-1).mean())
    top1 = float((ref.argmax(-1) == got.argmax(-1)).mean())
    return kl, top1


@pytest.mark.parametrize("key", ["qwen", "llama", "smol"])
def test_logit_parity_with_hf_fp32(llama_cpp, converted, model_dir_of, key: str) -> None:
    model_dir = model_dir_of(key)
    kl32, top32 = _kl_and_top1(converted(key, "f32"), model_dir, llama_cpp)
    kl16, top16 = _kl_and_top1(converted(key, "f16"), model_dir, llama_cpp)
    print(f"{key}: F32 KL {kl32:.2e} top1 {top32:.3f}; F16 KL {kl16:.2e} top1 {top16:.3f}")
    assert kl32 < 1e-5 and top32 == 1.0
    assert kl16 < 1e-4


# ---------------------------------------------------------------------------------------------
# Against llama.cpp's own converter
# ---------------------------------------------------------------------------------------------

# Runs several conversions with the vendored convert_hf_to_gguf.py in one process (torch and
# transformers are imported once). llama.cpp's converter refuses a vocabulary whose hash it does not
# know (our tiny models have freshly trained vocabularies), so for those -- and only those -- its
# hash lookup is wrapped to return the pre-tokenizer name we expect; "forced" records when that happened.
REFERENCE_RUNNER = textwrap.dedent("""
    import json, os, runpy, sys
    llama_dir = sys.argv[1]
    jobs = json.loads(sys.argv[2])
    sys.path.insert(0, os.path.join(llama_dir, "gguf-py"))
    sys.path.insert(0, llama_dir)
    import conversion.base as base
    original = base.TextModel.get_vocab_base_pre
    state = {}
    def lookup(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            state["forced"] = True
            return state["pre"]
    base.TextModel.get_vocab_base_pre = lookup
    report = {}
    for job in jobs:
        state.clear(); state["pre"] = job["pre"]
        sys.argv = ["convert_hf_to_gguf.py", "--outtype", job["outtype"], "--outfile", job["out"], job["model"]]
        runpy.run_path(os.path.join(llama_dir, "convert_hf_to_gguf.py"), run_name="__main__")
        report[job["out"]] = bool(state.get("forced"))
    print("REPORT" + json.dumps(report))
""")


def _find_vendored_llama_cpp() -> Path | None:
    base = SDIST_CACHE / f"llama_cpp_python-{SDIST_VERSION}"
    llama_dir = base / "vendor" / "llama.cpp"
    if (llama_dir / "convert_hf_to_gguf.py").is_file() and (llama_dir / "conversion").is_dir():
        return llama_dir
    tarball = SDIST_CACHE / f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
    if not tarball.is_file():
        SDIST_CACHE.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(
                [PY, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={SDIST_VERSION}",
                 "-d", str(SDIST_CACHE)],
                capture_output=True, text=True, check=True, timeout=600,
            )
        except (subprocess.SubprocessError, OSError):
            return None
        if not tarball.is_file():
            return None
    prefix = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/"
    wanted = (prefix + "convert_hf_to_gguf.py", prefix + "conversion/", prefix + "gguf-py/")
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(wanted)]
        tar.extractall(SDIST_CACHE, members=members, filter="data")
    return llama_dir if (llama_dir / "convert_hf_to_gguf.py").is_file() else None


# (model, outtype, the pre-tokenizer name expected when llama.cpp does not know the vocabulary)
REFERENCE_CASES = [
    ("qwen", "f32", "qwen2"), ("qwen", "f16", "qwen2"), ("qwen", "bf16", "qwen2"), ("qwen", "q8_0", "qwen2"),
    ("llama", "f32", "smollm"), ("llama", "f16", "smollm"), ("llama", "q8_0", "smollm"),
    ("qwen_bf16", "f16", "qwen2"), ("qwen_bf16", "bf16", "qwen2"), ("qwen_bf16", "q8_0", "qwen2"),
    ("qwen_padded", "f16", "qwen2"),
    ("smol", "f16", "smollm"),
]

# Metadata that differs from llama.cpp's converter on purpose, and why.
EXPLAINED_DIFFERENCES = {
    # We always state whether EOS is appended. llama.cpp's gguf-py only writes the key when
    # tokenizer.json's post-processor is ByteLevel or a template ending in a special token; SmolLM2's
    # template-without-specials leaves it out, and llama.cpp then defaults to false: same behaviour.
    "tokenizer.ggml.add_eos_token": (False, None),
}


@pytest.fixture(scope="session")
def reference_outputs(tmp_path_factory: pytest.TempPathFactory, model_dir_of) -> dict[tuple[str, str], tuple[Path, bool]]:
    pytest.importorskip("torch")
    llama_dir = _find_vendored_llama_cpp()
    if llama_dir is None:
        pytest.skip(f"llama-cpp-python {SDIST_VERSION} sdist not available (not cached in {SDIST_CACHE}, download failed)")
    root = tmp_path_factory.mktemp("reference")
    jobs, keys = [], {}
    for key, outtype, pre in REFERENCE_CASES:
        try:
            model_dir = model_dir_of(key)
        except pytest.skip.Exception:
            continue
        out = root / f"{key}-{outtype}.gguf"
        jobs.append({"model": str(model_dir), "outtype": outtype, "out": str(out), "pre": pre})
        keys[str(out)] = (key, outtype)
    res = subprocess.run([PY, "-c", REFERENCE_RUNNER, str(llama_dir), json.dumps(jobs)], capture_output=True,
                         text=True, check=False, timeout=1200)
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads(res.stdout.split("REPORT", 1)[1])
    return {keys[out]: (Path(out), forced) for out, forced in report.items()}


@pytest.mark.parametrize("key,outtype", [(k, t) for k, t, _ in REFERENCE_CASES])
def test_same_as_llama_cpp_converter(reference_outputs, converted, key: str, outtype: str) -> None:
    if (key, outtype) not in reference_outputs:
        pytest.skip(f"{key} model not available")
    ref_path, forced = reference_outputs[key, outtype]
    # llama.cpp knows SmolLM2's vocabulary; only the freshly trained tiny ones needed the wrapper.
    assert forced == (key != "smol")
    ours_fields, ours_tensors = read_gguf(converted(key, outtype))
    ref_fields, ref_tensors = read_gguf(ref_path)
    assert [t[:3] for t in ours_tensors] == [t[:3] for t in ref_tensors]  # names, order, shapes, types
    for mine, theirs in zip(ours_tensors, ref_tensors):
        assert mine[3] == theirs[3], f"{mine[0]}: tensor bytes differ"
    differences = {}
    for k in sorted(set(ours_fields) | set(ref_fields)):
        if ours_fields.get(k) != ref_fields.get(k):
            differences[k] = (ours_fields.get(k), ref_fields.get(k))
    unexplained = {k: v for k, v in differences.items() if EXPLAINED_DIFFERENCES.get(k) != v}
    assert unexplained == {}
    if not differences:
        assert converted(key, outtype).read_bytes() == ref_path.read_bytes()


def test_provenance_flags_change_only_general_keys(tmp_path: Path, qwen_dir: Path, converted) -> None:
    out = tmp_path / "named.gguf"
    convert(qwen_dir, out, "f16", base_model="Qwen2-0.5B", adapter="counsel-r8", name="counsel", progress=False)
    named, named_t = read_gguf(out)
    plain, plain_t = read_gguf(converted("qwen", "f16"))
    assert named_t == plain_t
    changed = {k for k in set(named) | set(plain) if named.get(k) != plain.get(k)}
    assert changed <= {"general.name", "general.basename", "general.finetune", "general.base_model.count",
                       "general.base_model.0.name"}
    assert named["general.base_model.0.name"] == "Qwen2-0.5B"
