"""A peft adapter folder's adapter_config.json, read and checked in one place (merge and adapter)."""

from __future__ import annotations

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
