"""Native conversion of the families beyond Qwen2/SmolLM: Qwen3, Llama 3, Gemma 2, Gemma 3, Mistral, Phi-3.

Per family (tiny random models from tests/families.py, a LoRA adapter on every linear layer):
``lora2gguf merge`` verified; our F32/F16/BF16 GGUF of the merged model byte-identical to the pinned
``convert_hf_to_gguf.py``; llama.cpp loads it without vocabulary warnings; HF fp32 vs GGUF F32 mean KL
< 1e-5 with top-1 1.0; llama.cpp tokenizes mixed Chinese/English/emoji/code text and the chat
template's output exactly as Hugging Face does; the stop tokens of the generation config are
end-of-generation tokens in llama.cpp and the chat template is carried; Q4_K_M, Q5_K_M, Q6_K, Q8_0
and Q4_0 from our quantizer byte-identical to ``llama_model_quantize``; and the LoRA adapter GGUF,
applied by llama.cpp to the base GGUF, computes what peft does. Then the evaluation steps on each:
``lora2gguf test`` and llama-server (through ``chat-parity``) end answers at the family's end-of-turn
token; ``lora2gguf compare`` scores the F16 and Q4_K_M files; every chat renderer gives the prompt ids
Hugging Face gives (or, for Ollama, the deploy report says why there is no TEMPLATE).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import _root_logger_kept, refused
from families import FAMILIES, ending_turns_at_once
from llama_oracle import llama_cpp_available, llama_quantize_file
from lora2gguf.cli import main
from lora2gguf.convert.convert import convert
from lora2gguf.demo.dataset import render_text
from lora2gguf.errors import Lora2ggufError
from lora2gguf.deploy.parity import conversations
from lora2gguf.hf import chat_ids, load_tokenizer
from lora2gguf.quantize.quantize import QuantizeOptions, quantize_gguf
from lora2gguf.settings import Prompt
from test_adapter import _llama_cpp_logits, kl_top1
from test_convert import (
    LOAD_SCRIPT, MIXED_TEXT, REFERENCE_RUNNER, SDIST_VERSION, VOCAB_WARNINGS, _find_vendored_llama_cpp, read_gguf,
)  # fmt: skip
from test_deploy import HAS_GO, needs_server
from test_merge import make_adapter

PY = sys.executable
KEYS = list(FAMILIES)
OUTTYPES = ("f32", "f16", "bf16")
# (family, source folder, outtype) compared with llama.cpp's converter: every family's merged fp32 model
# in the three float types, and Gemma 2 saved in float16 (its norm + 1 then happens in half precision).
REFERENCE_CASES = [(k, "merged", t) for k in KEYS for t in OUTTYPES] + [("gemma2", "merged_f16", "f16")]
QUANT_TYPES = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0")
N_EVAL = 64
# The inference test's, the comparison's and chat parity's prompts: Chinese and English user turns.
PROMPTS = [Prompt("exam", "我下周就要期末考试了，每天晚上都紧张得睡不着，该怎么办？"),
           Prompt("deadlines", "I have three deadlines this week. How can I cope?")]  # fmt: skip
PROMPTS_JSON = json.dumps([{"id": p.id, "text": p.text} for p in PROMPTS], ensure_ascii=False)

needs_llama = pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python 0.3.36 not installed")


# ---------------------------------------------------------------------------------------------
# Session fixtures: base, adapter, merged model, our GGUFs, llama.cpp's converter's GGUFs
# ---------------------------------------------------------------------------------------------


class FamilyModels:
    """Everything built for one family, made on first use and kept for the session."""

    def __init__(self, root: Path, key: str) -> None:
        self.key, self.family, self.root = key, FAMILIES[key], root / key
        self._cache: dict[Any, Any] = {}

    def _once(self, name: Any, make: Any) -> Any:
        if name not in self._cache:
            self._cache[name] = make()
        return self._cache[name]

    @property
    def base(self) -> Path:
        return self._once("base", lambda: self.family.build(self.root / "base", 0))

    @property
    def adapter(self) -> Path:
        # No tokenizer in the run folder: the merge takes the base's files (tokenizer.model included).
        return self._once("adapter", lambda: make_adapter(self.base, self.root / "run", r=8, alpha=16,
                                                          targets=list(self.family.lora_targets), save_tokenizer=False))

    @property
    def merged(self) -> tuple[Path, dict[str, Any]]:
        def make() -> tuple[Path, dict[str, Any]]:
            adapter = self.adapter  # builds the base and the run first
            out, report = self.root / "merged", self.root / "merge_report.json"
            text = self.root / "eval.txt"
            text.write_text(render_text("eval"), encoding="utf-8")
            rc = main(["merge", "--base", str(self.base), "--adapter", str(adapter), "--out", str(out),
                       "--dtype", "float32", "--device", "cpu", "--report", str(report), "--eval-text", str(text)])
            assert rc == 0, f"{self.key}: lora2gguf merge failed"
            return out, json.loads(report.read_text(encoding="utf-8"))

        return self._once("merged", make)

    @property
    def merged_f16(self) -> Path:
        """The merged model saved in float16 (Gemma's norm + 1 is then computed in half precision)."""
        def make() -> Path:
            import torch
            from transformers import AutoModelForCausalLM

            out = self.root / "merged-f16src"
            model = AutoModelForCausalLM.from_pretrained(self.merged[0], dtype=torch.float16, local_files_only=True)
            model.save_pretrained(out, safe_serialization=True)
            for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json"):
                if (self.merged[0] / name).is_file():
                    shutil.copyfile(self.merged[0] / name, out / name)
            return out

        return self._once("merged_f16", make)

    @property
    def stopper(self) -> Path:
        """The merged model answering the family's end-of-turn token at once to every chat-parity
        conversation of PROMPTS (families.ending_turns_at_once)."""
        def make() -> Path:
            tokenizer = load_tokenizer(self.merged[0])
            ids = [chat_ids(tokenizer, c.messages) for c in conversations(PROMPTS)]
            return ending_turns_at_once(self.merged[0], self.root / "merged-stopper", self.end_of_turn_id, ids)

        return self._once("stopper", make)

    @property
    def end_of_turn_id(self) -> int:
        return int(load_tokenizer(self.merged[0]).convert_tokens_to_ids(self.family.end_of_turn))

    def folder(self, model: str) -> Path:
        return {"merged": lambda: self.merged[0], "base": lambda: self.base, "merged_f16": lambda: self.merged_f16,
                "stopper": lambda: self.stopper}[model]()

    def gguf(self, outtype: str, model: str = "merged") -> Path:
        def make() -> Path:
            out = self.root / f"{model}-{outtype}.gguf"
            convert(self.folder(model), out, outtype, progress=False)
            return out

        return self._once((model, outtype), make)


@pytest.fixture(scope="session")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FamilyModels]:
    root = tmp_path_factory.mktemp("families")
    return {key: FamilyModels(root, key) for key in KEYS}


@pytest.fixture(scope="session")
def reference(
    tmp_path_factory: pytest.TempPathFactory, families: dict[str, FamilyModels]
) -> dict[tuple[str, str, str], tuple[Path, bool]]:
    """convert_hf_to_gguf.py's output for every REFERENCE_CASES entry, in one process."""
    llama_dir = _find_vendored_llama_cpp()
    if llama_dir is None:
        pytest.skip(f"llama-cpp-python {SDIST_VERSION} sdist not available")
    root = tmp_path_factory.mktemp("families-reference")
    jobs, keys = [], {}
    for key, model, outtype in REFERENCE_CASES:
        out = root / f"{key}-{model}-{outtype}.gguf"
        jobs.append({"model": str(families[key].folder(model)), "outtype": outtype, "out": str(out),
                     "pre": FAMILIES[key].tokenizer_pre})
        keys[str(out)] = (key, model, outtype)
    res = subprocess.run([PY, "-c", REFERENCE_RUNNER, str(llama_dir), json.dumps(jobs)], capture_output=True,
                         text=True, check=False, timeout=1200)
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads(res.stdout.split("REPORT", 1)[1])
    return {keys[out]: (Path(out), forced) for out, forced in report.items()}


# ---------------------------------------------------------------------------------------------
# merge and conversion
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", KEYS)
def test_merge_is_verified(families: dict[str, FamilyModels], key: str) -> None:
    merged, report = families[key].merged
    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == [FAMILIES[key].hf_architecture]
    ver = report["verification"]
    assert ver["passed"] and ver["finite"] and ver["top1_agreement"] == 1.0
    n_layers = config["num_hidden_layers"]
    assert report["adapter"]["lora_tensors"] == 2 * n_layers * len(FAMILIES[key].lora_targets)
    if (families[key].base / "tokenizer.model").is_file():
        assert (merged / "tokenizer.model").read_bytes() == (families[key].base / "tokenizer.model").read_bytes()


@pytest.mark.parametrize("key,model,outtype", REFERENCE_CASES)
def test_same_bytes_as_llama_cpp_converter(families: dict[str, FamilyModels], reference, key: str, model: str,
                                           outtype: str) -> None:
    ref_path, forced = reference[key, model, outtype]
    # llama.cpp's converter refuses a BPE vocabulary it has no hash for (ours are freshly trained):
    # the runner names the pre-tokenizer for it then. SentencePiece vocabularies need no such help.
    assert forced == (not (families[key].merged[0] / "tokenizer.model").is_file())
    ours = families[key].gguf(outtype, model)
    ours_fields, ours_tensors = read_gguf(ours)
    ref_fields, ref_tensors = read_gguf(ref_path)
    assert [t[:3] for t in ours_tensors] == [t[:3] for t in ref_tensors]
    for mine, theirs in zip(ours_tensors, ref_tensors):
        assert mine[3] == theirs[3], f"{mine[0]}: tensor bytes differ"
    assert {k for k in set(ours_fields) | set(ref_fields) if ours_fields.get(k) != ref_fields.get(k)} == set()
    assert ours.read_bytes() == ref_path.read_bytes()


@pytest.mark.parametrize("key", KEYS)
def test_family_metadata(families: dict[str, FamilyModels], key: str) -> None:
    """What each family's GGUF must say, read back against the HF config."""
    fam = families[key]
    config = json.loads((fam.merged[0] / "config.json").read_text())
    fields, tensors = read_gguf(fam.gguf("f32"))
    arch = FAMILIES[key].gguf_architecture
    names = {t[0]: t for t in tensors}
    assert fields["general.architecture"] == arch
    assert fields["tokenizer.ggml.pre"] == FAMILIES[key].tokenizer_pre
    if config.get("head_dim") is not None:
        assert fields[f"{arch}.attention.key_length"] == config["head_dim"]
    assert ("output.weight" in names) == (not config["tie_word_embeddings"])
    if key == "qwen3":
        assert {f"blk.0.attn_{x}_norm.weight" for x in "qk"} <= set(names)
    if key == "llama3":
        factors = np.frombuffer(names["rope_freqs.weight"][3], dtype=np.float32)
        assert len(factors) == config["head_dim"] // 2 and factors[0] == 1.0 and factors[-1] == 8.0
        assert ((factors > 1) & (factors < 8)).sum() == 3  # the interpolated band
    if key.startswith("gemma"):
        assert fields["tokenizer.ggml.add_space_prefix"] is False and fields["tokenizer.ggml.model"] == "llama"
        assert fields[f"{arch}.attention.sliding_window"] == config["sliding_window"]
        from safetensors.numpy import load_file

        hf = load_file(fam.merged[0] / "model.safetensors")
        ggml_norm = np.frombuffer(names["blk.0.attn_norm.weight"][3], dtype=np.float32)
        assert np.array_equal(ggml_norm, hf["model.layers.0.input_layernorm.weight"] + np.float32(1))
    if key == "gemma2":
        assert fields["gemma2.attn_logit_softcapping"] == config["attn_logit_softcapping"]
        assert fields["gemma2.final_logit_softcapping"] == config["final_logit_softcapping"]
    if key == "phi3":  # fused projections, LongRoPE factors and attention factor, the original context
        hidden = config["hidden_size"]
        kv_width = config["num_key_value_heads"] * (hidden // config["num_attention_heads"])
        assert names["blk.0.attn_qkv.weight"][1] == (hidden, hidden + 2 * kv_width)
        assert names["blk.0.ffn_up.weight"][1] == (config["hidden_size"], 2 * config["intermediate_size"])
        rope = config["rope_parameters"]
        for which in ("long", "short"):
            stored = np.frombuffer(names[f"rope_factors_{which}.weight"][3], dtype=np.float32)
            assert np.array_equal(stored, np.float32(rope[f"{which}_factor"]))
        scale = config["max_position_embeddings"] / rope["original_max_position_embeddings"]
        expected = np.sqrt(1 + np.log(scale) / np.log(rope["original_max_position_embeddings"]))
        assert fields["phi3.rope.scaling.attn_factor"] == pytest.approx(expected, rel=1e-6)
        assert fields["phi3.rope.scaling.original_context_length"] == rope["original_max_position_embeddings"]
        assert fields["phi3.attention.sliding_window"] == 0
    if key == "gemma3":
        rope = config["rope_parameters"]
        assert fields["gemma3.rope.freq_base"] == rope["full_attention"]["rope_theta"]
        assert fields["gemma3.rope.freq_base_swa"] == rope["sliding_attention"]["rope_theta"]


# ---------------------------------------------------------------------------------------------
# llama.cpp: loading, tokenization, stop tokens, logits
# ---------------------------------------------------------------------------------------------


@needs_llama
@pytest.mark.parametrize("key", KEYS)
def test_llama_cpp_loads_without_vocab_warnings(families: dict[str, FamilyModels], key: str) -> None:
    path = families[key].gguf("f16")
    res = subprocess.run([PY, "-c", LOAD_SCRIPT, str(path)], capture_output=True, text=True, check=False, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [line for line in res.stderr.splitlines() if VOCAB_WARNINGS.search(line)] == []


def _texts(model_dir: Path, key: str) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    chat = [{"role": "user", "content": "我最近考试很焦虑 — what can I do? 😀"},
            {"role": "assistant", "content": "Try `sleep(8)` first.\n\n  Then: breathe."},
            {"role": "user", "content": "ok 123 4567"}]  # fmt: skip
    specials = "".join(f"x{token}  y" for token in FAMILIES[key].stop_tokens)  # special tokens inside text
    return [MIXED_TEXT, "", " ", " a", "\n\n", "  leading and trailing  ", "1234567890 12 3", specials,
            tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)]  # fmt: skip


def _detokenize(llm: Any, ids: list[int]) -> str:
    """llama.cpp's own llama_detokenize (llama-cpp-python's Llama.detokenize pieces tokens together itself)."""
    import ctypes

    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    tokens = (llama_cpp.llama_token * len(ids))(*ids)
    buf = ctypes.create_string_buffer(64 * len(ids) + 64)
    n = llama_cpp.llama_detokenize(vocab, tokens, len(ids), buf, len(buf), False, True)
    assert n >= 0
    return buf.raw[:n].decode("utf-8", errors="replace")


@needs_llama
@pytest.mark.parametrize("key", KEYS)
def test_tokenization_parity_with_hf(families: dict[str, FamilyModels], key: str) -> None:
    import llama_cpp
    from transformers import AutoTokenizer

    model_dir = families[key].merged[0]
    hf = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    llm = llama_cpp.Llama(model_path=str(families[key].gguf("f16")), vocab_only=True, verbose=False)
    for text in _texts(model_dir, key):
        # the chat template already starts with BOS: HF adds no second one there, nor may llama.cpp
        templated = text.startswith(hf.bos_token or "\0")
        expected = hf(text, add_special_tokens=not templated)["input_ids"]
        got = llm.tokenize(text.encode("utf-8"), add_bos=not templated, special=True)
        assert got == expected, f"{key}: {text[:60]!r}"
        decoded = hf.decode(expected)
        if hf.clean_up_tokenization_spaces:
            # Llama 3 asks for the space clean-up (" !" -> "!"); llama.cpp applies it, transformers 5
            # no longer does for BPE tokenizers, so it is applied here with transformers' own function.
            decoded = hf.clean_up_tokenization(decoded)
        assert _detokenize(llm, got) == decoded, f"{key}: {text[:60]!r}"


@needs_llama
@pytest.mark.parametrize("key", KEYS)
def test_stop_tokens_and_chat_template(families: dict[str, FamilyModels], key: str) -> None:
    """The GGUF's EOS is the tokenizer's, every id the generation config stops on is end-of-generation
    in llama.cpp, and the chat template is the tokenizer's."""
    import llama_cpp
    from transformers import AutoTokenizer, GenerationConfig

    model_dir = families[key].merged[0]
    hf = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    stops = GenerationConfig.from_pretrained(model_dir, local_files_only=True).eos_token_id
    stops = [stops] if isinstance(stops, int) else list(stops)
    assert sorted(stops) == sorted(hf.convert_tokens_to_ids(list(FAMILIES[key].stop_tokens)))
    fields, _ = read_gguf(families[key].gguf("f16"))
    assert fields["tokenizer.ggml.eos_token_id"] == hf.eos_token_id
    assert fields["tokenizer.chat_template"] == hf.chat_template
    llm = llama_cpp.Llama(model_path=str(families[key].gguf("f16")), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    assert [bool(llama_cpp.llama_vocab_is_eog(vocab, i)) for i in stops] == [True] * len(stops)


def _eval_ids(model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)(render_text("eval"))["input_ids"]
    assert len(ids) >= N_EVAL
    return ids[:N_EVAL]


def _hf_logits(model_dir: Path, ids: list[int], adapter: Path | None = None) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).logits[0].double().numpy()


@needs_llama
@pytest.mark.parametrize("key", KEYS)
def test_logit_parity_with_hf_fp32(families: dict[str, FamilyModels], key: str) -> None:
    model_dir = families[key].merged[0]
    ids = _eval_ids(model_dir)
    ref = _hf_logits(model_dir, ids)
    kl32, top32 = kl_top1(ref, _llama_cpp_logits(families[key].gguf("f32"), None, ids))
    kl16, top16 = kl_top1(ref, _llama_cpp_logits(families[key].gguf("f16"), None, ids))
    print(f"{key}: F32 KL {kl32:.2e} top1 {top32:.3f}; F16 KL {kl16:.2e} top1 {top16:.3f}")
    assert kl32 < 1e-5 and top32 == 1.0
    assert kl16 < 1e-3


# ---------------------------------------------------------------------------------------------
# quantization and the LoRA adapter
# ---------------------------------------------------------------------------------------------


@needs_llama
@pytest.mark.parametrize("ftype", QUANT_TYPES)
@pytest.mark.parametrize("key", KEYS)
def test_quantized_same_bytes_as_llama_cpp(families: dict[str, FamilyModels], key: str, ftype: str, tmp_path: Path) -> None:
    src = families[key].gguf("f16")
    ours, ref = tmp_path / "ours.gguf", tmp_path / "llama.gguf"
    quantize_gguf(src, ours, QuantizeOptions(ftype, threads=2))
    llama_quantize_file(src, ref, ftype, threads=2)
    ours_fields, ours_tensors = read_gguf(ours)
    ref_fields, ref_tensors = read_gguf(ref)
    assert [t[:3] for t in ours_tensors] == [t[:3] for t in ref_tensors], "tensor order/shapes/types"
    differing = [a[0] for a, b in zip(ours_tensors, ref_tensors) if a[3] != b[3]]
    assert differing == [], f"{key} {ftype}: tensor bytes differ: {differing}"
    assert ours.read_bytes() == ref.read_bytes()


@needs_llama
@pytest.mark.parametrize("key", KEYS)
def test_lora_adapter_gguf_computes_what_peft_does(families: dict[str, FamilyModels], key: str, tmp_path: Path) -> None:
    fam = families[key]
    out = tmp_path / "adapter.gguf"
    assert main(["adapter", str(fam.adapter), str(out), "--base", str(fam.base), "--outtype", "f32"]) == 0
    fields, tensors = read_gguf(out)
    assert fields["general.architecture"] == FAMILIES[key].gguf_architecture and fields["general.type"] == "adapter"
    ids = _eval_ids(fam.base)
    ref = _hf_logits(fam.base, ids, adapter=fam.adapter)
    kl, top1 = kl_top1(ref, _llama_cpp_logits(fam.gguf("f32", model="base"), out, ids))
    print(f"{key}: base GGUF F32 + adapter GGUF vs peft: KL {kl:.2e} top1 {top1:.3f}")
    assert kl < 1e-5 and top1 == 1.0


# ---------------------------------------------------------------------------------------------
# the inference test, the comparison and chat parity on each family
# ---------------------------------------------------------------------------------------------

# Ollama TEMPLATE translation (lora2gguf deploy): the families whose chat template trims every
# message (Llama 3's and Gemma's, as released) have none, since Go's template cannot trim; the
# others are translated and their Ollama rendering must be exact.
UNTRANSLATED = {"llama3", "gemma2", "gemma3"}


def _cli_report(out: Path, *argv: str | Path) -> dict[str, Any]:
    """Run ``lora2gguf ARGV`` in this process and read the report it wrote at ``out``."""
    with _root_logger_kept():
        assert main([str(a) for a in argv]) == 0, argv
    return json.loads(out.read_text(encoding="utf-8"))


@pytest.mark.parametrize("key", KEYS)
def test_inference_test_answers_end_at_the_end_of_turn(families: dict[str, FamilyModels], key: str,
                                                       tmp_path: Path) -> None:
    """``lora2gguf test`` stops each answer at the family's end-of-turn token (the stopper model
    answers it at once; were it no stop token, it would be generated max_new_tokens times)."""
    fam, out = families[key], tmp_path / "merged_model_test.json"
    report = _cli_report(out, "test", "--model", fam.stopper, "--prompts", PROMPTS_JSON, "--generation",
                         '{"max_new_tokens": 6}', "--device", "cpu", "--threads", "2", "--out", out)
    assert report["model"]["architecture"] == FAMILIES[key].hf_architecture
    settings = report["settings"]
    assert settings["chat_template_applied"]
    stop_ids = load_tokenizer(fam.stopper).convert_tokens_to_ids(list(FAMILIES[key].stop_tokens))
    assert sorted(settings["stop_token_ids"]) == sorted(stop_ids)
    assert [(c["stopped_by"], c["generated_tokens"], c["response"]) for c in report["cases"]] == [("eos", 1, "")] * 2


@needs_llama
@pytest.mark.parametrize("key", KEYS)
def test_compare_scores_f16_and_q4_k_m(families: dict[str, FamilyModels], key: str, tmp_path: Path) -> None:
    """``lora2gguf compare``: the merged model in PyTorch against its F16 and Q4_K_M GGUF in llama.cpp."""
    fam, out = families[key], tmp_path / "compare_models.json"
    f16, q4 = fam.gguf("f16"), tmp_path / "model-q4_km.gguf"
    quantize_gguf(f16, q4, QuantizeOptions("Q4_K_M", threads=2))
    report = _cli_report(out, "compare", "--reference", fam.merged[0], "--gguf", f16, "--gguf", q4,
                         "--eval-text", fam.root / "eval.txt", "--max-tokens", str(N_EVAL), "--context", str(N_EVAL),
                         "--prompts", PROMPTS_JSON, "--max-new-tokens", "4", "--threads", "2", "--speed-repeats", "1",
                         "--out", out)  # fmt: skip
    assert report["reference"]["architecture"] == FAMILIES[key].hf_architecture
    models = {m["label"]: m for m in report["models"]}
    assert set(models) == {"F16", "Q4_K_M"} and "failed" not in report
    kl = {label: m["kl_divergence"]["mean"] for label, m in models.items()}
    print(f"{key} compare: F16 KL {kl['F16']:.2e} top1 {models['F16']['top1_agreement']:.3f}; Q4_K_M KL "
          f"{kl['Q4_K_M']:.2e} top1 {models['Q4_K_M']['top1_agreement']:.3f}; greedy tokens identical "
          f"{models['F16']['generation']['identical_token_fraction']:.2f} / "
          f"{models['Q4_K_M']['generation']['identical_token_fraction']:.2f}")  # fmt: skip
    assert kl["F16"] < 1e-3 and kl["F16"] < kl["Q4_K_M"] < 0.5
    assert models["Q4_K_M"]["sidecar_matches_file"] is True


@needs_llama
@needs_server
@pytest.mark.parametrize("key", KEYS)
def test_chat_parity_and_served_answers_end_at_the_end_of_turn(families: dict[str, FamilyModels], key: str,
                                                               tmp_path: Path) -> None:
    """``lora2gguf deploy`` then ``chat-parity`` on the stopper's GGUF: every renderer gives the
    Hugging Face prompt ids (Gemma's system message folded into the first user turn included), and
    llama-server ends each served answer at the end-of-turn token with finish_reason "stop"."""
    fam, gguf = families[key], tmp_path / "gguf" / "model.gguf"
    gguf.parent.mkdir()
    shutil.copyfile(fam.gguf("f32", model="stopper"), gguf)
    deployed = _cli_report(tmp_path / "deploy.json", "deploy", gguf, "--merged", fam.stopper, "--report",
                           tmp_path / "deploy.json", "--name", key)
    assert set(FAMILIES[key].stop_tokens) <= {stop["text"] for stop in deployed["stop"]}
    assert deployed["template"]["translated"] == (key not in UNTRANSLATED), deployed["template"]
    out = tmp_path / "chat_parity.json"
    report = _cli_report(out, "chat-parity", "--merged", fam.stopper, "--gguf", gguf, "--modelfile",
                         gguf.parent / "Modelfile", "--prompts", PROMPTS_JSON, "--max-new-tokens", "4",
                         "--threads", "2", "--out", out)  # fmt: skip
    renderers = report["renderers"]
    if key in UNTRANSLATED:
        assert "does not render message content verbatim" in deployed["template"]["reason"]
        assert not renderers.pop("ollama")["measured"]
    elif not HAS_GO:
        renderers.pop("ollama")
    print(f"{key} chat parity: {report['summary']}")
    assert {name: (r["identical"], r["of"]) for name, r in renderers.items()} == {name: (4, 4) for name in renderers}
    served = report["served"]
    assert served["backend"] == "llama-server" and served["all_prompt_tokens_match"] and served["all_answers_match"]
    eot = fam.end_of_turn_id
    assert [(c["answer_ids"], c["finish_reason"]) for c in served["conversations"]] == [([eot], "stop")] * 4


def test_run_that_saved_its_tokenizer_merges_into_a_convertible_folder(families: dict[str, FamilyModels],
                                                                       tmp_path: Path) -> None:
    """A LLaMA-Factory run saves its tokenizer beside the adapter (tokenizer.save_pretrained, which in
    transformers 5 writes tokenizer.json but no tokenizer.model); its merged Gemma 3 must still convert."""
    fam = families["gemma3"]
    run = make_adapter(fam.base, tmp_path / "run", r=4, alpha=8, targets=list(fam.family.lora_targets))
    merged = tmp_path / "merged"
    assert main(["merge", "--base", str(fam.base), "--adapter", str(run), "--out", str(merged), "--device", "cpu"]) == 0
    assert (merged / "tokenizer.model").read_bytes() == (fam.base / "tokenizer.model").read_bytes()
    convert(merged, tmp_path / "model.gguf", "f16", progress=False)


# ---------------------------------------------------------------------------------------------
# configs llama.cpp would convert into a model that computes something else, and missing files
# ---------------------------------------------------------------------------------------------

# name -> (family, change to config.json, part of the error message)
REFUSALS: dict[str, tuple[str, dict[str, Any], str]] = {
    "gemma2-rope-theta": ("gemma2", {"rope_parameters": {"rope_type": "default", "rope_theta": 20000.0}}, "'rope_theta'"),
    "gemma2-untied": ("gemma2", {"tie_word_embeddings": False}, "'tie_word_embeddings'"),
    "gemma2-layer-types": ("gemma2", {"layer_types": ["full_attention", "sliding_attention"]}, "'layer_types'"),
    "gemma3-attention-scale": ("gemma3", {"query_pre_attn_scalar": 256}, "'query_pre_attn_scalar'"),
    "gemma3-softcap": ("gemma3", {"attn_logit_softcapping": 50.0}, "'attn_logit_softcapping'"),
    "gemma2-activation": ("gemma2", {"hidden_activation": "relu"}, "'hidden_activation'"),
    "llama-dynamic-rope": ("llama3", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
                           "RoPE type 'dynamic'"),
    "qwen3-longrope": ("qwen3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e6}}, "RoPE type 'longrope'"),
    "phi3-factor-length": ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4,
                           "original_max_position_embeddings": 512, "long_factor": [1.0], "short_factor": [1.0]}},
                           "long_factor/short_factor"),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_refuses_configs_llama_cpp_would_compute_differently(families: dict[str, FamilyModels], name: str,
                                                            tmp_path: Path, capsys) -> None:
    key, change, fragment = REFUSALS[name]
    model = shutil.copytree(families[key].base, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **change}))
    out = tmp_path / "out.gguf"
    message = refused(capsys, [model, tmp_path], "convert", model, out)
    assert str(model / "config.json") in message and fragment in message


def test_sentencepiece_family_without_tokenizer_model_is_refused(families: dict[str, FamilyModels], tmp_path: Path,
                                                                 capsys) -> None:
    model = shutil.copytree(families["gemma3"].base, tmp_path / "model")
    (model / "tokenizer.model").unlink()
    message = refused(capsys, [model, tmp_path], "convert", model, tmp_path / "out.gguf")
    assert str(model / "tokenizer.model") in message


def test_lora_on_a_transformed_tensor_is_refused(families: dict[str, FamilyModels]) -> None:
    """Gemma's norms are stored + 1 in the GGUF: a llama.cpp adapter on them cannot be peft's update."""
    import dataclasses

    from lora2gguf.adapter.export import _read_base, plan_pairs
    from lora2gguf.adapter.peft_adapter import read_adapter

    fam = families["gemma2"]
    adapter = read_adapter(fam.adapter)
    adapter.pairs[:] = [dataclasses.replace(adapter.pairs[0], module="model.layers.0.input_layernorm")]
    with pytest.raises(Lora2ggufError, match="'model.layers.0.input_layernorm' .* stores that tensor transformed"):
        plan_pairs(adapter, _read_base(fam.base))


# transformers < 5 spelled the RoPE settings at the top level ("rope_theta", "rope_scaling", Gemma 3's
# "rope_local_base_freq" and "sliding_window_pattern"), as most released checkpoints still do.
OLD_SPELLINGS: dict[str, Any] = {
    "llama3": lambda rope: {"rope_theta": rope["rope_theta"], "rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"}},
    "gemma3": lambda rope: {"rope_theta": rope["full_attention"]["rope_theta"], "sliding_window_pattern": 6,
                            "rope_local_base_freq": rope["sliding_attention"]["rope_theta"], "rope_scaling": None},
}


@pytest.mark.parametrize("key", sorted(OLD_SPELLINGS))
def test_transformers_4_config_spelling_gives_the_same_file(families: dict[str, FamilyModels], key: str,
                                                            tmp_path: Path) -> None:
    model = shutil.copytree(families[key].base, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    old = {k: v for k, v in config.items() if k not in ("rope_parameters", "layer_types")}
    (model / "config.json").write_text(json.dumps({**old, **OLD_SPELLINGS[key](config["rope_parameters"])}))
    out = tmp_path / "old.gguf"
    convert(model, out, "f32", progress=False)
    fields, tensors = read_gguf(out)
    ref_fields, ref_tensors = read_gguf(families[key].gguf("f32", model="base"))
    assert tensors == ref_tensors
    assert {k for k in set(fields) | set(ref_fields) if fields.get(k) != ref_fields.get(k)} == {"general.name"}
