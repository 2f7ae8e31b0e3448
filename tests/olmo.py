"""A tiny random ``OlmoForCausalLM``: an architecture lora2gguf has no native converter for, so that
``lora2gguf convert --backend auto`` has to run llama.cpp's own ``convert_hf_to_gguf.py``.

OLMo (allenai/OLMo-1B-hf, OLMo-7B-hf) is a llama-like decoder with LayerNorms that have no weights
and GPT-NeoX's tokenizer: a byte-level BPE whose whole pre-tokenization is ByteLevel with the GPT-2
split regex (llama.cpp's "olmo" pre-tokenizer uses that same regex). The tokenizer here is trained
on the demo dataset in that format, with GPT-NeoX's special tokens first (<|endoftext|> = 0,
<|padding|> = 1), and OLMo-Instruct's chat format (<|user|> / <|assistant|> turns, EOS after each
answer). Shapes are the tiny Qwen2's (lora2gguf.demo.tiny) for the same quantization coverage.
"""

from __future__ import annotations

import json
from pathlib import Path

from lora2gguf.artifacts import atomic_dir
from lora2gguf.demo.tiny import DEFAULT_VOCAB_SIZE, TINY_SHAPE, _training_corpus

EOS = "<|endoftext|>"
PAD = "<|padding|>"
CHAT_TEMPLATE = (
    "{{ eos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def train_neox_style_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOS, PAD],
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer=trainer)
    return tokenizer


def _tokenizer_config() -> dict:
    added = {
        str(i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        for i, tok in enumerate((EOS, PAD))
    }
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "model_max_length": TINY_SHAPE["max_position_embeddings"],
        "pad_token": PAD,
        "tokenizer_class": "GPTNeoXTokenizer",
        "unk_token": None,
    }


def build_tiny_olmo(out_dir: Path, seed: int = 0, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Write the tiny OLMo folder (weights, config, tokenizer files) at ``out_dir``; same seed, same files."""
    import torch
    from transformers import GenerationConfig, OlmoConfig, OlmoForCausalLM

    tokenizer = train_neox_style_tokenizer(vocab_size)
    eos, pad = tokenizer.token_to_id(EOS), tokenizer.token_to_id(PAD)
    config = OlmoConfig(
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        **TINY_SHAPE,
        hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=pad,
        initializer_range=0.02,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = OlmoForCausalLM(config).to(torch.float32).eval()
    finally:
        torch.random.set_rng_state(state)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, do_sample=False)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2) + "\n", encoding="utf-8")
        (tmp / "special_tokens_map.json").write_text(
            json.dumps({"eos_token": EOS, "pad_token": PAD}, indent=2) + "\n", encoding="utf-8"
        )
    return Path(out_dir)
