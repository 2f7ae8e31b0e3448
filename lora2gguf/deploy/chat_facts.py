"""What a GGUF says about chatting with it: its chat template, special tokens and context length.

Read through the one GGUF reader (formats.gguf). Every deploy artifact (Modelfile, deploy notes,
chat parity) starts from these facts so that all of them describe the same file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora2gguf.artifacts import read_json
from lora2gguf.errors import Lora2ggufError
from lora2gguf.formats.gguf import read_gguf, string_array

TEMPLATE_KEY = "tokenizer.chat_template"


@dataclass(frozen=True)
class ChatFacts:
    path: Path
    architecture: str
    template: str | None
    tokens: list[str]
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    add_bos: bool
    context_length: int | None

    def token(self, token_id: int | None) -> str:
        """The text of a token id ("" for None or an id outside the vocabulary)."""
        if token_id is None or not 0 <= token_id < len(self.tokens):
            return ""
        return self.tokens[token_id]

    def token_id(self, text: str) -> int | None:
        try:
            return self.tokens.index(text)
        except ValueError:
            return None


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def read_chat_facts(path: Path) -> ChatFacts:
    """The chat facts of a GGUF; a file without a token list cannot be chatted with."""
    gguf = read_gguf(path)
    meta = gguf.metadata
    tokens = string_array(gguf, "tokenizer.ggml.tokens")
    if not tokens:
        raise Lora2ggufError(f"{path}: tokenizer.ggml.tokens: missing or not UTF-8 (no vocabulary to chat with)")
    arch = str(meta.get("general.architecture") or "")
    template = meta.get(TEMPLATE_KEY)
    if template is not None and not isinstance(template, str):
        raise Lora2ggufError(f"{path}: {TEMPLATE_KEY}: not a string")
    return ChatFacts(
        path=Path(path),
        architecture=arch,
        template=template,
        tokens=tokens,
        bos_id=_int_or_none(meta.get("tokenizer.ggml.bos_token_id")),
        eos_id=_int_or_none(meta.get("tokenizer.ggml.eos_token_id")),
        eot_id=_int_or_none(meta.get("tokenizer.ggml.eot_token_id")),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        context_length=_int_or_none(meta.get(f"{arch}.context_length")),
    )


def generation_eos_ids(model_dir: Path | None) -> list[int]:
    """generation_config.json's eos_token_id of a Hugging Face folder (an int or a list: chat models
    often list their end-of-turn token there, not in the tokenizer); [] without one."""
    if model_dir is None or not (model_dir / "generation_config.json").is_file():
        return []
    value = read_json(model_dir / "generation_config.json").get("eos_token_id")
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise Lora2ggufError(f"{model_dir / 'generation_config.json'}: eos_token_id: expected an integer or a list of integers")
    return [int(v) for v in values]
