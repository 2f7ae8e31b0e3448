"""A peft adapter folder's adapter_config.json, read and checked in one place (merge and adapter)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from lora2gguf.artifacts import check_links_inside, read_json
from lora2gguf.errors import Lora2ggufError


def read_lora_config(folder: Path, *, folder_kind: str, action: str) -> dict[str, Any]:
    """adapter_config.json of a LoRA adapter folder as a dict; anything else is an error naming the file.

    ``folder_kind`` names the folder in messages ("adapter", "run"); ``action`` is what the caller does
    with a LoRA ("merged", "exported").
    """
    path = folder / "adapter_config.json"
    if not folder.is_dir():
        raise Lora2ggufError(f"{folder}: {folder_kind} folder not found")
    if not path.is_file():
        raise Lora2ggufError(f"{path}: file not found (not a peft adapter folder?)")
    # Adapter and tokenizer files are read from this folder: none may come from outside it.
    check_links_inside(folder)
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise Lora2ggufError(f"{path}: expected a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise Lora2ggufError(f"{path}: key 'peft_type' is {cfg.get('peft_type')!r}; only LoRA adapters can be {action}")
    return cfg


def pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first key,
    in the pattern's order, that matches the end of the module's name at a dot boundary."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return pattern[key]
    return default


def module_alpha(cfg: dict[str, Any], module: str) -> float:
    """The module's lora_alpha: its alpha_pattern value, else lora_alpha (peft's default 8)."""
    return float(pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8)))


def lora_scaling(alpha: float, rank: int, rslora: bool) -> float:
    """What peft multiplies B @ A by: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank
