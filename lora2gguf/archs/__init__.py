"""Architecture facts, one module per model family: how an HF config and its tensors map to GGUF.

Base package: read by the converter (convert/), the LoRA adapter export (adapter/) and the
importance-matrix collection (imatrix/), which names its entries with the GGUF tensor names.
``base`` holds what all families share (the spec type with its optional hooks, the validated
hyperparameters, config reading, the llama q/k permutation); each family module defines the
:class:`ArchSpec` of its GGUF architecture, and ``ARCHS`` below registers them. A decoder-only
model whose ``architectures[0]`` no spec lists is refused by name rather than converted half right
(``find_spec`` returns None for it, so a caller can hand it to llama.cpp's own converter instead).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora2gguf.archs import base
from lora2gguf.archs.base import SKIP_SUFFIXES, ArchSpec, HParams, load_config, permute_qk
from lora2gguf.archs.gemma import GEMMA2, GEMMA3
from lora2gguf.archs.llama import LLAMA
from lora2gguf.archs.phi3 import PHI3
from lora2gguf.archs.qwen2 import QWEN2
from lora2gguf.archs.qwen3 import QWEN3
from lora2gguf.errors import Lora2ggufError

__all__ = [
    "ARCHS", "SKIP_SUFFIXES", "ArchSpec", "HParams", "find_spec", "load_config", "permute_qk", "read_hparams",
    "spec_for",
]

# GGUF architecture name -> its spec (each spec lists the HF classes it converts).
ARCHS: dict[str, ArchSpec] = {spec.name: spec for spec in (QWEN2, LLAMA, QWEN3, GEMMA2, GEMMA3, PHI3)}


def _hf_architecture(config: dict[str, Any], config_path: Path) -> str:
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise Lora2ggufError(f"{config_path}: key 'architectures' is missing or not a list of names")
    return archs[0]


def find_spec(config: dict[str, Any], config_path: Path = Path("config.json")) -> ArchSpec | None:
    """The spec converting ``config['architectures'][0]``, or None when there is no native converter
    for it (a config without a usable 'architectures' key is an error either way)."""
    hf_arch = _hf_architecture(config, config_path)
    return next((spec for spec in ARCHS.values() if hf_arch in spec.hf_architectures), None)


def spec_for(config: dict[str, Any], config_path: Path) -> ArchSpec:
    """The table for ``config['architectures'][0]``; an unsupported architecture fails by name."""
    spec = find_spec(config, config_path)
    if spec is None:
        supported = ", ".join(f"{a} ({s.name})" for s in ARCHS.values() for a in s.hf_architectures)
        raise Lora2ggufError(
            f"{config_path}: architecture {_hf_architecture(config, config_path)!r} is not supported by "
            f"lora2gguf convert (supported: {supported})"
        )
    return spec


def read_hparams(config: dict[str, Any], config_path: Path) -> HParams:
    """The hyperparameters llama.cpp needs, validated with the rules of the config's family."""
    archs = config.get("architectures")
    spec = find_spec(config, config_path) if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    return base.read_hparams(config, config_path, spec)
