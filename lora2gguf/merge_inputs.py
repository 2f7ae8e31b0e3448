"""Checks on the merge inputs that need no torch: weight files, adapter config, base/adapter fit.

Everything here reads file headers only (safetensors keeps shapes in a JSON header), so a wrong
adapter, a truncated download or a pickle checkpoint is refused in milliseconds, before the model
is loaded, and always with the file and tensor named.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora2gguf.artifacts import read_json
from lora2gguf.errors import Lora2ggufError

logger = logging.getLogger(__name__)

# Bytes per element of each safetensors dtype tag (the format's spec lists these).
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
# A real header is a few hundred KB at most; a larger length prefix means the file is not safetensors.
_MAX_HEADER_BYTES = 100 * 2**20

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str
    file: Path


@dataclass
class WeightSource:
    """The weight files of a model or adapter folder and the tensors they declare."""

    kind: str  # "safetensors" or "pickle"
    files: list[Path]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    index_file: Path | None = None


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and sanity-check a safetensors header; a truncated or corrupt file raises naming it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise Lora2ggufError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise Lora2ggufError(
                    f"{path}: truncated or not a safetensors file (header length {header_len} bytes, "
                    f"file holds {size} bytes)"
                )
            raw = handle.read(header_len)
    except OSError as exc:
        raise Lora2ggufError(f"{path}: cannot read: {exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Lora2ggufError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise Lora2ggufError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_bytes = size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    end_max = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise Lora2ggufError(f"{path}: corrupt safetensors header entry for tensor '{name}'") from None
        expected = _DTYPE_BYTES.get(dtype, 0) * math.prod(shape)
        if dtype in _DTYPE_BYTES and end - begin != expected:
            raise Lora2ggufError(
                f"{path}: tensor '{name}' declares {end - begin} bytes but {dtype}{list(shape)} needs {expected}"
            )
        if end > data_bytes:
            raise Lora2ggufError(
                f"{path}: truncated: tensor '{name}' ends at byte {end} of the data section but the file "
                f"holds only {data_bytes} data bytes (incomplete download or copy?)"
            )
        end_max = max(end_max, end)
        tensors[name] = TensorInfo(shape, dtype, path)
    if end_max != data_bytes:
        raise Lora2ggufError(
            f"{path}: corrupt safetensors file: tensors cover {end_max} data bytes but the file holds {data_bytes}"
        )
    return tensors


def _pickle_tensors(path: Path) -> dict[str, TensorInfo]:
    # Only reached when the user allowed pickle checkpoints; weights_only refuses arbitrary objects anyway.
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise Lora2ggufError(f"{path}: cannot load pickle checkpoint: {exc}") from None
    return {k: TensorInfo(tuple(v.shape), str(v.dtype), path) for k, v in state.items() if hasattr(v, "shape")}


def _index_shards(index: Path) -> list[Path]:
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise Lora2ggufError(f"{index}: key 'weight_map' missing or empty")
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            raise Lora2ggufError(f"{index}: lists shard '{shard.name}', which is missing from {index.parent}")
    return shards


def find_base_weights(base: Path, allow_pickle: bool) -> WeightSource:
    """Locate a base model's weights, preferring safetensors and refusing pickle unless allowed."""
    if not (base / "config.json").is_file():
        raise Lora2ggufError(f"{base}: not a Hugging Face model folder (config.json missing)")
    index = base / "model.safetensors.index.json"
    if index.is_file():
        source = WeightSource("safetensors", _index_shards(index), index_file=index)
    elif (base / "model.safetensors").is_file():
        source = WeightSource("safetensors", [base / "model.safetensors"])
    else:
        pickles = sorted(base.glob("pytorch_model*.bin"))
        if not pickles:
            raise Lora2ggufError(f"{base}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
        if not allow_pickle:
            raise Lora2ggufError(
                f"{base}: only pickle weights ({pickles[0].name}); pickle files can run code when loaded, so they "
                "are refused. Convert them to safetensors or set merge.allow_pickle: true (--allow-pickle)"
            )
        bin_index = base / "pytorch_model.bin.index.json"
        files = _index_shards(bin_index) if bin_index.is_file() else pickles
        source = WeightSource("pickle", files, index_file=bin_index if bin_index.is_file() else None)
    for path in source.files:
        source.tensors.update(read_safetensors_header(path) if source.kind == "safetensors" else _pickle_tensors(path))
    return source


def find_adapter_weights(adapter: Path, allow_pickle: bool) -> WeightSource:
    """Locate a peft adapter's weights (adapter_model.safetensors, or .bin only when allowed)."""
    st = adapter / "adapter_model.safetensors"
    if st.is_file():
        return WeightSource("safetensors", [st], read_safetensors_header(st))
    pickle_file = adapter / "adapter_model.bin"
    if pickle_file.is_file():
        if not allow_pickle:
            raise Lora2ggufError(
                f"{pickle_file}: pickle adapter weights are refused (loading a pickle can run code); "
                "re-save the adapter with safe_serialization=True or set merge.allow_pickle: true (--allow-pickle)"
            )
        return WeightSource("pickle", [pickle_file], _pickle_tensors(pickle_file))
    raise Lora2ggufError(f"{adapter}: no adapter weights (adapter_model.safetensors missing)")


def read_adapter_config(adapter: Path) -> dict[str, Any]:
    path = adapter / "adapter_config.json"
    if not adapter.is_dir():
        raise Lora2ggufError(f"{adapter}: adapter folder not found")
    if not path.is_file():
        raise Lora2ggufError(f"{path}: file not found (not a peft adapter folder?)")
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise Lora2ggufError(f"{path}: expected a JSON object")
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise Lora2ggufError(f"{path}: key 'peft_type' is {peft_type!r}; only LoRA adapters can be merged")
    for key in ("r", "target_modules"):
        if key not in cfg:
            raise Lora2ggufError(f"{path}: key '{key}' missing")
    return cfg


def base_name_check(adapter_cfg: dict[str, Any], base: Path, base_config: dict[str, Any]) -> dict[str, Any]:
    """Compare the base recorded in the adapter with the configured one (names only; shapes come later)."""
    recorded = adapter_cfg.get("base_model_name_or_path")
    result: dict[str, Any] = {"recorded": recorded, "configured": str(base), "name_matches": None}
    if not recorded:
        result["note"] = "adapter_config.json records no base_model_name_or_path"
        return result
    recorded_path = Path(str(recorded)).expanduser()
    candidates = {base.name.lower(), str(base_config.get("_name_or_path", "")).rstrip("/").lower()}
    tail = str(recorded).rstrip("/").split("/")[-1].lower()
    matches = tail in candidates or str(recorded).rstrip("/").lower() in candidates
    try:
        matches = matches or recorded_path.resolve() == base.resolve()
    except OSError:
        pass
    result["name_matches"] = bool(matches)
    if not matches:
        logger.warning(
            "adapter_config.json records base_model_name_or_path=%r but the configured base is %s; "
            "continuing because tensor shapes will be checked, but an adapter trained on another base "
            "(or on a quantized QLoRA base) may merge into a worse model",
            recorded,
            base,
        )
    return result


_LORA_RE = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?!weight$|bias$)[^.]+)?(?:\.(?P<leaf>weight|bias))?$"
)


# peft's ModulesToSaveWrapper names: "<m>.modules_to_save[.<adapter>].weight" is the trained copy,
# "<m>.original_module.weight" the base's (saved too when the vocabulary was resized), and
# "<m>.base_layer.weight" a LoRA-wrapped embedding's base matrix (peft saves embedding layers it targets).
_WRAPPER_RE = re.compile(r"\.(?:original_module|base_layer|modules_to_save(?:\.(?!weight$|bias$)[^.]+)?)(?=\.[^.]+$)")


def _strip_prefix(key: str) -> str:
    return key[len("base_model.model.") :] if key.startswith("base_model.model.") else key


def check_adapter_fits_base(
    adapter: WeightSource, base: WeightSource, adapter_cfg: dict[str, Any], base_config: dict[str, Any]
) -> dict[str, Any]:
    """Check every adapter tensor against the base tensor it modifies; raise naming both on a mismatch.

    Returns facts the merge needs: the vocabulary size that modules_to_save copies imply (a resized
    embedding) and which full-weight copies the adapter carries.
    """
    vocab = base_config.get("vocab_size")
    tied = bool(base_config.get("tie_word_embeddings", False))
    fan_in_fan_out = bool(adapter_cfg.get("fan_in_fan_out", False))
    resized_rows: dict[str, int] = {}
    full_copies: list[str] = []

    def base_tensor(module_key: str, adapter_key: str, adapter_file: Path) -> TensorInfo:
        info = base.tensors.get(module_key)
        if info is None and tied and module_key.endswith("lm_head.weight"):
            # Tied models store only the input embedding; the output head reuses it.
            for alias in ("model.embed_tokens.weight", "transformer.wte.weight", "model.embed_in.weight"):
                if alias in base.tensors:
                    return base.tensors[alias]
        if info is None:
            raise Lora2ggufError(
                f"{adapter_file}: tensor '{adapter_key}' modifies '{module_key}', which the base model "
                f"({base.files[0].parent}) does not have: the adapter was trained for a different architecture"
            )
        return info

    def mismatch(adapter_key: str, a: TensorInfo, module_key: str, b: TensorInfo, what: str) -> Lora2ggufError:
        return Lora2ggufError(
            f"{a.file}: tensor '{adapter_key}' has shape {list(a.shape)} but base tensor '{module_key}' in "
            f"{b.file} has shape {list(b.shape)} ({what}): the adapter was trained for a different base model"
        )

    for key, info in sorted(adapter.tensors.items()):
        stripped = _strip_prefix(key)
        match = _LORA_RE.match(stripped)
        if match is None:
            # A full copy of a module (modules_to_save): same shape as the base, except for rows of a
            # resized vocabulary in embedding / output layers.
            module_key = _WRAPPER_RE.sub("", stripped)
            target = base_tensor(module_key, key, info.file)
            if info.shape != target.shape:
                resized = len(info.shape) == 2 and info.shape[1:] == target.shape[1:] and target.shape[0] == vocab
                if not resized:
                    raise mismatch(key, info, module_key, target, "full module copy (modules_to_save)")
                resized_rows[key] = info.shape[0]
            full_copies.append(module_key)
            continue
        module, part, leaf = match["module"], match["part"], match["leaf"]
        target = base_tensor(f"{module}.weight", key, info.file)
        module_key = f"{module}.weight"
        if len(target.shape) != 2:
            continue  # conv layers etc.: leave the detailed check to peft
        rows, cols = target.shape
        if part in ("lora_embedding_A", "lora_embedding_B"):
            in_dim, out_dim = rows, cols  # embeddings are stored [num_embeddings, dim]
        elif fan_in_fan_out:
            in_dim, out_dim = rows, cols  # GPT-2 style Conv1D stores [in, out]
        else:
            out_dim, in_dim = rows, cols
        if part in ("lora_A", "lora_embedding_A") and leaf != "bias":
            ok = len(info.shape) == 2 and info.shape[1] == in_dim
            if part == "lora_embedding_A" and not ok and len(info.shape) == 2 and rows == vocab:
                ok = True
                resized_rows[key] = info.shape[1]
            if not ok:
                raise mismatch(key, info, module_key, target, f"expected [r, {in_dim}] for input size {in_dim}")
        elif part in ("lora_B", "lora_embedding_B") and leaf != "bias":
            if not (len(info.shape) == 2 and info.shape[0] == out_dim):
                raise mismatch(key, info, module_key, target, f"expected [{out_dim}, r] for output size {out_dim}")
        elif part == "lora_magnitude_vector" or leaf == "bias":
            if info.shape[0] != out_dim:
                raise mismatch(key, info, module_key, target, f"expected {out_dim} entries for output size {out_dim}")
    rows = set(resized_rows.values())
    if len(rows) > 1:
        raise Lora2ggufError(
            f"{adapter.files[0]}: full embedding copies disagree on the vocabulary size: "
            + ", ".join(f"{k}={v}" for k, v in sorted(resized_rows.items()))
        )
    return {
        "resized_vocab_rows": rows.pop() if rows else None,
        "full_weight_tensors": sorted(set(full_copies)),
        "lora_tensors": sum(1 for k in adapter.tensors if _LORA_RE.match(_strip_prefix(k))),
    }
