"""Tokenizer metadata for SentencePiece vocabularies (``tokenizer.model``: Llama 1/2, Mistral, Gemma).

Written as llama.cpp's converter writes them (``_create_vocab_sentencepiece``): tokenizer.ggml.model
``llama``, pre ``default``, one token, score and type per embedding row (unknown / control / unused /
byte pieces typed from the model, rows beyond it ``[PADn]`` with score -10000), then the added tokens
of ``added_tokens.json`` and of tokenizer_config.json's ``added_tokens_decoder`` over them (score
-1000; control when flagged special or when they look like control tokens, else user-defined with
the SentencePiece space marker stored as a space; Phi-3's converter differs slightly, see
``_added_tokens``), and gguf-py's ``SpecialVocab`` (special ids, add_bos/add_eos, chat template).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import gguf

from lora2gguf.errors import Lora2ggufError

logger = logging.getLogger(__name__)

# The SentencePiece space marker, stored as a space in user-defined added tokens.
SPACE_MARKER = "\u2581"
PAD_SCORE = -10000.0
ADDED_SCORE = -1000.0


def looks_special(text: str) -> bool:
    """Added tokens some tokenizers forget to flag as special (llama.cpp's does_token_look_special)."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def _load_processor(path: Path) -> Any:
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise Lora2ggufError(
            f"{path}: a SentencePiece vocabulary needs the 'sentencepiece' package (pip install sentencepiece)"
        ) from None
    processor = SentencePieceProcessor()
    try:
        processor.LoadFromFile(str(path))
    except (OSError, RuntimeError) as exc:
        raise Lora2ggufError(f"{path}: not a SentencePiece model: {exc}") from None
    return processor


def _piece_type(processor: Any, token_id: int) -> gguf.TokenType:
    if processor.IsUnknown(token_id):
        return gguf.TokenType.UNKNOWN
    if processor.IsControl(token_id):
        return gguf.TokenType.CONTROL
    if processor.IsUnused(token_id):
        return gguf.TokenType.UNUSED
    if processor.IsByte(token_id):
        return gguf.TokenType.BYTE
    return gguf.TokenType.NORMAL


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Lora2ggufError(f"{path}: cannot read: {exc}") from None


def _check_id(path: Path, key: str, token_id: Any, vocab_size: int) -> int:
    if isinstance(token_id, str) and token_id.isdigit():
        token_id = int(token_id)
    if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
        raise Lora2ggufError(f"{path}: key {key!r} has an invalid token id {token_id!r}")
    if token_id >= vocab_size:
        raise Lora2ggufError(
            f"{path}: key {key!r} has token id {token_id}, but config.json's vocab_size is {vocab_size}: the "
            "embedding matrix must have a row for every token (resize the embeddings after adding tokens)"
        )
    return token_id


class SpmTable:
    """Tokens, scores and types, one per embedding row."""

    def __init__(self, vocab_size: int) -> None:
        self.tokens = [f"[PAD{i}]" for i in range(vocab_size)]
        self.scores = [PAD_SCORE] * vocab_size
        self.types = [int(gguf.TokenType.UNUSED)] * vocab_size
        self.filled = [False] * vocab_size

    @property
    def n_padding(self) -> int:
        return self.filled.count(False)

    def set(self, token_id: int, text: str, score: float, kind: gguf.TokenType) -> None:
        self.filled[token_id] = True
        self.tokens[token_id] = text
        self.scores[token_id] = float(score)
        self.types[token_id] = int(kind)


def _model_pieces(path: Path, table: SpmTable, vocab_size: int) -> int:
    processor = _load_processor(path)
    n_pieces = processor.vocab_size()
    if n_pieces > vocab_size:
        raise Lora2ggufError(
            f"{path}: the SentencePiece model has {n_pieces} pieces but config.json's vocab_size is {vocab_size}"
        )
    for token_id in range(n_pieces):
        table.set(token_id, processor.IdToPiece(token_id), processor.GetScore(token_id), _piece_type(processor, token_id))
    return n_pieces


def _added_tokens_json(model_dir: Path, table: SpmTable, vocab_size: int) -> int:
    added_path = model_dir / "added_tokens.json"
    if not added_path.is_file():
        return 0
    added = _read_json(added_path)
    if not isinstance(added, dict):
        raise Lora2ggufError(f"{added_path}: not a JSON object of token -> id")
    for text, token_id in added.items():
        table.set(_check_id(added_path, text, token_id, vocab_size), text, ADDED_SCORE, gguf.TokenType.USER_DEFINED)
    return len(added)


def _listed_added_tokens(model_dir: Path, phi3: bool) -> list[tuple[Path, str, Any, Any]]:
    """(file, key, id, entry) of the added tokens listed in tokenizer_config.json's added_tokens_decoder,
    and for Phi-3 also of tokenizer.json's added_tokens (read after them, as its converter does)."""
    listed: list[tuple[Path, str, Any, Any]] = []
    config_path = model_dir / "tokenizer_config.json"
    decoder = (_read_json(config_path) if config_path.is_file() else {}).get("added_tokens_decoder") or {}
    listed += [(config_path, f"added_tokens_decoder.{k}", k, v) for k, v in decoder.items()]
    json_path = model_dir / "tokenizer.json"
    if phi3 and json_path.is_file():
        added = _read_json(json_path).get("added_tokens") or []
        listed += [(json_path, "added_tokens", e.get("id") if isinstance(e, dict) else None, e) for e in added]
    return listed


def _added_tokens(model_dir: Path, table: SpmTable, vocab_size: int, phi3: bool) -> int:
    """added_tokens.json, then the listed added tokens, over the model's pieces.

    llama.cpp's generic reading makes a listed token a control token when it is flagged special or
    looks like one, else a user-defined token with the space marker stored as a space; its Phi-3
    reading goes by the special flag alone and keeps the text as it is."""
    n_added = _added_tokens_json(model_dir, table, vocab_size)
    for path, key, token_id, data in _listed_added_tokens(model_dir, phi3):
        token_id = _check_id(path, key, token_id, vocab_size)
        text = data.get("content") if isinstance(data, dict) else None
        if not isinstance(text, str):
            raise Lora2ggufError(f"{path}: key {key!r} has no string 'content'")
        if table.types[token_id] != gguf.TokenType.UNUSED and table.tokens[token_id] != text:
            logger.warning("%s: added token %d replaces piece %r with %r", path, token_id, table.tokens[token_id], text)
        if data.get("special") or (not phi3 and looks_special(text)):
            table.set(token_id, text, ADDED_SCORE, gguf.TokenType.CONTROL)
        else:
            # llama.cpp matches user-defined tokens as raw text: a space marker would never match.
            user_text = text if phi3 else text.replace(SPACE_MARKER, " ")
            table.set(token_id, user_text, ADDED_SCORE, gguf.TokenType.USER_DEFINED)
        n_added += 1
    return n_added


def read_spm_vocab(model_dir: Path, vocab_size: int, *, phi3: bool = False) -> tuple[SpmTable, int, int]:
    """(the token table, number of added-token entries, number of padding rows) of ``model_dir``;
    ``phi3`` reads the added tokens as llama.cpp's Phi-3 converter does."""
    table = SpmTable(vocab_size)
    n_pieces = _model_pieces(model_dir / "tokenizer.model", table, vocab_size)
    n_added = _added_tokens(model_dir, table, vocab_size, phi3)
    logger.debug("%s: %d SentencePiece pieces, %d added entries, %d padding rows", model_dir, n_pieces, n_added, table.n_padding)
    return table, n_added, table.n_padding
