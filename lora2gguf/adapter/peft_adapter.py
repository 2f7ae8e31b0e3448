"""Read a peft LoRA adapter (a run folder) into pairs of factors with the scaling peft gives each module.

What a llama.cpp LoRA adapter can hold is narrow: per base matrix a pair ``lora_a`` / ``lora_b`` and
one ``adapter.lora.alpha`` for the whole file. Everything peft can save beyond that (DoRA magnitude
vectors, ``modules_to_save`` full copies, trained biases, LoRA biases, trainable tokens) is refused
here, naming the module, because dropping it would give an adapter that loads and computes something
else; the merged export keeps all of it.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lora2gguf.errors import Lora2ggufError
from lora2gguf.formats.peft import lora_scaling, module_alpha, pattern_value, read_lora_config
from lora2gguf.formats.safetensors import open_tensor, read_header

logger = logging.getLogger(__name__)

MERGE_HINT = "merge instead (lora2gguf merge, then lora2gguf convert) to ship this run as a merged GGUF"
_PREFIX = "base_model.model."
# <module>.lora_A.weight / .lora_B.weight (adapter name already stripped by peft's save), and the
# embedding factors <module>.lora_embedding_A / _B (ParameterDict entries, no .weight).
# Per-module features peft records in the config (the tensors usually show them first, named by module).
_UNSUPPORTED_PER_MODULE = (
    ("use_dora", "DoRA rescales each output column by a trained magnitude vector"),
    ("lora_bias", "the LoRA B factor carries a trained bias"),
)
# Initialisations that move the principal components out of the base weights (PiSSA, OLoRA, CorDA).
_RESIDUAL_INITS = ("pissa", "olora", "corda")
_FACTOR_RE = re.compile(r"^(?P<module>.+)\.(?:(?P<ab>lora_[AB])\.weight|(?P<emb>lora_embedding_[AB]))$")
# peft saves the base matrix of an adapted embedding too (save_embedding_layers): a copy, skipped like
# convert_lora_to_gguf.py skips it -- once the export has checked that it equals the base's.
_BASE_COPY_RE = re.compile(r"^(?P<module>.+)\.base_layer\.weight$")
# Config keys of peft features a llama.cpp LoRA adapter cannot express: (key, value that is harmless, why).
_UNSUPPORTED_CONFIG = (
    ("fan_in_fan_out", False, "the factors are stored transposed (Conv1D layers)"),
    ("alora_invocation_tokens", None, "activated LoRA (aLoRA) is not handled by lora2gguf"),
    ("layer_replication", None, "layers are replicated at load time"),
)


@dataclass
class LoraPair:
    """One adapted module: its factors (numpy, source dtype) and peft's scaling for it."""

    module: str  # e.g. model.layers.0.self_attn.q_proj
    a: np.ndarray  # [r, in]  (lora_embedding_A: [r, num_embeddings])
    b: np.ndarray  # [out, r] (lora_embedding_B: [embedding_dim, r])
    embedding: bool
    rank: int
    alpha: float  # lora_alpha, or the alpha_pattern value that matches the module
    rslora: bool

    @property
    def scaling(self) -> float:
        """What peft multiplies B @ A by: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return lora_scaling(self.alpha, self.rank, self.rslora)

    @property
    def llama_alpha(self) -> float:
        """The adapter.lora.alpha that makes llama.cpp's scale (alpha / r) equal peft's scaling."""
        return self.alpha * math.sqrt(self.rank) if self.rslora else self.alpha


@dataclass
class PeftAdapter:
    """A run's adapter as the export needs it."""

    folder: Path
    config: dict[str, Any]
    weights_file: Path
    pairs: list[LoraPair]  # in the reference converter's order (sorted keys for safetensors)
    use_rslora: bool
    base_copies: dict[str, np.ndarray]  # module -> the base weight peft saved alongside (embeddings)

    @property
    def lora_alpha(self) -> float:
        return float(self.config.get("lora_alpha", 8))


def read_config(run: Path) -> dict[str, Any]:
    """adapter_config.json, checked: a LoRA with a positive rank and only features llama.cpp can load."""
    path = run / "adapter_config.json"
    cfg = read_lora_config(run, folder_kind="run", action="exported")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise Lora2ggufError(f"{path}: key 'r' is {r!r}, expected a positive integer")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise Lora2ggufError(f"{path}: key '{key}' is {cfg[key]!r}, expected an object")
    pattern = cfg.get("alpha_pattern") or {}
    alphas = {"lora_alpha": cfg.get("lora_alpha", 8), **{f"alpha_pattern.{k}": v for k, v in pattern.items()}}
    for key, value in alphas.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise Lora2ggufError(f"{path}: key '{key}' is {value!r}, expected a number")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
        raise Lora2ggufError(
            f"{path}: key 'init_lora_weights' is {init!r}: the adapter expects a base that peft modified when it "
            "initialised the LoRA, not the base model itself; re-save it with save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...) to get a plain LoRA for the original base"
        )
    for key, harmless, why in _UNSUPPORTED_CONFIG:
        if cfg.get(key) not in (harmless, None, False, [], {}):
            raise Lora2ggufError(
                f"{path}: key '{key}' is {cfg[key]!r}: {why}, which a llama.cpp LoRA adapter cannot express; "
                f"{MERGE_HINT}"
            )
    return cfg


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for entry in sorted(read_header(path), key=lambda e: e.name):  # safetensors' load_file order
        if entry.dtype not in ("F32", "F16", "BF16", "F64"):
            raise Lora2ggufError(
                f"{path}: tensor {entry.name!r} has dtype {entry.dtype}; expected floating point factors"
            )
        with open_tensor(entry) as data:
            tensors[entry.name] = np.array(data)
    return tensors


def _load_pickle(path: Path) -> dict[str, np.ndarray]:
    import torch  # only when the user allowed a pickle adapter

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise Lora2ggufError(f"{path}: cannot load pickle checkpoint: {exc}") from None
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if not hasattr(value, "shape") or not value.is_floating_point():
            raise Lora2ggufError(f"{path}: entry {key!r} is not a floating point tensor")
        value = value.detach()
        out[key] = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    return out


def load_weights(run: Path, allow_pickle: bool) -> tuple[Path, dict[str, np.ndarray]]:
    """The adapter's tensors by key: adapter_model.safetensors, or adapter_model.bin when allowed."""
    st = run / "adapter_model.safetensors"
    if st.is_file():
        return st, _load_safetensors(st)
    pickle_file = run / "adapter_model.bin"
    if pickle_file.is_file():
        if not allow_pickle:
            raise Lora2ggufError(
                f"{pickle_file}: pickle adapter weights are refused (loading a pickle can run code); re-save the "
                "adapter with safe_serialization=True or pass --allow-pickle (merge.allow_pickle: true)"
            )
        return pickle_file, _load_pickle(pickle_file)
    raise Lora2ggufError(f"{run}: no adapter weights (adapter_model.safetensors missing)")


def _refuse_extra(path: Path, key: str) -> Lora2ggufError:
    """An adapter tensor that is not a LoRA factor: say what it is and that llama.cpp cannot hold it."""
    name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
    module = re.sub(r"\.(?:weight|bias|lora_magnitude_vector.*|modules_to_save.*|original_module.*|base_layer.*|"
                    r"lora_B\.bias|token_adapter.*)$", "", name)
    if "lora_magnitude_vector" in name:
        what = "a DoRA magnitude vector"
    elif ".modules_to_save" in name or ".original_module" in name:
        what = "a full trained copy of the module (modules_to_save)"
    elif "token_adapter" in name:
        what = "trained token embeddings (trainable_token_indices)"
    elif name.endswith("lora_B.bias"):
        what = "a LoRA bias (lora_bias)"
    elif name.endswith(".bias"):
        what = "a trained bias (bias='all' or 'lora_only')"
    else:
        what = "a tensor that is not a LoRA factor"
    return Lora2ggufError(
        f"{path}: module '{module}' has {what} (tensor '{key}'), which a llama.cpp LoRA adapter cannot express; "
        f"{MERGE_HINT}"
    )


def _pair_factors(
    path: Path, tensors: dict[str, np.ndarray]
) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """Group the factors by module (first-seen order), and the saved base copies; anything else is
    refused by name."""
    modules: dict[str, dict[str, Any]] = {}
    copies: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if (copy := _BASE_COPY_RE.match(name)) is not None:
            copies[copy["module"]] = value
            continue
        match = _FACTOR_RE.match(name)
        if match is None:
            raise _refuse_extra(path, key)
        part = (match["ab"] or match["emb"])[-1]  # "A" or "B"
        kind = "emb" if match["emb"] else "linear"
        slot = modules.setdefault(match["module"], {"kind": kind})
        if slot["kind"] != kind:
            raise Lora2ggufError(f"{path}: module '{match['module']}' has both linear and embedding LoRA factors")
        slot[part] = value
    if not modules:
        raise Lora2ggufError(f"{path}: no LoRA tensors (lora_A/lora_B): the adapter would change nothing")
    for module in copies:
        if module not in modules:
            raise _refuse_extra(path, f"{module}.base_layer.weight")
    return modules, copies


def _make_pair(path: Path, module: str, parts: dict[str, Any], cfg: dict[str, Any]) -> LoraPair:
    if "A" not in parts or "B" not in parts:
        have, lack = ("lora_A", "lora_B") if "A" in parts else ("lora_B", "lora_A")
        raise Lora2ggufError(f"{path}: module '{module}' has {have} but no {lack} (an incomplete adapter)")
    a, b = parts["A"], parts["B"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise Lora2ggufError(
            f"{path}: module '{module}': lora_A {list(a.shape)} and lora_B {list(b.shape)} do not form a rank-r pair"
        )
    rank = int(a.shape[0])
    expected = pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
    if expected != rank:
        raise Lora2ggufError(
            f"{path}: module '{module}' has rank {rank} but adapter_config.json gives it r={expected} "
            "(r / rank_pattern): the config does not belong to these weights"
        )
    alpha = module_alpha(cfg, module)
    return LoraPair(module, a, b, parts["kind"] == "emb", rank, alpha, bool(cfg.get("use_rslora", False)))


def read_adapter(run: Path, allow_pickle: bool = False) -> PeftAdapter:
    """Read and check the run's adapter; refuse, naming the module, what llama.cpp cannot load."""
    cfg = read_config(run)
    cfg_path = run / "adapter_config.json"
    saved = cfg.get("modules_to_save") or []
    if saved:
        raise Lora2ggufError(
            f"{cfg_path}: key 'modules_to_save' lists module '{saved[0]}': a full trained copy of a module, "
            f"which a llama.cpp LoRA adapter cannot express; {MERGE_HINT}"
        )
    weights_file, tensors = load_weights(run, allow_pickle)
    modules, copies = _pair_factors(weights_file, tensors)
    for key, why in _UNSUPPORTED_PER_MODULE:
        if cfg.get(key):
            raise Lora2ggufError(
                f"{cfg_path}: key '{key}' is set: in module '{next(iter(modules))}' (and every other) {why}, "
                f"which a llama.cpp LoRA adapter cannot express; {MERGE_HINT}"
            )
    pairs = [_make_pair(weights_file, module, parts, cfg) for module, parts in modules.items()]
    if all(p.scaling == 0 for p in pairs):
        raise Lora2ggufError(
            f"{run / 'adapter_config.json'}: key 'lora_alpha' is 0 for every module: the adapter would change nothing"
        )
    return PeftAdapter(run, cfg, weights_file, pairs, bool(cfg.get("use_rslora", False)), copies)
