"""Reading a GGUF safely and copying its metadata into a gguf-py writer.

Metadata is copied as the raw bytes of each key/value record, so every value keeps its exact
type and bytes -- including empty arrays and strings, which gguf-py's typed ``add_*`` helpers
would silently drop, changing the header size.

:func:`read_gguf` parses the header itself and memory-maps the tensor data with numpy. It is the
one GGUF reader of the package (quantize's model and imatrix, compare's file facts): it checks the
file as llama.cpp does and bounds every declared count (tensors, keys, array elements) by the file
size before reading or allocating anything for it.

gguf-py's GGUFReader (used by the tests to check our files) builds a numpy object for every
element of every metadata array -- for a 50k-token vocabulary that is seconds, as long as
llama.cpp takes for the whole quantization of a 135M model -- while the quantizer only needs
the raw records and a handful of scalar keys.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from lora2gguf.errors import Lora2ggufError

logger = logging.getLogger(__name__)

# Keys llama.cpp drops when it writes a single output file.
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")


class RawKVWriter(gguf.GGUFWriter):
    """A GGUFWriter whose metadata may hold pre-serialized key/value records.

    ``kv_data[0]`` maps key -> either a ``gguf.GGUFValue`` (packed by gguf-py as usual) or
    ``bytes`` (a whole record copied from another file: key length, key, type, value).
    """

    def add_raw_kv(self, key: str, record: bytes) -> None:
        if any(key in kv for kv in self.kv_data):
            raise ValueError(f"duplicate metadata key {key!r}")
        self.kv_data[0][key] = record  # type: ignore[assignment]

    def write_kv_data_to_file(self) -> None:
        if self.state is not gguf.gguf_writer.WriterState.HEADER:
            raise ValueError(f"Expected output file to contain the header, got {self.state}")
        assert self.fout is not None
        for fout, kv_data in zip(self.fout, self.kv_data):
            out = bytearray()
            for key, val in kv_data.items():
                if isinstance(val, (bytes, bytearray)):
                    out += val
                else:
                    out += self._pack_val(key, gguf.GGUFValueType.STRING, add_vtype=False)
                    out += self._pack_val(val.value, val.type, add_vtype=True, sub_type=val.sub_type)
            fout.write(out)
        self.flush()
        self.state = gguf.gguf_writer.WriterState.KV_DATA


_SCALAR = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NUMPY = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}
_UINT32, _STRING, _ARRAY = 4, 8, 9
# The fewest bytes one element of an array can take: its numpy size, or a string's 8-byte length.
_MIN_ITEM = {**{t: np.dtype(d).itemsize for t, d in _NUMPY.items()}, _STRING: 8}
# The fewest bytes a tensor info (name length, n_dims, one dimension, type, offset) and a key/value
# record (key length, value type, one byte of value) can take in a GGUF header.
_MIN_TENSOR_INFO = 8 + 4 + 8 + 4 + 8
_MIN_KV = 8 + 4 + 1


@dataclass
class TensorEntry:
    """One tensor of a GGUF file: ggml shape (ne[0] first), type, and its bytes (memory-mapped)."""

    name: str
    shape: tuple[int, ...]
    type_name: str
    offset: int  # absolute file offset of the data
    n_bytes: int
    data: np.ndarray = field(repr=False)  # uint8 view of the mapped bytes

    @property
    def n_elements(self) -> int:
        total = 1
        for n in self.shape:
            total *= n
        return total


@dataclass
class GGUFFile:
    """Header of a GGUF file plus a read-only memory map of it."""

    path: Path
    version: int
    records: list[tuple[str, bytes]]  # raw key/value records in file order
    metadata: dict[str, Any]  # decoded values (arrays of strings are left as None)
    tensors: list[TensorEntry]
    alignment: int
    data_offset: int
    _map: mmap.mmap = field(repr=False)

    def release(self, offset: int, length: int) -> None:
        """Drop mapped pages of a finished tensor from our resident set (they stay in the page
        cache); without this RSS grows to the whole input on big models."""
        page = mmap.PAGESIZE
        start = offset // page * page
        try:
            self._map.madvise(mmap.MADV_DONTNEED, start, offset + length - start)
        except (AttributeError, OSError, ValueError):
            pass


class _Cursor:
    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def take(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise Lora2ggufError(
                f"{self.path}: truncated GGUF header (needs byte {self.pos + n}, file has {self.size})"
            )
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def check_count(self, count: int, least: int, what: str, items: str) -> None:
        """Refuse ``count`` items of at least ``least`` bytes each when the rest of the file cannot
        hold them (2**60 of them in a few MiB), before anything is read or allocated for them."""
        if count * least > self.size - self.pos:
            raise Lora2ggufError(
                f"{self.path}: corrupt GGUF header: {what} declares {count} {items}, more than its "
                f"{self.size} bytes can hold"
            )

    def string(self) -> bytes:
        n = self.take("<Q")
        if self.pos + n > self.size:
            raise Lora2ggufError(f"{self.path}: truncated GGUF header (string of {n} bytes at {self.pos})")
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out

    def skip_strings(self, count: int) -> None:
        unpack, buf, pos, size = struct.unpack_from, self.buf, self.pos, self.size
        for _ in range(count):
            if pos + 8 > size:
                raise Lora2ggufError(f"{self.path}: truncated GGUF header (string array at {pos})")
            pos += 8 + unpack("<Q", buf, pos)[0]
        if pos > size:
            raise Lora2ggufError(f"{self.path}: truncated GGUF header (string array ends at {pos})")
        self.pos = pos

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALAR:
            return self.take(_SCALAR[vtype])
        if vtype == _STRING:
            raw = self.string()
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                return None
        if vtype == _ARRAY:
            etype = self.take("<I")
            count = self.take("<Q")
            self.check_count(count, _MIN_ITEM.get(etype, 1), f"metadata key {key}", "array elements")
            if etype in _NUMPY:
                item = np.dtype(_NUMPY[etype]).itemsize
                end = self.pos + count * item
                arr = (
                    np.frombuffer(self.buf, dtype=_NUMPY[etype], count=count, offset=self.pos).tolist()
                    if count <= 4096
                    else None
                )
                self.pos = end
                return arr
            if etype == _STRING:
                self.skip_strings(count)
                return None
            if etype == _ARRAY:
                raise Lora2ggufError(f"{self.path}: metadata key {key}: an array of arrays (llama.cpp refuses them)")
        raise Lora2ggufError(f"{self.path}: metadata key {key}: unknown GGUF value type {vtype}")


# The value types llama.cpp insists on for the keys it (and lora2gguf quantize) reads: gguf.cpp
# refuses a general.alignment that is not UINT32, llama_model_loader any other key of the wrong
# type ("key ... has wrong type"). Keys after "<arch>." are per architecture; per-layer values
# may be arrays.
_KEY_TYPES: dict[str, tuple[int, ...]] = {
    "general.alignment": (_UINT32,),
    "general.architecture": (_STRING,),
    "general.file_type": (_UINT32,),
    "general.quantization_version": (_UINT32,),
}
_ARCH_KEY_TYPES: dict[str, tuple[int, ...]] = {
    "block_count": (_UINT32,),
    "context_length": (_UINT32,),
    "embedding_length": (_UINT32,),
    "expert_count": (_UINT32,),
    "expert_used_count": (_UINT32,),
    "feed_forward_length": (_UINT32, _ARRAY),
    "attention.head_count": (_UINT32, _ARRAY),
    "attention.head_count_kv": (_UINT32, _ARRAY),
}
_TYPE_NAMES = {t.value: t.name for t in gguf.GGUFValueType}
# ggml's GGML_MAX_NAME: llama.cpp refuses a tensor name of this many bytes or more.
_MAX_NAME = 64


@dataclass
class _Header:
    """What precedes the tensor data: key/value records and the tensor table, as read."""

    version: int
    records: list[tuple[str, bytes]]
    metadata: dict[str, Any]
    infos: list[tuple[str, tuple[int, ...], int, int]]  # name, shape, ggml type id, relative offset
    alignment: int
    data_offset: int


def _read_kv(cur: _Cursor, n_kv: int) -> tuple[list[tuple[str, bytes]], dict[str, Any], dict[str, int]]:
    """The key/value records; an empty or repeated key is refused, as llama.cpp does."""
    records: list[tuple[str, bytes]] = []
    metadata: dict[str, Any] = {}
    types: dict[str, int] = {}
    for _ in range(n_kv):
        start = cur.pos
        key = cur.string().decode("utf-8", errors="replace")
        if not key:
            raise Lora2ggufError(f"{cur.path}: metadata key {len(records)} is empty")
        if key in types:
            raise Lora2ggufError(f"{cur.path}: metadata key {key} appears twice (llama.cpp refuses the file)")
        types[key] = cur.take("<I")
        metadata[key] = cur.value(types[key], key)
        records.append((key, bytes(cur.buf[start : cur.pos])))
    return records, metadata, types


def _check_key_types(path: Path, metadata: dict[str, Any], types: dict[str, int]) -> None:
    arch = metadata.get("general.architecture")
    expected = dict(_KEY_TYPES)
    if isinstance(arch, str):
        expected.update({f"{arch}.{suffix}": allowed for suffix, allowed in _ARCH_KEY_TYPES.items()})
    for key, allowed in expected.items():
        if key in types and types[key] not in allowed:
            raise Lora2ggufError(
                f"{path}: metadata key {key} has type {_TYPE_NAMES.get(types[key], types[key])}, expected "
                f"{' or '.join(_TYPE_NAMES[t] for t in allowed)} (llama.cpp refuses the file)"
            )


def _alignment(path: Path, metadata: dict[str, Any]) -> int:
    alignment = metadata.get("general.alignment", 32)
    if alignment == 0 or alignment & (alignment - 1):
        raise Lora2ggufError(
            f"{path}: metadata key general.alignment is {alignment}, not a power of two (llama.cpp refuses the file)"
        )
    return int(alignment)


def _read_tensor_info(cur: _Cursor, seen: set[str]) -> tuple[str, tuple[int, ...], int, int]:
    """One entry of the tensor table, with llama.cpp's checks on the name and the dimensions."""
    path = cur.path
    raw_name = cur.string()
    name = raw_name.decode("utf-8", errors="replace")
    if len(raw_name) >= _MAX_NAME:
        raise Lora2ggufError(f"{path}: tensor name {name!r} is {len(raw_name)} bytes, llama.cpp allows {_MAX_NAME - 1}")
    if name in seen:
        raise Lora2ggufError(f"{path}: tensor {name} appears twice in the tensor table")
    seen.add(name)
    n_dims = cur.take("<I")
    if not 1 <= n_dims <= 4:
        raise Lora2ggufError(f"{path}: tensor {name}: {n_dims} dimensions")
    shape = tuple(cur.take("<Q") for _ in range(n_dims))
    n_elements = 1
    for n in shape:
        n_elements *= n
    if max(shape) >= 2**63 or n_elements >= 2**63:
        raise Lora2ggufError(f"{path}: tensor {name}: shape {list(shape)} is out of range")
    type_id = cur.take("<I")
    offset = cur.take("<Q")
    return name, shape, type_id, offset


def _read_header(cur: _Cursor) -> _Header:
    path = cur.path
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):
        raise Lora2ggufError(f"{path}: GGUF version {version} is not supported (2 or 3, little-endian)")
    n_tensors = cur.take("<Q")
    n_kv = cur.take("<Q")
    if n_tensors * _MIN_TENSOR_INFO + n_kv * _MIN_KV > cur.size - cur.pos:
        raise Lora2ggufError(
            f"{path}: corrupt GGUF header: it declares {n_tensors} tensors and {n_kv} metadata keys, "
            f"more than its {cur.size} bytes can hold"
        )
    records, metadata, types = _read_kv(cur, n_kv)
    _check_key_types(path, metadata, types)
    alignment = _alignment(path, metadata)
    seen: set[str] = set()
    infos = [_read_tensor_info(cur, seen) for _ in range(n_tensors)]
    data_offset = (cur.pos + alignment - 1) // alignment * alignment
    return _Header(version, records, metadata, infos, alignment, data_offset)


def _misplaced(offset: int, expected: int, alignment: int) -> str:
    if offset % alignment:
        return f"data offset {offset} is not a multiple of the alignment {alignment}"
    return (
        f"data offset {offset}, expected {expected} (tensor data must follow the order of the tensor table, "
        f"each tensor starting at the next multiple of {alignment} bytes)"
    )


def _tensor_entry(
    path: Path, mm: mmap.mmap, info: tuple[str, tuple[int, ...], int, int], expected: int, head: _Header
) -> TensorEntry:
    """One tensor, its type, block fit and place checked: it must start at ``expected`` (relative to
    the data section: the layout llama.cpp requires, in table order, each aligned) and end in the file."""
    name, shape, type_id, offset = info
    try:
        qtype = gguf.GGMLQuantizationType(type_id)
        blk, bsize = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise Lora2ggufError(f"{path}: tensor {name}: unknown ggml type id {type_id}") from None
    n_el = 1
    for n in shape:
        n_el *= n
    if shape[0] % blk:
        raise Lora2ggufError(f"{path}: tensor {name}: row length {shape[0]} is not a multiple of {blk} ({qtype.name})")
    n_bytes = n_el // blk * bsize
    if offset != expected:
        raise Lora2ggufError(
            f"{path}: tensor {name}: {_misplaced(offset, expected, head.alignment)} (llama.cpp refuses the file)"
        )
    start = head.data_offset + offset
    if start + n_bytes > len(mm):
        raise Lora2ggufError(
            f"{path}: truncated: tensor {name} needs bytes up to {start + n_bytes} but the file has {len(mm)}"
        )
    data = np.frombuffer(mm, dtype=np.uint8, count=n_bytes, offset=start)
    return TensorEntry(name, shape, qtype.name, start, n_bytes, data)


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse a GGUF header and memory-map the file; any problem is an error naming the file.

    The file is checked as llama.cpp's gguf reader checks it (keys, alignment, tensor table and the
    data layout), so a file llama.cpp would refuse is refused here, not turned into a broken output.
    """
    path = Path(path)
    if not path.exists():
        raise Lora2ggufError(f"{path}: file not found")
    if not path.is_file():
        raise Lora2ggufError(f"{path}: not a file")
    with open(path, "rb") as handle:
        magic = handle.read(4)
        if magic != b"GGUF":
            raise Lora2ggufError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
        mm = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    head = _read_header(_Cursor(memoryview(mm), path))
    tensors = []
    expected = 0  # where the next tensor's data must start, relative to the data section
    for info in head.infos:
        tensors.append(_tensor_entry(path, mm, info, expected, head))
        expected += -(-tensors[-1].n_bytes // head.alignment) * head.alignment
    return GGUFFile(path, head.version, head.records, head.metadata, tensors, head.alignment, head.data_offset, mm)


def field_value(field: Any) -> Any:
    try:
        return field.contents()
    except (UnicodeDecodeError, ValueError, IndexError):
        return None


def string_array(file: GGUFFile, key: str) -> list[str] | None:
    """The strings of an array-of-strings key, decoded from its raw record (``metadata`` leaves such
    arrays as None: decoding a whole vocabulary would cost seconds); None when the key is absent, is
    no array of strings, or holds a string that is not UTF-8."""
    record = dict(file.records).get(key)
    if record is None:
        return None
    cur = _Cursor(record, file.path)
    cur.string()  # the key itself
    if cur.take("<I") != _ARRAY or cur.take("<I") != _STRING:
        return None
    count = cur.take("<Q")  # bounded when read_gguf read the record
    try:
        return [cur.string().decode("utf-8") for _ in range(count)]
    except UnicodeDecodeError:
        return None


def raw_record(field: Any) -> bytes:
    """The serialized bytes of one key/value record exactly as stored in the file."""
    return b"".join(np.asarray(part).tobytes() for part in field.parts)


def copy_metadata(
    reader: gguf.GGUFReader | GGUFFile,
    writer: RawKVWriter | gguf.GGUFWriter,
    overrides: dict[str, tuple[Any, gguf.GGUFValueType]] | None = None,
    drop: tuple[str, ...] = SPLIT_KEYS,
) -> None:
    """Copy every key of ``reader`` in file order, then append ``overrides`` (removing the
    originals first), the way llama.cpp's gguf_set_kv + gguf_set_val_* order them."""
    overrides = overrides or {}
    if not isinstance(writer, RawKVWriter):
        raise TypeError("copy_metadata needs a RawKVWriter")
    # GGUFWriter's constructor pre-adds general.architecture; start from an empty table so the
    # input's own key order is kept.
    writer.kv_data[0].clear()
    if isinstance(reader, GGUFFile):
        records = reader.records
        alignment: int | None = reader.alignment
    else:
        records = [(k, raw_record(f)) for k, f in reader.fields.items() if not k.startswith("GGUF.")]
        align_field = reader.fields.get("general.alignment")
        alignment = None if align_field is None else int(field_value(align_field))
    for key, record in records:
        if key in overrides or key in drop:
            continue
        writer.add_raw_kv(key, record)
    for key, (value, vtype) in overrides.items():
        writer.add_key_value(key, value, vtype)
    if alignment is not None:
        writer.data_alignment = alignment
