"""The PyTorch side shared by the steps: device and dtype choice, loading a Hugging Face folder, logits,
greedy decoding.

torch and transformers are imported inside the functions (the CLI imports this module's callers at
start-up). Everything is local: no hub access, no remote code unless asked.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from lora2gguf.errors import Lora2ggufError
from lora2gguf.artifacts import read_json
from lora2gguf.formats.safetensors import read_header

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "float16", "bfloat16")


def select_device(requested: str, setting: str | None = None) -> str:
    """The torch device to run on: ``auto`` is CUDA when torch sees one, else the CPU.

    ``setting`` names the config key behind ``--device`` (e.g. ``merge.device``) for the message.
    """
    import torch

    where = f"--device {requested}" + (f" ({setting})" if setting else "")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise Lora2ggufError(f"{where}: CUDA is not available on this machine")
    if requested not in ("cpu",) and not requested.startswith("cuda"):
        raise Lora2ggufError(f"{where}: expected auto, cpu, cuda or cuda:N")
    return requested


def checkpoint_dtype(config: dict[str, Any]) -> str:
    """The weight dtype a checkpoint's config.json records, as one of DTYPES (float32 when it records none)."""
    # transformers 5 writes "dtype", older versions "torch_dtype"; missing means fp32 (the HF default).
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
    return name if name in DTYPES and name != "auto" else "float32"


def select_dtype(requested: str, device: str, model_dir: Path) -> Any:
    """auto: the checkpoint's own half-precision type on CUDA; float32 on CPU, where half precision is
    emulated and slower."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if not device.startswith("cuda"):
        return torch.float32
    stored = checkpoint_dtype(read_json(model_dir / "config.json"))
    if stored == "bfloat16" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return getattr(torch, stored)


def check_model_dir(model_dir: Path, allow_pickle: bool = False) -> None:
    if not model_dir.is_dir():
        raise Lora2ggufError(f"{model_dir}: model folder not found")
    if not (model_dir / "config.json").is_file():
        raise Lora2ggufError(f"{model_dir}: config.json missing (not a Hugging Face model folder)")
    has_safetensors = any(model_dir.glob("*.safetensors"))
    has_pickle = any(model_dir.glob("pytorch_model*.bin"))
    if not has_safetensors:
        if has_pickle and not allow_pickle:
            raise Lora2ggufError(
                f"{model_dir}: only pickle weights (pytorch_model*.bin) found; pickle can run code, "
                "pass --allow-pickle to load them anyway"
            )
        if not has_pickle:
            raise Lora2ggufError(f"{model_dir}: no model weights (*.safetensors) found")


def dtype_kwarg(dtype: Any) -> dict[str, Any]:
    """The from_pretrained keyword for the weight dtype under the installed transformers."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    # transformers 4.56 renamed torch_dtype to dtype; the old name warns (and later goes away).
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_tokenizer(model_dir: Path, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a Hugging Face folder, from local files only."""
    from transformers import AutoTokenizer

    if not model_dir.is_dir():
        raise Lora2ggufError(f"{model_dir}: model folder not found")
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise Lora2ggufError(f"{model_dir}: cannot load the tokenizer: {exc}") from exc


def load(
    model_dir: Path,
    device: str,
    dtype: Any,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> tuple[Any, Any]:
    """Model in eval mode on ``device`` plus its tokenizer, from local files only."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_dir(model_dir, allow_pickle)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_dir, local_files_only=True, trust_remote_code=trust_remote_code
        )
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            use_safetensors=not allow_pickle or None,
            **dtype_kwarg(dtype),
        )
    except (OSError, ValueError) as exc:
        raise Lora2ggufError(f"{model_dir}: cannot load model/tokenizer: {exc}") from exc
    except SafetensorError as exc:
        raise _corrupt_weights(model_dir, exc) from exc
    model.to(device)
    model.eval()
    return model, tokenizer


def _corrupt_weights(model_dir: Path, exc: Exception) -> Lora2ggufError:
    """The safetensors library says what is wrong but not in which file: our reader names the part."""
    for part in sorted(model_dir.glob("*.safetensors")):
        try:
            read_header(part)
        except Lora2ggufError as found:
            return found
    return Lora2ggufError(f"{model_dir}: cannot load the safetensors weights: {exc}")


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Token ids that end a reply: the generation config's eos ids (a list for chat models) and the
    tokenizer's eos."""
    ids: set[int] = set()
    candidates = [getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id]
    for value in candidates:
        if value is None:
            continue
        if isinstance(value, int):
            ids.add(value)
        else:
            ids.update(int(v) for v in value)
    return sorted(ids)


def _template_source(tokenizer: Any) -> str:
    """The file the chat template came from, for messages (transformers 5 saves chat_template.jinja)."""
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or "."))
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        if (folder / name).is_file():
            return str(folder / name)
    return f"{folder}: chat template"


def render_chat(tokenizer: Any, messages: list[dict[str, str]], chat_template: str | None = None) -> str:
    """A conversation through the model's chat template (or ``chat_template``), the assistant turn
    opened. The template is input like any other file: one that raises (raise_exception, a syntax
    error, an undefined name, an operation on the wrong type) or that jinja2's sandbox stops is an
    error naming the file, not a traceback."""
    import jinja2

    source = "the given chat template" if chat_template is not None else _template_source(tokenizer)
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=chat_template, add_generation_prompt=True, tokenize=False
        )
    except jinja2.exceptions.SecurityError as exc:
        raise Lora2ggufError(f"{source}: the chat template was stopped by jinja2's sandbox ({exc})") from exc
    except (jinja2.TemplateError, ArithmeticError, LookupError, TypeError, ValueError) as exc:
        first = str(messages[-1].get("content", ""))[:40] if messages else ""
        raise Lora2ggufError(
            f"{source}: the chat template fails on the test prompt {first!r} ({type(exc).__name__}: {exc})"
        ) from exc


def chat_ids(tokenizer: Any, messages: list[dict[str, str]], chat_template: str | None = None) -> list[int]:
    """Token ids of a conversation rendered by the chat template, the assistant turn opened: what
    training saw for the same turns."""
    rendered = render_chat(tokenizer, messages, chat_template)
    # The template already holds any BOS/special tokens: do not add them twice.
    return [int(i) for i in tokenizer(rendered, add_special_tokens=False)["input_ids"]]


def chat_prompt_ids(tokenizer: Any, text: str) -> tuple[list[int], bool]:
    """Token ids of one user turn with the chat template applied and the assistant turn opened.

    Returns (ids, template_applied). Without a chat template the raw text is used and the caller
    reports it.
    """
    if getattr(tokenizer, "chat_template", None):
        return chat_ids(tokenizer, [{"role": "user", "content": text}]), True
    ids = tokenizer(text)["input_ids"]
    return [int(i) for i in ids], False


def text_ids(tokenizer: Any, text: str, max_tokens: int) -> list[int]:
    """The evaluation text as token ids (with the tokenizer's own BOS if it adds one), truncated."""
    # verbose=False: the whole text may exceed the model's maximum length; only max_tokens are used.
    ids = tokenizer(text, verbose=False)["input_ids"]
    return [int(i) for i in ids[:max_tokens]]


def logits(model: Any, ids: list[int]) -> np.ndarray:
    """Next-token logits at every position of ``ids`` as float32 (positions, vocabulary)."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model(torch.tensor([ids], device=device), use_cache=False)
    return out.logits[0].float().cpu().numpy()


def greedy(model: Any, ids: list[int], max_new_tokens: int, stop_ids: list[int]) -> list[int]:
    """Plain argmax decoding with the KV cache, stopping after a stop token (which is kept).

    Written out rather than model.generate() so it applies no hidden processors (repetition penalty,
    minimum length, forced tokens from generation_config.json) and matches the llama.cpp loop
    step for step.
    """
    import inspect

    import torch

    device = next(model.parameters()).device
    # transformers 5 renamed the KV-cache argument and output field from past_key_values to cache.
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out: list[int] = []
    stop = set(stop_ids)
    with torch.inference_mode():
        result = model(torch.tensor([ids], device=device), use_cache=True)
        for _ in range(max_new_tokens):
            token = int(result.logits[0, -1].argmax())
            out.append(token)
            if token in stop:
                break
            past = getattr(result, name)
            result = model(torch.tensor([[token]], device=device), use_cache=True, **{name: past})
    return out


def parameter_count(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))
