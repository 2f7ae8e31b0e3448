"""What a GGUF file is made of, read from its header (formats.gguf.read_gguf): file type, tensor types,
bits per weight, and the quantizer's sidecar (model-{q}.json) when one lies next to it."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import gguf

from lora2gguf.artifacts import read_json, sha256_file
from lora2gguf.errors import Lora2ggufError
from lora2gguf.formats.gguf import read_gguf

logger = logging.getLogger(__name__)

# Sidecar keys we copy into the comparison when present (written by lora2gguf quantize).
_SIDECAR_KEYS = ("type", "fallbacks", "fallback_count", "tensor_types", "bits_per_weight", "n_tensors", "imatrix")


def file_type_label(file_type: int | None, tensor_types: dict[str, int]) -> str:
    """"Q4_K_M" for LlamaFileType.MOSTLY_Q4_K_M; without general.file_type, the most common
    non-F32 tensor type."""
    if file_type is not None:
        try:
            name = gguf.LlamaFileType(int(file_type)).name
        except ValueError:
            name = f"FILE_TYPE_{file_type}"
        return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    weights = {k: v for k, v in tensor_types.items() if k != "F32"} or tensor_types
    return max(weights, key=lambda k: weights[k]) if weights else "unknown"


def describe(path: Path) -> dict[str, Any]:
    """Header facts of one GGUF file. Bits per weight = 8 * tensor bytes / tensor elements, as
    llama.cpp prints it at load time."""
    # read_gguf bounds every declared count by the file size (2**60 tensors in a few MiB are refused
    # before anything is allocated for them) and names the file in any error.
    header = read_gguf(path)
    counts: Counter[str] = Counter()
    n_bytes = 0
    n_elements = 0
    for tensor in header.tensors:
        counts[tensor.type_name] += 1
        n_bytes += tensor.n_bytes
        n_elements += tensor.n_elements
    metadata = header.metadata
    file_type = metadata.get("general.file_type")
    tensor_types = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    # llama-quantize --imatrix (and lora2gguf quantize --imatrix) record the importance matrix used
    imatrix = {
        key.removeprefix("quantize.imatrix."): value
        for key, value in metadata.items()
        if key.startswith("quantize.imatrix.")
    } or None
    return {
        "file": str(path),
        "size_bytes": path.stat().st_size,
        "architecture": metadata.get("general.architecture"),
        "file_type": file_type_label(file_type, tensor_types),
        "general_file_type": None if file_type is None else int(file_type),
        "n_tensors": len(header.tensors),
        "n_params": n_elements,
        "tensor_bytes": n_bytes,
        "bits_per_weight": 8.0 * n_bytes / n_elements if n_elements else None,
        "tensor_types": tensor_types,
        "imatrix": imatrix,
    }


def sidecar_path(gguf_path: Path) -> Path:
    return gguf_path.with_suffix(".json")


def read_sidecar(gguf_path: Path) -> dict[str, Any] | None:
    """The quantizer's sidecar next to ``gguf_path`` (model-q4_km.gguf -> model-q4_km.json), or None."""
    path = sidecar_path(gguf_path)
    if not path.is_file():
        return None
    data = read_json(path)
    if not isinstance(data, dict):
        raise Lora2ggufError(f"{path}: expected a JSON object (quantizer sidecar)")
    # (a plain quantization's sidecar has "imatrix": null: left out, as for an older sidecar)
    picked = {key: data[key] for key in _SIDECAR_KEYS if data.get(key) is not None}
    if isinstance(picked.get("fallbacks"), dict):
        # The per-tensor list stays in the sidecar; the comparison keeps the count and the changes.
        picked["fallbacks"] = {k: v for k, v in picked["fallbacks"].items() if k != "tensors"}
    return {"path": str(path), "sha256": sha256_file(path), **picked}
