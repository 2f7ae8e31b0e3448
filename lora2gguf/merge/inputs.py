"""Checks on the merge inputs that need no torch: weight files, adapter config, base/adapter fit.

Everything here reads file headers only (safetensors keeps shapes in a JSON header), so a wrong
adapter, a truncated download or a pickle checkpoint is refused in milliseconds, before the model
is loaded, and always with the file and tensor named.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora2gguf.artifacts import HF_TOKENIZER_FILES, check_links_inside, read_json
from lora2gguf.errors import Lora2ggufError
from lora2gguf.formats.peft import read_lora_config
from lora2gguf.formats.safetensors import TensorEntry, read_header

logger = logging.getLogger(__name__)

# One list of tokenizer files for the whole package (artifacts is the base module that owns it).
TOKENIZER_FILES = HF_TOKENIZER_FILES
# The input embedding's tensor name in the families a tied output head reuses it in.
EMBEDDING_NAMES = ("model.embed_tokens.weight", "transformer.wte.weight", "model.embed_in.weight")
OUTPUT_HEAD_NAME = "lm_head.weight"


@dataclass
class WeightSource:
    """The weight files of a model or adapter folder and the tensors they declare."""

    kind: str  # "safetensors" or "pickle"
    files: list[Path]
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    index_file: Path | None = None


def _safetensors_tensors(path: Path) -> dict[str, TensorEntry]:
    return {entry.name: entry for entry in read_header(path)}


def _pickle_tensors(path: Path) -> dict[str, TensorEntry]:
    # Only reached when the user allowed pickle checkpoints; weights_only refuses arbitrary objects anyway.
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise Lora2ggufError(f"{path}: cannot load pickle checkpoint: {exc}") from None
    # A pickle holds no plain byte range per tensor: offset -1 (see TensorEntry).
    return {
        k: TensorEntry(k, path, str(v.dtype), tuple(v.shape), -1, int(v.nbytes))
        for k, v in state.items()
        if hasattr(v, "shape")
    }


def _index_shards(index: Path) -> list[Path]:
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise Lora2ggufError(f"{index}: key 'weight_map' missing or empty")
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    # The index may name any path ("../elsewhere.safetensors"): each shard must lie in the folder too.
    check_links_inside(index.parent, shards)
    for shard in shards:
        if not shard.is_file():
            raise Lora2ggufError(f"{index}: lists shard '{shard.name}', which is missing from {index.parent}")
    return shards


def find_base_weights(base: Path, allow_pickle: bool) -> WeightSource:
    """Locate a base model's weights, preferring safetensors and refusing pickle unless allowed."""
    if not (base / "config.json").is_file():
        raise Lora2ggufError(f"{base}: not a Hugging Face model folder (config.json missing)")
    # Weights, configs and tokenizer files are read from here (tokenizer files copied into the output).
    check_links_inside(base)
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
        source.tensors.update(_safetensors_tensors(path) if source.kind == "safetensors" else _pickle_tensors(path))
    return source


def find_adapter_weights(adapter: Path, allow_pickle: bool) -> WeightSource:
    """Locate a peft adapter's weights (adapter_model.safetensors, or .bin only when allowed)."""
    st = adapter / "adapter_model.safetensors"
    if st.is_file():
        return WeightSource("safetensors", [st], _safetensors_tensors(st))
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
    cfg = read_lora_config(adapter, folder_kind="adapter", action="merged")
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


LORA_KEY_RE = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?!weight$|bias$)[^.]+)?(?:\.(?P<leaf>weight|bias))?$"
)


# peft's ModulesToSaveWrapper names: "<m>.modules_to_save[.<adapter>].weight" is the trained copy,
# "<m>.original_module.weight" the base's (saved too when the vocabulary was resized), and
# "<m>.base_layer.weight" a LoRA-wrapped embedding's base matrix (peft saves embedding layers it targets).
WRAPPER_RE = re.compile(r"\.(?:original_module|base_layer|modules_to_save(?:\.(?!weight$|bias$)[^.]+)?)(?=\.[^.]+$)")


def strip_prefix(key: str) -> str:
    return key[len("base_model.model.") :] if key.startswith("base_model.model.") else key


@dataclass(frozen=True)
class _Base:
    """The base's tensors as the fit check looks them up."""

    weights: WeightSource
    vocab: int | None
    tied: bool

    def tensor(self, module_key: str, adapter_key: str, adapter_file: Path) -> TensorEntry:
        """The base tensor an adapter tensor modifies; raise naming both when the base lacks it."""
        info = self.weights.tensors.get(module_key)
        if info is None and self.tied and module_key.endswith("lm_head.weight"):
            # Tied models store only the input embedding; the output head reuses it.
            for alias in EMBEDDING_NAMES:
                if alias in self.weights.tensors:
                    return self.weights.tensors[alias]
        if info is None:
            raise Lora2ggufError(
                f"{adapter_file}: tensor '{adapter_key}' modifies '{module_key}', which the base model "
                f"({self.weights.files[0].parent}) does not have: the adapter was trained for a different architecture"
            )
        return info


def _mismatch(adapter_key: str, a: TensorEntry, module_key: str, b: TensorEntry, what: str) -> Lora2ggufError:
    return Lora2ggufError(
        f"{a.path}: tensor '{adapter_key}' has shape {list(a.shape)} but base tensor '{module_key}' in "
        f"{b.path} has shape {list(b.shape)} ({what}): the adapter was trained for a different base model"
    )


def _check_full_copy(key: str, info: TensorEntry, base: _Base) -> tuple[str, int | None]:
    """A full copy of a module (modules_to_save): same shape as the base, except for rows of a resized
    vocabulary in embedding / output layers. Returns the module's base key and the resized row count."""
    module_key = WRAPPER_RE.sub("", strip_prefix(key))
    target = base.tensor(module_key, key, info.path)
    if info.shape == target.shape:
        return module_key, None
    resized = len(info.shape) == 2 and info.shape[1:] == target.shape[1:] and target.shape[0] == base.vocab
    if not resized:
        raise _mismatch(key, info, module_key, target, "full module copy (modules_to_save)")
    return module_key, info.shape[0]


def _in_out_dims(part: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> tuple[int, int]:
    rows, cols = shape
    if part in ("lora_embedding_A", "lora_embedding_B"):
        return rows, cols  # embeddings are stored [num_embeddings, dim]
    if fan_in_fan_out:
        return rows, cols  # GPT-2 style Conv1D stores [in, out]
    return cols, rows


def _check_lora_tensor(
    key: str, match: re.Match[str], info: TensorEntry, base: _Base, fan_in_fan_out: bool, embedding: bool
) -> int | None:
    """A LoRA factor, magnitude vector or bias against the base layer it modifies; returns the resized
    vocabulary a LoRA on an embedding implies (None when it implies none)."""
    part, leaf = match["part"], match["leaf"]
    module_key = f"{match['module']}.weight"
    target = base.tensor(module_key, key, info.path)
    if len(target.shape) != 2:
        return None  # conv layers etc.: leave the detailed check to peft
    in_dim, out_dim = _in_out_dims(part, target.shape, fan_in_fan_out)
    two_d = len(info.shape) == 2
    if part in ("lora_A", "lora_embedding_A") and leaf != "bias":
        if two_d and info.shape[1] == in_dim:
            return None
        if part == "lora_embedding_A" and two_d and target.shape[0] == base.vocab:
            return info.shape[1]
        raise _mismatch(key, info, module_key, target, f"expected [r, {in_dim}] for input size {in_dim}")
    if part in ("lora_B", "lora_embedding_B") and leaf != "bias":
        if not (two_d and info.shape[0] == out_dim):
            raise _mismatch(key, info, module_key, target, f"expected [{out_dim}, r] for output size {out_dim}")
    elif part == "lora_magnitude_vector" and embedding:  # DoRA scales an embedding's dim columns
        if info.shape[0] != target.shape[1]:
            raise _mismatch(key, info, module_key, target, f"expected {target.shape[1]} entries, one per column")
    elif part == "lora_magnitude_vector" or leaf == "bias":
        if info.shape[0] != out_dim:
            raise _mismatch(key, info, module_key, target, f"expected {out_dim} entries for output size {out_dim}")
    return None


def check_adapter_fits_base(
    adapter: WeightSource, base: WeightSource, adapter_cfg: dict[str, Any], base_config: dict[str, Any]
) -> dict[str, Any]:
    """Check every adapter tensor against the base tensor it modifies; raise naming both on a mismatch.

    Returns facts the merge needs: the vocabulary size that modules_to_save copies imply (a resized
    embedding) and which full-weight copies the adapter carries.
    """
    check_adapter_changes_model(adapter, adapter_cfg)
    lookup = _Base(base, base_config.get("vocab_size"), bool(base_config.get("tie_word_embeddings", False)))
    fan_in_fan_out = bool(adapter_cfg.get("fan_in_fan_out", False))
    resized_rows: dict[str, int] = {}
    full_copies: list[str] = []
    embeddings = {module for module, parts in _lora_parts(adapter).items() if "lora_embedding_A" in parts}
    for key, info in sorted(adapter.tensors.items()):
        match = LORA_KEY_RE.match(strip_prefix(key))
        if match is None:
            module_key, rows = _check_full_copy(key, info, lookup)
            full_copies.append(module_key)
        else:
            rows = _check_lora_tensor(key, match, info, lookup, fan_in_fan_out, match["module"] in embeddings)
        if rows is not None:
            resized_rows[key] = rows
    sizes = set(resized_rows.values())
    if len(sizes) > 1:
        raise Lora2ggufError(
            f"{adapter.files[0]}: full embedding copies disagree on the vocabulary size: "
            + ", ".join(f"{k}={v}" for k, v in sorted(resized_rows.items()))
        )
    return {
        "resized_vocab_rows": sizes.pop() if sizes else None,
        "full_weight_tensors": sorted(set(full_copies)),
        "lora_tensors": sum(1 for k in adapter.tensors if LORA_KEY_RE.match(strip_prefix(k))),
    }


def _lora_parts(adapter: WeightSource) -> dict[str, set[str]]:
    """The LoRA parts (lora_A, lora_B, magnitude...) each adapted module has, biases aside."""
    modules: dict[str, set[str]] = {}
    for key in adapter.tensors:
        match = LORA_KEY_RE.match(strip_prefix(key))
        if match is not None and match["leaf"] != "bias":
            modules.setdefault(match["module"], set()).add(match["part"])
    return modules


_PAIRS = (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B"))


def _check_pairs(path: Path, module: str, parts: set[str], use_dora: bool) -> None:
    """One module's factors come in pairs: peft would start a missing lora_B at zero (the module
    is left unchanged) and a missing lora_A at random values (changed arbitrarily)."""
    if not parts & {part for pair in _PAIRS for part in pair}:
        raise Lora2ggufError(f"{path}: module '{module}' has a magnitude vector but no lora_A/lora_B factors")
    for a, b in _PAIRS:
        if (a in parts) != (b in parts):
            have, lack = (a, b) if a in parts else (b, a)
            raise Lora2ggufError(
                f"{path}: module '{module}' has {have} but no {lack} (an incomplete adapter: peft would leave "
                f"{lack} at its initial value, so the merge would not be the trained model)"
            )
    if use_dora and "lora_magnitude_vector" not in parts:
        raise Lora2ggufError(
            f"{path}: adapter_config.json sets use_dora but module '{module}' has no lora_magnitude_vector "
            "(peft would use the base's own norms: not the trained DoRA adapter)"
        )


def _alpha_values(adapter_cfg: dict[str, Any]) -> dict[str, Any]:
    """lora_alpha (peft's default 8 when absent) and every alpha_pattern value, by config key."""
    pattern = adapter_cfg.get("alpha_pattern") or {}
    pattern_values = pattern.items() if isinstance(pattern, dict) else ()
    return {"lora_alpha": adapter_cfg.get("lora_alpha", 8), **{f"alpha_pattern.{k}": v for k, v in pattern_values}}


def _check_alphas(adapter_cfg: dict[str, Any], cfg_path: Path) -> dict[str, float]:
    if not isinstance(adapter_cfg.get("alpha_pattern") or {}, dict):
        raise Lora2ggufError(f"{cfg_path}: key 'alpha_pattern' is {adapter_cfg['alpha_pattern']!r}, expected an object")
    values = _alpha_values(adapter_cfg)
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise Lora2ggufError(f"{cfg_path}: key '{key}' is {value!r}, expected a number")
    return values


def alpha_warnings(adapter_cfg: dict[str, Any]) -> list[str]:
    """Warnings about negative scales (lora_alpha or alpha_pattern): peft merges them without a word,
    subtracting the trained update instead of adding it -- almost always a typo in a config."""
    return [
        f"adapter_config.json: {key} is {value} (negative): the merge subtracts the trained update instead of "
        "adding it; check the training configuration"
        for key, value in _alpha_values(adapter_cfg).items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0
    ]


def check_adapter_changes_model(adapter: WeightSource, adapter_cfg: dict[str, Any]) -> None:
    """Refuse an adapter whose merge would give back the base unchanged (or not the trained model):
    no tensors, unpaired factors, DoRA without magnitudes, every alpha zero. Negative alphas warn."""
    path = adapter.files[0]
    cfg_path = path.parent / "adapter_config.json"
    modules = _lora_parts(adapter)
    full_copies = [k for k in adapter.tensors if LORA_KEY_RE.match(strip_prefix(k)) is None]
    if not modules and not full_copies:
        raise Lora2ggufError(
            f"{path}: no LoRA tensors (lora_A/lora_B) and no full module copies: merging it would change nothing"
        )
    for module, parts in sorted(modules.items()):
        _check_pairs(path, module, parts, bool(adapter_cfg.get("use_dora", False)))
    alphas = _check_alphas(adapter_cfg, cfg_path)
    if modules and all(value == 0 for value in alphas.values()):
        raise Lora2ggufError(
            f"{cfg_path}: key 'lora_alpha' is 0: every LoRA update is scaled by lora_alpha / r = 0, so merging "
            "would change nothing"
        )
    for message in alpha_warnings(adapter_cfg):
        logger.warning("%s", message)
