"""Tiny random models of the model families lora2gguf converts natively, built here for the family tests.

Each family's model comes from its transformers config class with a real-format tokenizer made on
this machine from the demo dataset: a byte-level BPE with the family's pre-tokenizer (Qwen3: Qwen2's
split, Llama 3: its own split with \\p{N}{1,3}) or a SentencePiece model trained with the
``sentencepiece`` library and turned into the ``tokenizer.json`` transformers would ship
(Gemma 2/3, Mistral), plus the family's chat template, special tokens and generation config (its
stop tokens). Shapes are tiny but chosen for coverage: hidden 256 gives true K-quant super-blocks,
the feed-forward width 320 (a multiple of 32, not of 256) makes llama.cpp fall back to legacy
types on ffn_down, norms are randomised (Gemma's are stored +1), and each family's particular
hyperparameters (explicit head_dim, llama3 RoPE scaling, softcapping, a sliding window shorter
than the 64-token comparison) are set so that getting them wrong changes the logits.
``ending_turns_at_once`` turns a model into one that answers its end-of-turn token at once, for the
tests of stop tokens (random models never end a turn by themselves).
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora2gguf.demo.dataset import SPLITS, load_dataset_split
from lora2gguf.demo.tiny import QWEN2_SPLIT_REGEX

# Llama 3's split (as in its tokenizer.json): digits in groups of up to three.
LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SHAPE = {"hidden_size": 256, "intermediate_size": 320, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 512}  # fmt: skip

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Gemma has no system role: a system message is folded into the first user turn (as Gemma 3's template does).
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% set offset = 0 %}{% if messages[0]['role'] == 'system' %}"
    "{% set first = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class Family:
    """One model family: how to build its tiny model and what its GGUF must say."""

    key: str
    hf_architecture: str
    gguf_architecture: str
    tokenizer_pre: str  # tokenizer.ggml.pre llama.cpp's converter writes
    lora_targets: tuple[str, ...]
    build: Callable[[Path, int], Path]
    # tokens generation must stop on (generation_config eos ids), by text: llama.cpp must treat each as end-of-generation
    stop_tokens: tuple[str, ...]
    end_of_turn: str  # the one of stop_tokens the chat template closes an assistant turn with


def corpus() -> list[str]:
    texts = [turn["value"] for split in SPLITS for rec in load_dataset_split(split) for turn in rec["conversations"]]
    return texts + ["def f(x):\n    return x + 1\n", "for i in range(10): print(i)", "2024-01-01 12:30 3.14 1,000"] * 20


# ---------------------------------------------------------------------------------------------
# tokenizers


def bpe_tokenizer(split_regex: str, specials: list[str], vocab_size: int, *, nfc: bool, bos: str | None = None) -> Any:
    """A byte-level BPE with a Split(regex) + ByteLevel pre-tokenizer (Qwen2/Qwen3, Llama 3), specials after the merges."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])  # fmt: skip
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    byte_level = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_special_tokens(specials)
    if bos is None:
        tok.post_processor = byte_level
    else:  # Llama 3: BOS prepended by the post-processor
        template = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                 special_tokens=[(bos, tok.token_to_id(bos))])
        tok.post_processor = processors.Sequence([byte_level, template])
    return tok


def spm_model(vocab_size: int, *, pieces: dict[str, int | str], user_defined: list[str], control: list[str],
              dummy_prefix: bool) -> bytes:
    """A SentencePiece BPE model with byte fallback, trained on the demo dataset, with the released
    models' options: no normalisation, whitespace kept as is, digits split; a dummy prefix space for
    Llama 2 / Mistral, none for Gemma."""
    import sentencepiece as spm

    out = io.BytesIO()
    options = dict(add_dummy_prefix=dummy_prefix, remove_extra_whitespaces=False, normalization_rule_name="identity",
                   split_digits=True, allow_whitespace_only_pieces=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=out, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=0.98, user_defined_symbols=user_defined, control_symbols=control,
        minloglevel=2, num_threads=1, **pieces, **options,
    )
    return out.getvalue()


def _added_entry(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}


def hf_tokenizer_from_spm(model_dir: Path, tokenizer_class: str, config: dict[str, Any], specials: list[str]) -> None:
    """tokenizer.json as transformers converts the folder's tokenizer.model, and a tokenizer_config.json
    written the way the released checkpoints have it (``specials`` listed in added_tokens_decoder)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    (model_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": tokenizer_class, **config}))
    AutoTokenizer.from_pretrained(model_dir, local_files_only=True).save_pretrained(model_dir)
    proc = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    added = {str(proc.PieceToId(name)): _added_entry(name) for name in specials}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": added, "clean_up_tokenization_spaces": False, "model_max_length": 512,
         "spaces_between_special_tokens": False, "tokenizer_class": tokenizer_class, **config},
        indent=2, ensure_ascii=False), encoding="utf-8")  # fmt: skip
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    (model_dir / "special_tokens_map.json").unlink(missing_ok=True)


def write_bpe_tokenizer(model_dir: Path, tok: Any, config: dict[str, Any]) -> None:
    specials = {t.content: t for t in tok.get_added_tokens_decoder().values()}
    added = {str(tok.token_to_id(name)): _added_entry(name) for name in specials}
    (model_dir / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps({"added_tokens_decoder": added, "clean_up_tokenization_spaces": False, "model_max_length": 512,
                    "errors": "replace", "split_special_tokens": False, **config}, indent=2, ensure_ascii=False),
        encoding="utf-8",
    )


# ---------------------------------------------------------------------------------------------
# models


def _randomise(model: Any, seed: int, norm_center: float) -> None:
    """Random weights with visible structure: larger than the init scale, norms around ``norm_center``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(norm_center + 0.3 * torch.randn(param.shape, generator=gen))
            elif param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.08)


def save_model(model_dir: Path, config: Any, model_class: Any, seed: int, norm_center: float,
               generation: dict[str, Any]) -> None:
    import torch
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32).eval()
    _randomise(model, seed, norm_center)
    model.generation_config = GenerationConfig(do_sample=False, **generation)
    model.save_pretrained(model_dir, safe_serialization=True)


def build_qwen3(out: Path, seed: int = 0) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = bpe_tokenizer(QWEN2_SPLIT_REGEX, specials, 1200, nfc=True)
    ids = {s: tok.token_to_id(s) for s in specials}
    config = Qwen3Config(vocab_size=tok.get_vocab_size(), **SHAPE, head_dim=96, rms_norm_eps=1e-6, rope_theta=1e6,
                         tie_word_embeddings=True, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"])
    out.mkdir(parents=True)
    save_model(out, config, Qwen3ForCausalLM, seed, 1.0,
               {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                "pad_token_id": ids["<|endoftext|>"]})
    write_bpe_tokenizer(out, tok, {"add_bos_token": False, "add_prefix_space": False, "bos_token": None,
                                   "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
                                   "tokenizer_class": "Qwen2Tokenizer", "chat_template": CHATML_TEMPLATE})
    return out


def build_llama3(out: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = bpe_tokenizer(LLAMA3_SPLIT_REGEX, specials, 1200, nfc=False, bos="<|begin_of_text|>")
    ids = {s: tok.token_to_id(s) for s in specials}
    # head_dim 64, base 500000, original context 64: the wavelengths of rotary pairs 3-5 fall in the
    # interpolated band (16 to 64 positions), the longer ones are divided by the full factor.
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), **SHAPE, rms_norm_eps=1e-5, rope_parameters=rope,
                         tie_word_embeddings=False, bos_token_id=ids["<|begin_of_text|>"],
                         eos_token_id=ids["<|eot_id|>"])
    out.mkdir(parents=True)
    save_model(out, config, LlamaForCausalLM, seed, 1.0,
               {"bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]]})
    # Llama 3 decodes with the space clean-up (" !" -> "!"), which llama.cpp applies for llama-bpe too.
    write_bpe_tokenizer(out, tok, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                   "clean_up_tokenization_spaces": True, "tokenizer_class": "PreTrainedTokenizerFast",
                                   "chat_template": LLAMA3_TEMPLATE})
    return out


GEMMA_PIECES = {"pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3, "pad_piece": "<pad>", "eos_piece": "<eos>",
                "bos_piece": "<bos>", "unk_piece": "<unk>"}


def _gemma_tokenizer(out: Path) -> dict[str, int]:
    """Gemma's layout: <pad> <eos> <bos> <unk>, then <start_of_turn>/<end_of_turn> as user-defined pieces."""
    import sentencepiece as spm

    out.mkdir(parents=True)
    turns = ["<mask>", "<start_of_turn>", "<end_of_turn>"]
    (out / "tokenizer.model").write_bytes(
        spm_model(1200, pieces=GEMMA_PIECES, user_defined=turns, control=[], dummy_prefix=False)
    )
    proc = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    hf_tokenizer_from_spm(out, "GemmaTokenizer", {
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>",
        "add_bos_token": True, "add_eos_token": False, "chat_template": GEMMA_TEMPLATE,
    }, ["<pad>", "<eos>", "<bos>", "<unk>", *turns])  # fmt: skip
    return {p: proc.PieceToId(p) for p in ("<pad>", "<eos>", "<bos>", "<end_of_turn>")}


def _gemma_generation(ids: dict[str, int]) -> dict[str, Any]:
    return {"bos_token_id": ids["<bos>"], "eos_token_id": [ids["<eos>"], ids["<end_of_turn>"]], "pad_token_id": ids["<pad>"]}


def _gemma_ids(ids: dict[str, int]) -> dict[str, int]:
    return {"bos_token_id": ids["<bos>"], "eos_token_id": ids["<eos>"], "pad_token_id": ids["<pad>"]}


def build_gemma2(out: Path, seed: int = 0) -> Path:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    ids = _gemma_tokenizer(out)
    # Softcapping values small enough to bend these logits; a 16-token window inside the 64-token comparison.
    config = Gemma2Config(vocab_size=1200, **SHAPE, head_dim=64, query_pre_attn_scalar=64, sliding_window=16,
                          attn_logit_softcapping=5.0, final_logit_softcapping=3.0, rms_norm_eps=1e-6,
                          rope_theta=10000.0, tie_word_embeddings=True, **_gemma_ids(ids))
    save_model(out, config, Gemma2ForCausalLM, seed, 0.0, _gemma_generation(ids))
    return out


def build_gemma3(out: Path, seed: int = 0) -> Path:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    ids = _gemma_tokenizer(out)
    # 6 layers: 5 with the sliding window (local RoPE base 10000), the 6th global (base 1e6), as llama.cpp's pattern.
    rope = {"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
    config = Gemma3TextConfig(vocab_size=1200, **{**SHAPE, "num_hidden_layers": 6}, head_dim=64,
                              query_pre_attn_scalar=64, sliding_window=16, rms_norm_eps=1e-6, rope_parameters=rope,
                              tie_word_embeddings=True, **_gemma_ids(ids))
    config.architectures = ["Gemma3ForCausalLM"]
    save_model(out, config, Gemma3ForCausalLM, seed, 0.0, _gemma_generation(ids))
    return out


def build_mistral(out: Path, seed: int = 0) -> Path:
    import sentencepiece as spm
    from transformers import MistralConfig, MistralForCausalLM

    out.mkdir(parents=True)
    pieces = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1}
    (out / "tokenizer.model").write_bytes(
        spm_model(1200, pieces=pieces, user_defined=[], control=["[INST]", "[/INST]"], dummy_prefix=True)
    )
    proc = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    hf_tokenizer_from_spm(out, "LlamaTokenizer", {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
        "legacy": True, "chat_template": MISTRAL_TEMPLATE,
    }, ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"])  # fmt: skip
    _legacy_spm_tokenizer_json(out)
    config = MistralConfig(vocab_size=proc.vocab_size(), **SHAPE, head_dim=64, rms_norm_eps=1e-5, rope_theta=1e6,
                           sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    save_model(out, config, MistralForCausalLM, seed, 1.0, {"bos_token_id": 1, "eos_token_id": 2})
    return out


PHI3_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]


def _legacy_spm_tokenizer_json(out: Path) -> None:
    """The released Mistral / Llama 2 / Phi-3 tokenizer.json prepend the space marker to every text
    segment, also one that starts with a space or follows a special token (a normalizer, no
    pre-tokenizer), as SentencePiece's dummy prefix and llama.cpp do; transformers 5 writes a
    Metaspace pre-tokenizer instead, which skips the marker before a leading space."""
    tok_json = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    tok_json["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    tok_json["pre_tokenizer"] = None
    (out / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False), encoding="utf-8")


def build_phi3(out: Path, seed: int = 0) -> Path:
    """Phi-3 mini 128k's layout: Llama 2 style SentencePiece + added chat tokens after it, an embedding
    padded beyond the tokenizer, fused qkv/gate_up, LongRoPE factors (the short ones apply up to the
    original 512-token context; non-trivial here so the comparison sees them)."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import Phi3Config, Phi3ForCausalLM

    out.mkdir(parents=True)
    pieces = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1}
    (out / "tokenizer.model").write_bytes(spm_model(1200, pieces=pieces, user_defined=[], control=[], dummy_prefix=True))
    config = {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<|endoftext|>",
              "add_bos_token": False, "add_eos_token": False, "legacy": True, "chat_template": PHI3_TEMPLATE}
    hf_tokenizer_from_spm(out, "LlamaTokenizer", config, ["<unk>", "<s>", "</s>"])
    _legacy_spm_tokenizer_json(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in PHI3_ADDED])
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in PHI3_ADDED}
    tok_config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok_config["added_tokens_decoder"].update({str(ids[t]): _added_entry(t) for t in PHI3_ADDED})
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False), encoding="utf-8")
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 512,
            "short_factor": [1.0 + 0.03 * i for i in range(32)], "long_factor": [1.0 + 0.5 * i for i in range(32)]}
    phi = Phi3Config(vocab_size=1216, **{**SHAPE, "max_position_embeddings": 1024}, original_max_position_embeddings=512,
                     rope_parameters=rope, rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False,
                     bos_token_id=1, eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"])
    save_model(out, phi, Phi3ForCausalLM, seed, 1.0,
               {"bos_token_id": 1, "eos_token_id": [ids["<|endoftext|>"], ids["<|end|>"]], "pad_token_id": ids["<|endoftext|>"]})
    return out


LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

FAMILIES: dict[str, Family] = {f.key: f for f in (
    Family("qwen3", "Qwen3ForCausalLM", "qwen3", "qwen2", LLAMA_LINEAR, build_qwen3, ("<|im_end|>", "<|endoftext|>"),
           "<|im_end|>"),
    Family("llama3", "LlamaForCausalLM", "llama", "llama-bpe", LLAMA_LINEAR, build_llama3,
           ("<|end_of_text|>", "<|eot_id|>"), "<|eot_id|>"),
    Family("gemma2", "Gemma2ForCausalLM", "gemma2", "default", LLAMA_LINEAR, build_gemma2, ("<eos>", "<end_of_turn>"),
           "<end_of_turn>"),
    Family("gemma3", "Gemma3ForCausalLM", "gemma3", "default", LLAMA_LINEAR, build_gemma3, ("<eos>", "<end_of_turn>"),
           "<end_of_turn>"),
    Family("mistral", "MistralForCausalLM", "llama", "default", LLAMA_LINEAR, build_mistral, ("</s>",), "</s>"),
    Family("phi3", "Phi3ForCausalLM", "phi3", "default", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
           build_phi3, ("<|endoftext|>", "<|end|>"), "<|end|>"),
)}  # fmt: skip


def ending_turns_at_once(src: Path, out: Path, token_id: int, prompts: list[list[int]], lead: float = 8.0) -> Path:
    """A copy of the model at ``src`` whose greedy answer to each of ``prompts`` (token ids) is
    ``token_id`` at once: the random models never end a turn by themselves, and a test of stop
    tokens needs one that does. That token's row of the output head is moved along the final hidden
    state at the prompts' ends until its logit leads every other by ``lead`` (before any softcapping);
    a tied head moves the input embedding too, so the lead is measured again after each move."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, local_files_only=True).eval()
    head = model.get_output_embeddings()
    seen: list[Any] = []
    hook = head.register_forward_hook(lambda module, args, output: seen.append(args[0][0, -1].detach().clone()))
    for _ in range(5):
        seen.clear()
        with torch.no_grad():
            for ids in prompts:
                model(torch.tensor([ids]))
        hidden = torch.stack(seen)
        raw = hidden @ head.weight.T
        leads = raw[:, token_id] - raw.index_fill(1, torch.tensor([token_id]), float("-inf")).max(1).values
        if leads.min() >= lead:
            break
        direction = hidden.mean(0) / hidden.mean(0).norm()
        along = hidden @ direction
        assert along.min() > 0, f"{src}: the prompts' final hidden states share no direction"
        with torch.no_grad():
            head.weight[token_id] += direction * ((lead + 1 - leads) / along).max()
    else:
        raise AssertionError(f"{src}: token {token_id} still leads by only {leads.min():.2f} after 5 moves")
    hook.remove()
    shutil.copytree(src, out)
    model.save_pretrained(out, safe_serialization=True)
    return out
