"""A tiny, randomly initialised Qwen2 model with a BPE tokenizer trained on the demo dataset.

It exists so that every later step (merge, GGUF conversion, quantization, llama.cpp inference) can be
tested in seconds on a model of the real architecture. Shapes are chosen for quantization coverage:
hidden_size 256 makes the attention and gate/up rows a multiple of 256 (true K-quant super-blocks),
intermediate_size 320 makes ffn_down rows 320 long: a multiple of 32 but not of 256, so llama.cpp
falls back from K-quants to legacy types there.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lora2gguf.artifacts import atomic_dir
from lora2gguf.errors import Lora2ggufError
from lora2gguf.demo.dataset import SPLITS, load_dataset_split

logger = logging.getLogger(__name__)

# Qwen2's split pattern, as written in Qwen2's tokenizer.json; llama.cpp implements the same split
# under the pre-tokenizer name "qwen2".
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# Qwen2-style ChatML template (a default system turn when none is given).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

DEFAULT_VOCAB_SIZE = 1536
TINY_SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 320,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}


def _training_corpus() -> list[str]:
    """Every turn of the demo dataset (both splits, so eval text has no unknown pieces beyond bytes)."""

    texts = []
    for split in SPLITS:
        for record in load_dataset_split(split):
            texts.extend(turn["value"] for turn in record["conversations"])
    return texts


def train_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE):  # -> tokenizers.Tokenizer
    """Train a byte-level BPE with Qwen2's normalizer/pre-tokenizer/decoder on the demo dataset.

    The special tokens are appended after the learned vocabulary (as in Qwen2, where they follow the
    BPE tokens) so that ``vocab_size`` counts BPE tokens + 3 specials.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    n_specials = len(SPECIAL_TOKENS)
    if vocab_size < 256 + n_specials + 1:
        raise Lora2ggufError(f"tiny model: vocab_size {vocab_size} is below the 256 byte tokens + specials")
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_specials,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer=trainer)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def _tokenizer_json(tokenizer) -> str:
    """tokenizer.json text, with the ByteLevel decoder options spelled as in Qwen2's file.

    (The `tokenizers` decoder ignores these options when decoding; writing them as Qwen2 does keeps
    the file indistinguishable in structure from a real Qwen2 tokenizer.json.)
    """
    data = json.loads(tokenizer.to_str())
    data["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def _tokenizer_config(tokenizer) -> dict:
    added = {
        str(tokenizer.token_to_id(tok)): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for tok in SPECIAL_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": TINY_SHAPE["max_position_embeddings"],
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def build_tiny_qwen2(out_dir: Path, seed: int = 0, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Build the tiny Qwen2 model folder at ``out_dir`` (replaced atomically) and return its path.

    Same seed and library versions -> byte-identical files.
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(vocab_size)
    n_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    ids = {tok: tokenizer.token_to_id(tok) for tok in SPECIAL_TOKENS}
    config = Qwen2Config(
        vocab_size=n_vocab,
        **TINY_SHAPE,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=ids[ENDOFTEXT],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[ENDOFTEXT],
        initializer_range=0.02,
    )
    # A private generator keeps the weights independent of any global RNG use by the caller.
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.float32).eval()
    finally:
        torch.random.set_rng_state(state)
    generation = GenerationConfig(
        bos_token_id=ids[ENDOFTEXT],
        eos_token_id=[ids[IM_END], ids[ENDOFTEXT]],
        pad_token_id=ids[ENDOFTEXT],
        do_sample=False,
    )
    model.generation_config = generation
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "tokenizer.json").write_text(_tokenizer_json(tokenizer), encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(
            json.dumps(_tokenizer_config(tokenizer), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        (tmp / "special_tokens_map.json").write_text(
            json.dumps(
                {"additional_special_tokens": [IM_START, IM_END], "eos_token": IM_END, "pad_token": ENDOFTEXT},
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("tiny Qwen2: %d parameters, vocab %d, written to %s", n_params, n_vocab, out_dir)
    return out_dir
