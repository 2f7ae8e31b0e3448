"""Read safetensors checkpoints one tensor at a time through short-lived memory maps.

Why not ``safetensors.safe_open(..., framework="np")`` for the data: numpy has no bfloat16, so the
numpy framework refuses BF16 tensors (the usual dtype of merged LLM checkpoints), and the torch
framework is exactly what ``lora2gguf convert`` must not import. The safetensors format is simple
(8-byte little-endian header length, a JSON header with dtype/shape/byte offsets, then raw
little-endian data), so the header is parsed here and each tensor's byte range is mapped on its
own. Unmapping it after use returns its pages, so resident memory stays at the largest tensor
(plus its converted copy) instead of growing to the whole checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora2gguf.errors import Lora2ggufError

logger = logging.getLogger(__name__)

# safetensors dtype tag -> (numpy dtype used to view the raw bytes, bytes per element).
# BF16 is viewed as uint16 and widened by ``bf16_to_f32``.
_DTYPES: dict[str, tuple[np.dtype, int]] = {
    "F64": (np.dtype("<f8"), 8),
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
    "I64": (np.dtype("<i8"), 8),
    "I32": (np.dtype("<i4"), 4),
    "I16": (np.dtype("<i2"), 2),
    "I8": (np.dtype("i1"), 1),
    "U8": (np.dtype("u1"), 1),
    "BOOL": (np.dtype("?"), 1),
}
_MAX_HEADER = 100 * 2**20  # the format's own limit for the JSON header


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype tag, shape and absolute byte range."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32: bf16 is the top half of an f32, so exact."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def read_header(path: Path) -> list[TensorEntry]:
    """Parse one .safetensors header and check every entry against the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise Lora2ggufError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            header_len = int.from_bytes(prefix, "little")
            if header_len <= 0 or header_len > _MAX_HEADER or 8 + header_len > size:
                raise Lora2ggufError(f"{path}: corrupt safetensors header length {header_len} (file is {size} bytes)")
            header_bytes = handle.read(header_len)
    except OSError as exc:
        raise Lora2ggufError(f"{path}: cannot read: {exc}") from None
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Lora2ggufError(f"{path}: safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise Lora2ggufError(f"{path}: safetensors header is not a JSON object")
    data_start = 8 + header_len
    entries: list[TensorEntry] = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = meta["dtype"]
            shape = tuple(int(d) for d in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise Lora2ggufError(f"{path}: tensor {name!r} has a malformed header entry: {meta!r}") from None
        if dtype not in _DTYPES:
            raise Lora2ggufError(
                f"{path}: tensor {name!r} has dtype {dtype}, which the converter does not handle "
                f"(supported: {', '.join(sorted(_DTYPES))})"
            )
        entry = TensorEntry(name, path, dtype, shape, data_start + begin, end - begin)
        if end < begin or data_start + end > size or entry.nbytes != entry.n_elements * _DTYPES[dtype][1]:
            raise Lora2ggufError(
                f"{path}: tensor {name!r} byte range [{begin}, {end}) does not fit its shape {list(shape)} "
                f"and dtype {dtype}, or runs past the end of the file (truncated download?)"
            )
        entries.append(entry)
    return entries


def find_weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors parts, sorted by name (the order llama.cpp's converter uses)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            parts = sorted({str(v) for v in weight_map.values()})
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise Lora2ggufError(f"{index}: cannot read key 'weight_map': {exc}") from None
        missing = [p for p in parts if not (model_dir / p).is_file()]
        if missing:
            raise Lora2ggufError(f"{index}: lists weight files that do not exist: {', '.join(missing)}")
        return [model_dir / p for p in parts]
    parts_found = sorted(p for p in model_dir.glob("model*.safetensors") if p.is_file())
    if parts_found:
        return parts_found
    pickles = sorted(p.name for p in model_dir.glob("*.bin"))
    if pickles:
        raise Lora2ggufError(
            f"{model_dir}: only pickle weights found ({', '.join(pickles)}); the converter reads safetensors "
            "only (pickle files can run code when loaded). Re-save the model with safe_serialization=True."
        )
    raise Lora2ggufError(f"{model_dir}: no model*.safetensors weight files found")


def index_tensors(model_dir: Path) -> list[TensorEntry]:
    """All tensors of the checkpoint in conversion order: parts by name, names sorted within a part."""
    files = find_weight_files(model_dir)
    entries: list[TensorEntry] = []
    seen: dict[str, Path] = {}
    for path in files:
        for entry in sorted(read_header(path), key=lambda e: e.name):
            if entry.name in seen:
                raise Lora2ggufError(f"{path}: tensor {entry.name!r} also appears in {seen[entry.name]}")
            seen[entry.name] = path
            entries.append(entry)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        listed = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
        if listed != set(seen):
            missing = sorted(listed - set(seen))[:5]
            extra = sorted(set(seen) - listed)[:5]
            raise Lora2ggufError(
                f"{index}: weight_map disagrees with the weight files (missing from files: {missing}, "
                f"not in weight_map: {extra})"
            )
    return entries


@contextlib.contextmanager
def open_tensor(entry: TensorEntry, rows: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
    """Map one tensor's bytes (or rows ``[start, stop)`` of it) read-only and yield them as an array.

    BF16 comes back widened to float32. The array may be a view of the mapping: consume it
    (convert, write) inside the ``with`` block. Mapping only the rows in use keeps resident memory
    at the size of that slice, because file pages count as resident while they are mapped.
    """
    np_dtype, itemsize = _DTYPES[entry.dtype]
    shape = entry.shape
    offset, nbytes = entry.offset, entry.nbytes
    if rows is not None:
        start, stop = rows
        row_bytes = entry.nbytes // shape[0] if shape and shape[0] else 0
        shape = (stop - start, *shape[1:])
        offset, nbytes = entry.offset + start * row_bytes, (stop - start) * row_bytes
    count = nbytes // itemsize
    if nbytes == 0:
        yield np.zeros(shape, dtype=np.float32 if entry.dtype == "BF16" else np_dtype)
        return
    page = mmap.ALLOCATIONGRANULARITY
    map_start = offset - offset % page
    delta = offset - map_start
    with open(entry.path, "rb") as handle:
        mapping = mmap.mmap(handle.fileno(), delta + nbytes, offset=map_start, access=mmap.ACCESS_READ)
    try:
        # Tell the kernel we read it once, front to back (readahead, early reclaim).
        with contextlib.suppress(AttributeError, OSError):
            mapping.madvise(mmap.MADV_SEQUENTIAL)
        raw = np.frombuffer(mapping, dtype=np_dtype, count=count, offset=delta).reshape(shape)
        array = bf16_to_f32(raw) if entry.dtype == "BF16" else raw
        del raw
        yield array
        del array
    finally:
        try:
            mapping.close()
        except BufferError:
            # A caller kept a view alive; the mapping is freed with that view instead.
            logger.debug("tensor %s: mapping still referenced, left to the garbage collector", entry.name)
