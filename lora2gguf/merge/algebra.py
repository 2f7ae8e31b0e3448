"""The merge's per-tensor check: every written tensor against what the base and adapter files say it must be.

A LoRA module's merged weight is ``W0 + s * B @ A`` (``s`` is lora_alpha / r, or / sqrt(r) with rsLoRA,
per module from adapter_config.json); with DoRA it is ``m / ||W0 + s*B@A||_row * (W0 + s*B@A)`` (norms
of columns instead for an embedding or a Conv1D weight, which are stored transposed); a full module
copy (modules_to_save) replaces the base tensor; every other tensor is the base's, unchanged. The
expectation is computed here from the files alone -- base, adapter and config, in float32 (one numba
pass per tensor), never through peft -- and each written element must lie within the rounding its
dtype allows:

    |written - expected| <= u * (|W0| + |s*B@A| + |expected|) + r * 2^-23 * |s| * (|B| @ |A|) + tiny

``u`` is twice the output dtype's unit roundoff (the update and the sum are each rounded once, a base
stored wider than the output once more); the second term bounds float32 summation over the rank; tiny
is an absolute floor near zero. A forward pass on a few tokens cannot see a module scaled wrongly,
transposed or left out, or a tensor that should not have changed: this check sees every element.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lora2gguf.errors import Lora2ggufError
from lora2gguf.formats.peft import lora_scaling, module_alpha
from lora2gguf.formats.safetensors import TensorEntry, bf16_to_f32, open_tensor, read_header, row_slices
from lora2gguf.merge.inputs import EMBEDDING_NAMES, LORA_KEY_RE, OUTPUT_HEAD_NAME, WRAPPER_RE, WeightSource, strip_prefix

logger = logging.getLogger(__name__)

# Twice the unit roundoff of each output dtype (2^-p for p significant bits: 8, 11, 24), and an absolute
# floor for values near zero: float32's smallest normal (bf16's own subnormals lie below it; a subnormal
# float32 in the bound would send every element of the check down the CPU's slow subnormal path).
_ROUNDING = {"bfloat16": 2.0**-7, "float16": 2.0**-10, "float32": 2.0**-23}
_TINY = {"bfloat16": 2.0**-126, "float16": 2.0**-24, "float32": 2.0**-126}
# DoRA rounds the row norms and the magnitude ratio in the output dtype too: a few more roundings.
_DORA_EXTRA_ROUNDINGS = 4
# Elements per slice read at once: bounds the check's memory (a 151,936-row embedding is read in slices).
_SLICE_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class LoraUpdate:
    """One adapted module's factors and peft's scaling for it, as the adapter files give them."""

    a: TensorEntry  # [r, in] (embedding: [r, num_embeddings])
    b: TensorEntry  # [out, r] (embedding: [dim, r])
    scaling: float
    embedding: bool
    fan_in_fan_out: bool
    magnitude: TensorEntry | None = None  # DoRA
    bias: TensorEntry | None = None  # lora_B.bias (lora_bias): added to the base bias times the scaling

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class Expectation:
    """What one written tensor must be: the base tensor, and what the adapter does to it."""

    base: TensorEntry | None
    lora: LoraUpdate | None = None
    copy: TensorEntry | None = None  # a full trained copy (modules_to_save) replaces the base
    bias_of: LoraUpdate | None = None  # this tensor is a bias that a LoRA bias is added to


@dataclass
class _Tally:
    """Running figures over the checked tensors, for the report."""

    tensors: dict[str, int] = field(default_factory=lambda: {"lora": 0, "dora": 0, "copy": 0, "unchanged": 0})
    elements: int = 0
    worst_ratio: float = 0.0
    worst_tensor: str | None = None
    update_error_sq: float = 0.0
    update_sq: float = 0.0
    unchecked_rows: dict[str, str] = field(default_factory=dict)


def adapter_updates(adapter: WeightSource, adapter_cfg: dict[str, Any]) -> tuple[dict[str, LoraUpdate], dict[str, TensorEntry]]:
    """The adapter's LoRA updates by the base tensor they change, and its full copies (modules_to_save)."""
    parts: dict[str, dict[str, TensorEntry]] = {}
    copies: dict[str, TensorEntry] = {}
    for key, entry in adapter.tensors.items():
        name = strip_prefix(key)
        match = LORA_KEY_RE.match(name)
        if match is not None:
            part = match["part"] + (".bias" if match["leaf"] == "bias" else "")
            parts.setdefault(match["module"], {})[part] = entry
        elif ".original_module." not in name and ".base_layer." not in name:
            # The base's own matrix, which peft saves beside an adapted embedding, changes nothing.
            copies[WRAPPER_RE.sub("", name)] = entry
    rslora = bool(adapter_cfg.get("use_rslora", False))
    fan_in_fan_out = bool(adapter_cfg.get("fan_in_fan_out", False))
    updates = {}
    for module, found in parts.items():
        embedding = "lora_embedding_A" in found
        a, b = (found["lora_embedding_A"], found["lora_embedding_B"]) if embedding else (found["lora_A"], found["lora_B"])
        scaling = lora_scaling(module_alpha(adapter_cfg, module), a.shape[0], rslora)
        updates[f"{module}.weight"] = LoraUpdate(
            a, b, scaling, embedding, fan_in_fan_out and not embedding,
            found.get("lora_magnitude_vector"), found.get("lora_B.bias"),
        )  # fmt: skip
    return updates, copies


def expectations(
    base: WeightSource, adapter: WeightSource, adapter_cfg: dict[str, Any], output_tied: bool
) -> dict[str, Expectation]:
    """Every tensor the merged folder must hold, by name, with what it must equal."""
    updates, copies = adapter_updates(adapter, adapter_cfg)
    expected = {name: Expectation(entry) for name, entry in base.tensors.items()}
    embedding = next((n for n in EMBEDDING_NAMES if n in base.tensors), None)
    untied_now = OUTPUT_HEAD_NAME not in base.tensors and embedding is not None and not output_tied
    if untied_now:
        # A tied base written untied: the head starts as the base's input embedding.
        expected[OUTPUT_HEAD_NAME] = Expectation(base.tensors[embedding])
    for name, copy in copies.items():
        expected.setdefault(name, Expectation(None)).copy = copy
    for name, update in updates.items():
        if name not in expected:
            raise Lora2ggufError(f"{adapter.files[0]}: adapter updates '{name}', which the base model does not have")
        expected[name].lora = update
        if update.bias is not None:
            bias = name.removesuffix(".weight") + ".bias"
            expected.setdefault(bias, Expectation(base.tensors.get(bias))).bias_of = update
    if output_tied and embedding is not None:
        _check_tied_head(adapter, expected.get(OUTPUT_HEAD_NAME), expected[embedding], embedding)
        expected.pop(OUTPUT_HEAD_NAME, None)
    return expected


def _check_tied_head(adapter: WeightSource, head: Expectation | None, embedding: Expectation, name: str) -> None:
    """Written tied, the output head is the input embedding: that is the trained model only when the
    adapter leaves both alone or gives both the same full copy."""
    head_changed = head is not None and (head.lora is not None or head.copy is not None)
    embedding_changed = embedding.lora is not None or embedding.copy is not None
    if not head_changed and not embedding_changed:
        return
    same_copies = (
        head is not None and head.lora is None and embedding.lora is None
        and head.copy is not None and embedding.copy is not None
        and np.array_equal(_read(head.copy, 0, head.copy.shape[0]), _read(embedding.copy, 0, embedding.copy.shape[0]))
    )  # fmt: skip
    if not same_copies:
        changed = OUTPUT_HEAD_NAME if head_changed else name
        raise Lora2ggufError(
            f"{adapter.files[0]}: the adapter changes '{changed}' but the merged model was written with tied "
            "embeddings, so the output head would be the input embedding (the tied head moved); nothing was written"
        )


def check_merged_weights(
    folder: Path, expected: dict[str, Expectation], dtype: str, allow_pickle_sources: bool = False
) -> dict[str, Any]:
    """Check every tensor written into ``folder`` against ``expected``; raise naming the first that is wrong.

    Returns the report's figures: tensors by kind, elements, the worst error as a fraction of its
    rounding bound, and how far rounding moved the LoRA updates as a whole.
    """
    written = {entry.name: entry for shard in sorted(folder.glob("*.safetensors")) for entry in read_header(shard)}
    missing = sorted(set(expected) - set(written))
    extra = sorted(set(written) - set(expected))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"not in the base or adapter: {extra[:3]}"
        raise Lora2ggufError(f"{folder}: the merged weights do not have the base's tensors ({what}); nothing was written")
    tally = _Tally()
    for name in _progress(sorted(written)):
        _check_tensor(written[name], expected[name], dtype, tally)
    return _summary(tally, dtype)


def _progress(names: list[str]) -> Iterator[str]:
    from tqdm import tqdm

    yield from tqdm(names, desc="checking merged tensors", unit="tensor", leave=False, disable=None)


def _check_tensor(out: TensorEntry, exp: Expectation, dtype: str, tally: _Tally) -> None:
    tally.elements += out.n_elements
    if exp.lora is None and exp.bias_of is None:
        _check_unchanged(out, exp, dtype, tally)
        return
    if exp.copy is not None:
        raise Lora2ggufError(f"{exp.copy.path}: '{out.name}' has both a full copy and a LoRA update; peft keeps one")
    kernels = _kernels()
    dora = exp.lora is not None and exp.lora.magnitude is not None
    tally.tensors["dora" if dora else "lora"] += 1
    rows = out.shape[0]
    base_rows = exp.base.shape[0] if exp.base is not None else 0
    if base_rows < rows:
        tally.unchecked_rows[out.name] = f"rows {base_rows}..{rows - 1} added by resizing the vocabulary (not from a file)"
    by_column = dora and (exp.lora.embedding or exp.lora.fan_in_fan_out)
    if by_column and base_rows < rows:
        # DoRA's column norms run over the added rows too, whose values come from no file.
        tally.unchecked_rows[out.name] = "all rows: DoRA on a resized embedding normalises over rows from no file"
        return
    column_scale = _dora_column_scale(out, exp) if by_column else np.ones(out.n_elements // rows, np.float32)
    weight = _DORA_EXTRA_ROUNDINGS if dora else 1.0
    row_dora = dora and not by_column
    magnitudes = _read(exp.lora.magnitude, 0, rows).reshape(-1) if row_dora else np.empty(0, np.float32)  # type: ignore[union-attr]
    for start, stop in row_slices(out, _SLICE_ELEMENTS, min(rows, base_rows)):
        left, right, rank = _factors(exp, start, stop)
        w, w0 = _kernel_pair(out, exp.base, start, stop)
        magnitude = magnitudes[start:stop]
        rank_error = np.float32(rank * 2.0**-23)
        # float32 scalars: the kernel's arithmetic stays in float32 (mixed with float64 it runs 4x slower).
        judged = kernels.judge_rows(
            w, w0, left, right, magnitude, column_scale, np.float32(_ROUNDING[dtype]), np.float32(weight),
            np.float32(_TINY[dtype]), rank_error, w.dtype == np.uint16, w0.dtype == np.uint16,
        )  # fmt: skip
        _judge(out, exp, judged, start, tally)


def _kernels() -> Any:
    """The compiled kernels, imported on first use: numba's import and cache load cost about a second."""
    from lora2gguf.merge import _algebra_numba

    return _algebra_numba


def _kernel_pair(out: TensorEntry, base: TensorEntry | None, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows [start, stop) of the written and the base tensor, both bf16 bit patterns or both float32
    (one compiled kernel for each pairing); a tensor with no base starts from zeros."""
    w = _stored(out, start, stop)
    w0 = _stored(base, start, stop) if base is not None else np.zeros(w.shape, np.float32)
    if w.dtype != w0.dtype:
        w, w0 = (bf16_to_f32(x) if x.dtype == np.uint16 else x for x in (w, w0))
    return w, w0


def _dora_column_scale(out: TensorEntry, exp: Expectation) -> np.ndarray:
    """DoRA on an embedding ([num_embeddings, dim]) or a Conv1D weight ([in, out]) scales columns:
    magnitude / ||w0 + update|| over each column of the stored tensor, as peft merges it."""
    kernels = _kernels()
    sums = np.zeros(out.n_elements // out.shape[0], dtype=np.float64)
    for start, stop in row_slices(out, _SLICE_ELEMENTS):
        left, right, _ = _factors(exp, start, stop)
        w0 = _stored(exp.base, start, stop)  # type: ignore[arg-type]  # a LoRA module always has a base
        sums += kernels.column_square_sums(w0, left, right, w0.dtype == np.uint16)
    # One magnitude per column: merge.inputs.check_adapter_fits_base refused any other length already.
    magnitude = _read(exp.lora.magnitude, 0, exp.lora.magnitude.shape[0]).reshape(-1)  # type: ignore[union-attr]
    return (magnitude / np.sqrt(sums)).astype(np.float32)


def _stored(entry: TensorEntry, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) as a 2-D array for the kernel: bf16 as its bit patterns, anything else as
    float32 (a vector is one row)."""
    if entry.dtype == "BF16" and entry.offset >= 0:
        values = _raw(entry, start, stop)
    else:
        values = _read(entry, start, stop)
    return np.ascontiguousarray(values.reshape(values.shape[0] if values.ndim > 1 else 1, -1))


def _check_unchanged(out: TensorEntry, exp: Expectation, dtype: str, tally: _Tally) -> None:
    """A tensor the adapter does not touch (or replaces by a full copy): the source's values, rounded
    once to the output dtype when the source is stored wider (bytes compared when the dtype is the same)."""
    source = exp.copy if exp.copy is not None else exp.base
    kind = "copy" if exp.copy is not None else "unchanged"
    tally.tensors[kind] += 1
    if source is None or source.shape != out.shape:
        have = None if source is None else list(source.shape)
        raise Lora2ggufError(
            f"{out.path}: tensor '{out.name}' has shape {list(out.shape)}, its source ({kind}) {have}; nothing was written"
        )
    raw = source.dtype == out.dtype and source.offset >= 0
    for start, stop in row_slices(out, _SLICE_ELEMENTS):
        if raw:
            w, want = _raw(out, start, stop), _raw(source, start, stop)
            same = w == want
        else:
            w, want = _read(out, start, stop), _round_to(dtype, _read(source, start, stop))
            same = (w == want) | (np.isnan(w) & np.isnan(want))
        if bool(same.all()):
            continue
        where = np.unravel_index(int(np.argmin(same)), same.shape)
        got, expected = (float(_widened(x[where], out.dtype)) for x in (w, want)) if raw else (w[where], want[where])
        raise Lora2ggufError(
            f"{out.path}: tensor '{out.name}' should be the {'adapter copy' if kind == 'copy' else 'base'}'s "
            f"{source.path.name}:{source.name} unchanged, but {int(same.size - same.sum())} of {same.size} "
            f"values differ (first at {[int(i) + (start if k == 0 else 0) for k, i in enumerate(where)]}: "
            f"{float(got)!r} vs {float(expected)!r}); nothing was written"
        )


def _judge(out: TensorEntry, exp: Expectation, judged: tuple[np.ndarray, ...], start: int, tally: _Tally) -> None:
    """Fold a slice's per-row results into the tally; raise, with a diagnosis, when an element exceeds its bound."""
    worst, bad, first, error_sq, update_sq = judged
    ratio = float(worst.max()) if worst.size else 0.0
    if ratio > tally.worst_ratio or tally.worst_tensor is None:
        tally.worst_ratio, tally.worst_tensor = ratio, out.name
    tally.update_error_sq += float(error_sq.sum())
    tally.update_sq += float(update_sq.sum())
    count = int(bad.sum())
    if count == 0:
        return
    row = int(np.argmax(bad > 0))
    where = [start + row, int(first[row])] if len(out.shape) > 1 else [start + int(first[row])]
    raise Lora2ggufError(
        f"{out.path}: tensor '{out.name}' is not the base plus the adapter's update: {count} values from row "
        f"{start} on exceed the rounding bound (first at {where}); {diagnose(out, exp)}; nothing was written"
    )


def diagnose(out: TensorEntry, exp: Expectation) -> str:
    """A best guess at what went wrong with a tensor that failed its check (the whole tensor is read)."""
    w = _read(out, 0, out.shape[0])
    if not bool(np.isfinite(w).all()):
        return f"it holds {int((~np.isfinite(w)).sum())} NaN/Inf values"
    w0 = _base_rows(exp, 0, out.shape[0], out.shape)
    left, right, _ = _factors(exp, 0, out.shape[0])
    update = (left @ right).reshape(w.shape)
    if exp.lora is None or exp.lora.magnitude is not None or not np.any(update):
        return "the written values differ from the expected ones"
    moved = (w - w0).astype(np.float64).ravel()
    want = update.astype(np.float64).ravel()
    factor = float(moved @ want / (want @ want))
    if update.ndim == 2 and update.shape[0] == update.shape[1]:
        transposed = update.T.astype(np.float64).ravel()
        if np.linalg.norm(moved - transposed) < 0.5 * np.linalg.norm(moved - want):
            return "the update was applied transposed"
    if abs(factor) < 0.05:
        return "the update was not applied (the base weight is unchanged)"
    return (
        f"the written update is {factor:.3g} x the expected one, whose scale {exp.lora.scaling:g} comes from "
        "adapter_config.json (lora_alpha / r, or / sqrt(r) with use_rslora, alpha_pattern per module)"
    )


def _read(entry: TensorEntry, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a tensor (elements of a vector) as float32."""
    if entry.offset < 0:
        values = _pickle_tensor(entry.path, entry.name)
        return np.array(values[start:stop] if values.ndim else values, dtype=np.float32)
    rows = (start, stop) if len(entry.shape) > 1 else None
    with open_tensor(entry, rows) as data:
        return np.array(data[start:stop] if data.ndim == 1 else data, dtype=np.float32)


def _raw(entry: TensorEntry, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a tensor as stored (bf16 as its uint16 bit patterns)."""
    rows = (start, stop) if len(entry.shape) > 1 else None
    with open_tensor(entry, rows, widen=False) as data:
        return np.array(data[start:stop] if data.ndim == 1 else data)


def _widened(value: Any, dtype: str) -> float:
    return float(bf16_to_f32(np.array([value], dtype=np.uint16))[0]) if dtype == "BF16" else float(value)


@functools.lru_cache(maxsize=4)
def _pickle_state(path: Path) -> dict[str, Any]:
    import torch  # a pickle source: only when the user allowed pickle checkpoints

    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _pickle_tensor(path: Path, name: str) -> np.ndarray:
    return _pickle_state(path)[name].float().numpy()


def _base_rows(exp: Expectation, start: int, stop: int, shape: tuple[int, ...]) -> np.ndarray:
    if exp.base is None:
        return np.zeros((stop - start, *shape[1:]), dtype=np.float32)
    return _read(exp.base, start, stop)


def _factors(exp: Expectation, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The update of rows [start, stop) as ``left @ right`` (float32, the scaling folded into ``left``)
    and its rank: s * B @ A, (B @ A).T for embeddings and Conv1D, s * bias for a LoRA bias."""
    if exp.lora is None:
        update = exp.bias_of
        bias = _read(update.bias, 0, update.bias.shape[0]).reshape(1, -1)
        return np.full((1, 1), update.scaling, dtype=np.float32), np.ascontiguousarray(bias[:, start:stop]), 1
    lora = exp.lora
    a, b = _read(lora.a, 0, lora.a.shape[0]), _read(lora.b, 0, lora.b.shape[0])
    if lora.embedding or lora.fan_in_fan_out:  # stored [num_embeddings, dim] / Conv1D [in, out]: (B @ A).T
        left, right = a[:, start:stop].T, b.T
    else:
        left, right = b[start:stop], a
    scaled = np.ascontiguousarray(left * np.float32(lora.scaling), dtype=np.float32)
    return scaled, np.ascontiguousarray(right, dtype=np.float32), lora.rank


def _round_to(dtype: str, values: np.ndarray) -> np.ndarray:
    """float32 values rounded to ``dtype`` (round to nearest even, as torch's casts) and widened back."""
    if dtype == "float16":
        return values.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        bits = values.view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
        return np.where(np.isnan(values), values, rounded.view(np.float32))
    return values


def _summary(tally: _Tally, dtype: str) -> dict[str, Any]:
    return {
        "compared": "every written tensor against the base + the adapter's update computed from the files "
        "(float32), element by element within the output dtype's rounding",
        "tensors": tally.tensors,
        "elements": tally.elements,
        "rounding_unit": _ROUNDING[dtype],
        "max_error_to_bound": float(f"{tally.worst_ratio:.4g}"),
        "worst_tensor": tally.worst_tensor,
        # How much rounding to the output dtype moved the LoRA updates, as a whole (Frobenius norms).
        "update_rounding_error": (
            round((tally.update_error_sq / tally.update_sq) ** 0.5, 6) if tally.update_sq > 0 else None
        ),
        "unchecked_rows": tally.unchecked_rows,
        "passed": True,
    }
