"""Read safetensors files: the one header reader, and tensors one at a time through short-lived memory maps.

The format is simple (8-byte little-endian header length, a JSON header with dtype/shape/byte
offsets, then raw little-endian data), so the header is parsed here and checked against the file
size: a wrong adapter, a truncated download or a bit flip is refused in milliseconds, before any
model is loaded, always with the file and tensor named. ``lora2gguf merge`` reads shapes from it;
``lora2gguf convert`` also reads the data.

Why not ``safetensors.safe_open(..., framework="np")`` for the data: numpy has no bfloat16, so the
numpy framework refuses BF16 tensors (the usual dtype of merged LLM checkpoints), and the torch
framework is exactly what ``lora2gguf convert`` must not import. Each tensor's byte range is mapped
on its own; unmapping it after use returns its pages, so resident memory stays at the largest
tensor (plus its converted copy) instead of growing to the whole checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lora2gguf.artifacts import check_links_inside
from lora2gguf.errors import Lora2ggufError

logger = logging.getLogger(__name__)

# safetensors dtype tag (the format's spec lists these) -> (bytes per element, numpy dtype that views
# the raw bytes in ``open_tensor``). BF16 is viewed as uint16 and widened by ``bf16_to_f32``; tags
# without a view (wide unsigned ints, 8-bit floats) are only sized, for checking a header.
_DTYPES: dict[str, tuple[int, np.dtype | None]] = {
    "F64": (8, np.dtype("<f8")),
    "F32": (4, np.dtype("<f4")),
    "F16": (2, np.dtype("<f2")),
    "BF16": (2, np.dtype("<u2")),
    "I64": (8, np.dtype("<i8")),
    "I32": (4, np.dtype("<i4")),
    "I16": (2, np.dtype("<i2")),
    "I8": (1, np.dtype("i1")),
    "U8": (1, np.dtype("u1")),
    "BOOL": (1, np.dtype("?")),
    "U64": (8, None),
    "U32": (4, None),
    "U16": (2, None),
    "F8_E4M3": (1, None),
    "F8_E5M2": (1, None),
}
# The format's own limit for the JSON header; a larger length prefix means the file is not safetensors.
_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype tag, shape and absolute byte range.

    Tensors of a pickle checkpoint (which ``lora2gguf merge`` may be allowed to read) have no byte
    range of their own: their offset is -1 and ``open_tensor`` cannot map them.
    """

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32: bf16 is the top half of an f32, so exact."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object hook that refuses a repeated key: json.loads would keep the last one silently,
    so two entries for one tensor would not both be checked."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _load_json_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """The parsed JSON header, the offset where the data section starts, and the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise Lora2ggufError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            header_len = int.from_bytes(prefix, "little")
            if header_len > min(size - 8, _MAX_HEADER):
                raise Lora2ggufError(
                    f"{path}: truncated or not a safetensors file (header length {header_len} bytes, "
                    f"file holds {size} bytes)"
                )
            raw = handle.read(header_len)
    except OSError as exc:
        raise Lora2ggufError(f"{path}: cannot read: {exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise Lora2ggufError(f"{path}: corrupt safetensors header (key '{exc.key}' appears twice)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Lora2ggufError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise Lora2ggufError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header, 8 + header_len, size


def _whole(value: Any) -> int:
    """A JSON integer as such: int() would also take 2.5 (truncated), "7" or true."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{value!r} is not an integer")
    return value


def _entry(path: Path, name: str, meta: Any, data_start: int, data_bytes: int) -> TensorEntry:
    """One header entry, checked: a byte range that fits its dtype and shape, inside the data section."""
    corrupt = f"{path}: corrupt safetensors header entry for tensor '{name}'"
    try:
        dtype = meta["dtype"]
        shape = tuple(_whole(d) for d in meta["shape"])
        begin, end = (_whole(x) for x in meta["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise Lora2ggufError(corrupt) from None
    if begin < 0 or end < begin:
        raise Lora2ggufError(f"{corrupt} (data_offsets [{begin}, {end}]: negative or reversed)")
    if not isinstance(dtype, str) or any(d < 0 for d in shape):
        raise Lora2ggufError(f"{corrupt} (dtype {dtype!r}, shape {list(shape)})")
    if dtype in _DTYPES and end - begin != _DTYPES[dtype][0] * math.prod(shape):
        raise Lora2ggufError(
            f"{path}: tensor '{name}' declares {end - begin} bytes but {dtype}{list(shape)} needs "
            f"{_DTYPES[dtype][0] * math.prod(shape)}"
        )
    if end > data_bytes:
        raise Lora2ggufError(
            f"{path}: truncated: tensor '{name}' ends at byte {end} of the data section but the file "
            f"holds only {data_bytes} data bytes (incomplete download or copy?)"
        )
    return TensorEntry(name, path, dtype, shape, data_start + begin, end - begin)


def read_header(path: Path) -> list[TensorEntry]:
    """Parse one .safetensors header and check every entry against the file size, in header order.

    A truncated or corrupt file raises naming it (and the tensor, where one is at fault).
    """
    header, data_start, size = _load_json_header(path)
    data_bytes = size - data_start
    entries = [
        _entry(path, name, meta, data_start, data_bytes) for name, meta in header.items() if name != "__metadata__"
    ]
    _check_layout(path, entries, data_start, data_bytes)
    return entries


def _check_layout(path: Path, entries: list[TensorEntry], data_start: int, data_bytes: int) -> None:
    """The byte ranges, in offset order, must tile the data section exactly, as the safetensors
    library requires: an overlap would read one tensor's bytes as another's, a gap or trailing
    bytes mean the header does not describe the file."""
    end = 0
    previous: TensorEntry | None = None
    for entry in sorted(entries, key=lambda e: (e.offset, e.nbytes)):
        begin = entry.offset - data_start
        if begin < end:
            assert previous is not None
            raise Lora2ggufError(
                f"{path}: corrupt safetensors header: tensor '{entry.name}' (data bytes {begin}-{begin + entry.nbytes})"
                f" overlaps tensor '{previous.name}' (data bytes {previous.offset - data_start}-{end})"
            )
        if begin > end:
            raise Lora2ggufError(
                f"{path}: corrupt safetensors header: {begin - end} unused bytes before tensor '{entry.name}' "
                f"(it starts at data byte {begin}, the tensor before it ends at {end})"
            )
        end, previous = begin + entry.nbytes, entry
    if end != data_bytes:
        raise Lora2ggufError(
            f"{path}: corrupt safetensors file: tensors cover {end} data bytes but the file holds {data_bytes} "
            f"({data_bytes - end} bytes after the last tensor)"
        )


def read_metadata(path: Path) -> dict[str, Any]:
    """The header's free-form ``__metadata__`` (``{}`` when it has none)."""
    header, _, _ = _load_json_header(path)
    metadata = header.get("__metadata__", {})
    return metadata if isinstance(metadata, dict) else {}


def find_weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors parts, sorted by name (the order llama.cpp's converter uses)."""
    index = model_dir / "model.safetensors.index.json"
    check_links_inside(model_dir, [index, *model_dir.glob("model*.safetensors")])
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            parts = sorted({str(v) for v in weight_map.values()})
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise Lora2ggufError(f"{index}: cannot read key 'weight_map': {exc}") from None
        # An index may name any path ("../elsewhere.safetensors"): each part must lie in the folder too.
        check_links_inside(model_dir, [model_dir / p for p in parts])
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


def _check_viewable(entry: TensorEntry) -> None:
    if _DTYPES.get(entry.dtype, (0, None))[1] is None:
        supported = sorted(tag for tag, (_, view) in _DTYPES.items() if view is not None)
        raise Lora2ggufError(
            f"{entry.path}: tensor {entry.name!r} has dtype {entry.dtype}, which the converter does not handle "
            f"(supported: {', '.join(supported)})"
        )


def index_tensors(model_dir: Path) -> list[TensorEntry]:
    """All tensors of the checkpoint in conversion order: parts by name, names sorted within a part."""
    files = find_weight_files(model_dir)
    entries: list[TensorEntry] = []
    seen: dict[str, Path] = {}
    for path in files:
        header = read_header(path)
        for entry in header:
            _check_viewable(entry)
        for entry in sorted(header, key=lambda e: e.name):
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


def row_slices(entry: TensorEntry, elements: int, rows: int | None = None) -> Iterator[tuple[int, int]]:
    """Ranges ``[start, stop)`` over the first ``rows`` rows of a tensor (all by default), each of about
    ``elements`` values, to read a large tensor through ``open_tensor`` a slice at a time."""
    total = entry.shape[0] if entry.shape else 1
    per_row = max(1, entry.n_elements // total) if total else 1
    step = max(1, elements // per_row)
    for start in range(0, total if rows is None else rows, step):
        yield start, min(total if rows is None else rows, start + step)


@contextlib.contextmanager
def open_tensor(
    entry: TensorEntry, rows: tuple[int, int] | None = None, widen: bool = True
) -> Iterator[np.ndarray]:
    """Map one tensor's bytes (or rows ``[start, stop)`` of it) read-only and yield them as an array.

    BF16 comes back widened to float32 (``widen=False``: its bit patterns, as uint16). The array may be a view of the mapping: consume it
    (convert, write) inside the ``with`` block. Mapping only the rows in use keeps resident memory
    at the size of that slice, because file pages count as resident while they are mapped.
    """
    _check_viewable(entry)
    itemsize, np_dtype = _DTYPES[entry.dtype]
    shape = entry.shape
    offset, nbytes = entry.offset, entry.nbytes
    if rows is not None:
        start, stop = rows
        row_bytes = entry.nbytes // shape[0] if shape and shape[0] else 0
        shape = (stop - start, *shape[1:])
        offset, nbytes = entry.offset + start * row_bytes, (stop - start) * row_bytes
    count = nbytes // itemsize
    if nbytes == 0:
        yield np.zeros(shape, dtype=np.float32 if entry.dtype == "BF16" and widen else np_dtype)
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
        array = bf16_to_f32(raw) if entry.dtype == "BF16" and widen else raw
        del raw
        yield array
        del array
    finally:
        try:
            mapping.close()
        except BufferError:
            # A caller kept a view alive; the mapping is freed with that view instead.
            logger.debug("tensor %s: mapping still referenced, left to the garbage collector", entry.name)
