"""Tokenizer metadata: byte-level BPE (GPT-2 style) vocabularies read from ``tokenizer.json`` here,
SentencePiece ones (``tokenizer.model``) in :mod:`lora2gguf.convert.vocab_spm`; the family's spec says which.

Written keys: tokenizer.ggml.model (gpt2), .pre, .tokens, .token_type, .merges, special token ids
(bos/eos/pad/...), add_bos_token/add_eos_token, and tokenizer.chat_template. The token list and
types are built from the JSON itself (no transformers, no torch); merges, special ids and the chat
template come from gguf-py's ``SpecialVocab``, which accepts both merge forms ("a b" strings and
two-string lists, the latter since transformers 4.45).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from lora2gguf.archs import ArchSpec
from lora2gguf.convert.vocab_spm import looks_special, read_spm_vocab
from lora2gguf.errors import Lora2ggufError

logger = logging.getLogger(__name__)

# Pre-tokenizer split regexes as they appear in tokenizer.json (facts about the public tokenizers).
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# llama.cpp's converter identifies known vocabularies by the sha256 of str(token ids) of this check
# text (get_vocab_base_pre in convert_hf_to_gguf.py). For the unmodified vocabularies of the
# families we convert we use the same table, so the name we write is the one llama.cpp would write;
# a retrained or extended vocabulary falls back to recognising the pre_tokenizer's structure.
_CHECK_TEXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
_KNOWN_VOCABS = {
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",  # StarCoder2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # GPT-2
}


def vocab_fingerprint(tokenizer_json: Path) -> str:
    """llama.cpp's vocabulary hash: sha256 of the check text's token ids (with post-processing)."""
    from tokenizers import Tokenizer

    try:
        ids = Tokenizer.from_file(str(tokenizer_json)).encode(_CHECK_TEXT, add_special_tokens=True).ids
    except Exception as exc:  # the tokenizers library raises plain Exceptions for bad files
        raise Lora2ggufError(f"{tokenizer_json}: the tokenizers library cannot load it: {exc}") from None
    return hashlib.sha256(str(ids).encode()).hexdigest()


def choose_pre_tokenizer(tokenizer: dict[str, Any], tokenizer_config: dict[str, Any], path: Path) -> str:
    """llama.cpp's name for a known vocabulary, else the one matching the pre_tokenizer structure."""
    fingerprint = vocab_fingerprint(path)
    known = _KNOWN_VOCABS.get(fingerprint)
    if known is not None:
        logger.debug("%s: vocabulary hash %s is llama.cpp's %r", path, fingerprint, known)
        return known
    pre = identify_pre_tokenizer(tokenizer, tokenizer_config, path)
    logger.info("%s: vocabulary not in llama.cpp's hash table (%s); pre-tokenizer %r from its structure", path, fingerprint[:12], pre)
    return pre


@dataclass
class VocabInfo:
    tokens: list[str]
    token_types: list[int]
    pre: str
    add_space_prefix: bool | None
    special: gguf.SpecialVocab
    n_added: int
    n_padding: int
    model: str = "gpt2"  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    scores: list[float] | None = None  # SentencePiece piece scores
    forced_add_space_prefix: bool | None = None  # written after the vocabulary (Gemma)


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Lora2ggufError(f"{path}: not found (the converter needs the tokenizer files next to the weights)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Lora2ggufError(f"{path}: cannot read: {exc}") from None


def _split_pattern(step: dict[str, Any]) -> str | None:
    pattern = step.get("pattern") or {}
    return pattern.get("Regex") if isinstance(pattern, dict) else None


def identify_pre_tokenizer(tokenizer: dict[str, Any], tokenizer_config: dict[str, Any], path: Path) -> str:
    """Name llama.cpp's pre-tokenizer that reproduces this tokenizer.json's pre-tokenization.

    llama.cpp's own converter recognises a pre-tokenizer by hashing the token ids of a fixed text,
    which only works for vocabularies it has seen (a retrained or extended vocabulary gets a new
    hash and is refused). The pre-tokenizer is a property of the ``pre_tokenizer`` section alone,
    so we recognise that section's structure instead; the names are llama.cpp's
    (``src/llama-vocab.cpp``), and the tokenization parity tests check the choice end to end.
    """
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    steps = [s for s in steps or [] if isinstance(s, dict)]
    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is not None and not byte_level.get("add_prefix_space", False):
        if kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True):
            split = steps[0]
            regex = _split_pattern(split)
            if split.get("behavior") == "Isolated" and not split.get("invert", False):
                if regex == _QWEN2_REGEX:
                    return "qwen2"
                if regex == _LLAMA3_REGEX:
                    return "llama-bpe"
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level.get("use_regex", True):
            # \p{N} split followed by the GPT-2 regex. llama.cpp has several names for this split
            # that differ only in whether decoding cleans up spaces: "smollm" does not (as SmolLM's
            # tokenizer_config says), "starcoder" does.
            if tokenizer_config.get("clean_up_tokenization_spaces") is True:
                return "starcoder"
            return "smollm"
        if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
            return "gpt-2"
    raise Lora2ggufError(
        f"{path}: key 'pre_tokenizer' ({json.dumps(pre)[:300]}) does not match a pre-tokenizer llama.cpp "
        "implements (recognised: qwen2, llama-bpe, smollm/starcoder, gpt-2); converting it anyway would "
        "tokenize differently in llama.cpp"
    )


def _read_tokenizer(model_dir: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """tokenizer.json, tokenizer_config.json (empty when absent) and the BPE model's vocab, checked."""
    tok_path = model_dir / "tokenizer.json"
    tokenizer = _load_json(tok_path)
    cfg_path = model_dir / "tokenizer_config.json"
    tokenizer_config = _load_json(cfg_path) if cfg_path.is_file() else {}
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE":
        raise Lora2ggufError(
            f"{tok_path}: key 'model.type' is {model.get('type')!r}; only byte-level BPE tokenizers are supported"
        )
    if model.get("byte_fallback"):
        raise Lora2ggufError(f"{tok_path}: key 'model.byte_fallback' is true (a sentencepiece-style BPE); not supported")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise Lora2ggufError(f"{tok_path}: key 'model.vocab' is missing or empty")
    return tokenizer, tokenizer_config, vocab


def _tokens_by_id(
    tok_path: Path, tokenizer: dict[str, Any], vocab: dict[str, Any]
) -> tuple[dict[int, str], dict[int, dict[str, Any]]]:
    """Every token's text by id (model vocab, then added tokens over it), and the added tokens' entries."""
    by_id: dict[int, str] = {}
    for text, idx in vocab.items():
        if not isinstance(idx, int) or idx < 0:
            raise Lora2ggufError(f"{tok_path}: key 'model.vocab' maps {text!r} to invalid id {idx!r}")
        if idx in by_id:
            raise Lora2ggufError(f"{tok_path}: key 'model.vocab' gives id {idx} to both {by_id[idx]!r} and {text!r}")
        by_id[idx] = text
    added: dict[int, dict[str, Any]] = {}
    for entry in tokenizer.get("added_tokens") or []:
        idx = entry.get("id")
        if not isinstance(idx, int) or not isinstance(entry.get("content"), str):
            raise Lora2ggufError(f"{tok_path}: key 'added_tokens' has a malformed entry {entry!r}")
        added[idx] = entry
        by_id[idx] = entry["content"]
    return by_id, added


def _token_table(
    by_id: dict[int, str], added: dict[int, dict[str, Any]], vocab_size: int
) -> tuple[list[str], list[int], int]:
    """One token and type per embedding row, and how many rows are padding."""
    tokens: list[str] = []
    types: list[int] = []
    n_padding = 0
    for idx in range(vocab_size):
        text = by_id.get(idx)
        if text is None:
            # Embedding rows beyond the tokenizer (Qwen pads its matrix to a multiple of 128):
            # llama.cpp needs one entry per row; these can never be produced by tokenization.
            tokens.append(f"[PAD{idx}]")
            types.append(gguf.TokenType.UNUSED)
            n_padding += 1
        elif idx in added:
            if added[idx].get("special") or looks_special(text):
                types.append(gguf.TokenType.CONTROL)
            else:
                # User-defined tokens are matched as raw text by llama.cpp; a sentencepiece-style
                # space marker would never match, so store it as a space.
                text = text.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
            tokens.append(text)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types], n_padding


def _special_vocab(model_dir: Path, tok_path: Path, vocab_size: int, tokenizer: dict[str, Any]) -> gguf.SpecialVocab:
    """Merges, special token ids, add_bos/add_eos and the chat template, via gguf-py."""
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise Lora2ggufError(f"{tok_path}: key 'model.merges' is missing or empty; llama.cpp cannot load a BPE vocabulary without merges")
    # State whether BOS/EOS are added explicitly. HF byte-level tokenizers (Qwen2, SmolLM2) add
    # neither unless tokenizer_config/post_processor say so (SpecialVocab has already read those);
    # leaving the key out would let llama.cpp apply its own default instead. The gguf-py vendored with
    # llama.cpp sets these defaults when it meets the ByteLevel post-processor step, so when that step
    # comes first (Llama 3: ByteLevel, then the BOS template) the two keys come first as well.
    flags = special.add_special_token
    steps = [(p or {}).get("type") for p in _post_processors(tokenizer)]
    byte_level_first = "ByteLevel" in steps and all(
        t not in ("TemplateProcessing", "RobertaProcessing") for t in steps[: steps.index("ByteLevel")]
    )
    if byte_level_first:
        ordered = {"bos": flags.get("bos", False), "eos": flags.get("eos", False)}
        special.add_special_token = {**ordered, **{k: v for k, v in flags.items() if k not in ordered}}
    else:
        flags.setdefault("bos", False)
        flags.setdefault("eos", False)
    if special.chat_template is None:
        logger.warning("%s: no chat template found (tokenizer_config.json / chat_template.jinja)", model_dir)
    return special


def _post_processors(tokenizer: dict[str, Any]) -> list[dict[str, Any]]:
    post = tokenizer.get("post_processor") or {}
    steps = post.get("processors", [post]) if isinstance(post, dict) else []
    return [s for s in steps if isinstance(s, dict)]


def uses_sentencepiece(model_dir: Path, spec: ArchSpec) -> bool:
    """Whether the family reads this folder's vocabulary from tokenizer.model (see ArchSpec.vocab)."""
    if spec.vocab == "spm-phi3":
        cfg_path = model_dir / "tokenizer_config.json"
        return not (cfg_path.is_file() and _load_json(cfg_path).get("tokenizer_class") == "GPT2Tokenizer")
    return spec.vocab == "spm" or (spec.vocab == "spm-or-bpe" and (model_dir / "tokenizer.model").is_file())


def build_vocab(model_dir: Path, spec: ArchSpec, vocab_size: int) -> VocabInfo:
    """Read the folder's tokenizer into GGUF tokenizer metadata, the way the family's llama.cpp converter does."""
    if uses_sentencepiece(model_dir, spec):
        return _build_spm_vocab(model_dir, spec, vocab_size)
    return _build_bpe_vocab(model_dir, spec, vocab_size)


def _add_space_prefix(model_dir: Path, spec: ArchSpec) -> bool | None:
    """tokenizer_config.json's add_prefix_space, for the families whose converter copies it (llama)."""
    cfg_path = model_dir / "tokenizer_config.json"
    if not spec.write_add_space_prefix or not cfg_path.is_file():
        return None
    value = _load_json(cfg_path).get("add_prefix_space")
    return value if isinstance(value, bool) else None


def _build_spm_vocab(model_dir: Path, spec: ArchSpec, vocab_size: int) -> VocabInfo:
    if not (model_dir / "tokenizer.model").is_file():
        raise Lora2ggufError(
            f"{model_dir / 'tokenizer.model'}: not found ({spec.name} models carry a SentencePiece vocabulary there)"
        )
    table, n_added, n_padding = read_spm_vocab(model_dir, vocab_size, phi3=spec.vocab == "spm-phi3")
    # As llama.cpp: no merges, and add_bos/add_eos only where the tokenizer files state them.
    special = gguf.SpecialVocab(model_dir, n_vocab=vocab_size)
    if special.chat_template is None:
        logger.warning("%s: no chat template found (tokenizer_config.json / chat_template.jinja)", model_dir)
    return VocabInfo(
        tokens=table.tokens,
        token_types=table.types,
        pre="default",
        add_space_prefix=_add_space_prefix(model_dir, spec),
        special=special,
        n_added=n_added,
        n_padding=n_padding,
        model="llama",
        scores=table.scores,
        forced_add_space_prefix=spec.forced_add_space_prefix,
    )


def _build_bpe_vocab(model_dir: Path, spec: ArchSpec, vocab_size: int) -> VocabInfo:
    """Read tokenizer.json (+ tokenizer_config.json) into GGUF tokenizer metadata."""
    tok_path = model_dir / "tokenizer.json"
    tokenizer, tokenizer_config, vocab = _read_tokenizer(model_dir)
    pre = choose_pre_tokenizer(tokenizer, tokenizer_config, tok_path)
    by_id, added = _tokens_by_id(tok_path, tokenizer, vocab)
    top = max(by_id)
    if top >= vocab_size:
        raise Lora2ggufError(
            f"{model_dir / 'config.json'}: key 'vocab_size' is {vocab_size} but {tok_path.name} has token id {top} "
            f"({by_id[top]!r}); the embedding matrix must have a row for every token (resize the embeddings "
            "after adding tokens)"
        )
    tokens, token_types, n_padding = _token_table(by_id, added, vocab_size)
    special = _special_vocab(model_dir, tok_path, vocab_size, tokenizer)
    return VocabInfo(
        tokens=tokens,
        token_types=token_types,
        pre=pre,
        add_space_prefix=_add_space_prefix(model_dir, spec),
        special=special,
        n_added=len(added),
        n_padding=n_padding,
        forced_add_space_prefix=spec.forced_add_space_prefix,
    )


def write_vocab(writer: gguf.GGUFWriter, info: VocabInfo) -> None:
    if info.add_space_prefix is not None:
        writer.add_add_space_prefix(info.add_space_prefix)
    writer.add_tokenizer_model(info.model)
    writer.add_tokenizer_pre(info.pre)
    writer.add_token_list(info.tokens)
    if info.scores is not None:
        writer.add_token_scores(info.scores)
    writer.add_token_types(info.token_types)
    info.special.add_to_gguf(writer, quiet=True)
    if info.forced_add_space_prefix is not None:
        writer.add_add_space_prefix(info.forced_add_space_prefix)
