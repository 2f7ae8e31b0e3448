"""Reading a GGUF safely and copying its metadata into a gguf-py writer.

Metadata is copied as the raw bytes of each key/value record, so every value keeps its exact
type and bytes -- including empty arrays and strings, which gguf-py's typed ``add_*`` helpers
would silently drop, changing the header size.

:func:`read_gguf` parses the header itself and memory-maps the tensor data with numpy.
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
_STRING, _ARRAY = 8, 9


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
            if etype in _NUMPY:
                item = np.dtype(_NUMPY[etype]).itemsize
                end = self.pos + count * item
                if end > self.size:
                    raise Lora2ggufError(f"{self.path}: truncated GGUF header (array {key})")
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
                for _ in range(count):
                    self.value(_ARRAY, key)
                return None
        raise Lora2ggufError(f"{self.path}: metadata key {key}: unknown GGUF value type {vtype}")


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse a GGUF header and memory-map the file; any problem is an error naming the file."""
    path = Path(path)
    if not path.exists():
        raise Lora2ggufError(f"{path}: file not found")
    if not path.is_file():
        raise Lora2ggufError(f"{path}: not a file")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        magic = handle.read(4)
        if magic != b"GGUF":
            raise Lora2ggufError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
        mm = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _Cursor(memoryview(mm), path)
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):
        raise Lora2ggufError(f"{path}: GGUF version {version} is not supported (2 or 3, little-endian)")
    n_tensors = cur.take("<Q")
    n_kv = cur.take("<Q")
    records: list[tuple[str, bytes]] = []
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        start = cur.pos
        key = cur.string().decode("utf-8", errors="replace")
        vtype = cur.take("<I")
        metadata[key] = cur.value(vtype, key)
        records.append((key, bytes(cur.buf[start : cur.pos])))
    alignment = int(metadata.get("general.alignment") or 32)
    infos = []
    for _ in range(n_tensors):
        name = cur.string().decode("utf-8", errors="replace")
        n_dims = cur.take("<I")
        if not 1 <= n_dims <= 4:
            raise Lora2ggufError(f"{path}: tensor {name}: {n_dims} dimensions")
        shape = tuple(cur.take("<Q") for _ in range(n_dims))
        type_id = cur.take("<I")
        offset = cur.take("<Q")
        infos.append((name, shape, type_id, offset))
    data_offset = (cur.pos + alignment - 1) // alignment * alignment
    tensors = []
    for name, shape, type_id, offset in infos:
        try:
            qtype = gguf.GGMLQuantizationType(type_id)
        except ValueError:
            raise Lora2ggufError(f"{path}: tensor {name}: unknown ggml type id {type_id}") from None
        blk, bsize = gguf.GGML_QUANT_SIZES[qtype]
        n_el = 1
        for n in shape:
            n_el *= n
        if shape[0] % blk:
            raise Lora2ggufError(
                f"{path}: tensor {name}: row length {shape[0]} is not a multiple of {blk} ({qtype.name})"
            )
        n_bytes = n_el // blk * bsize
        start = data_offset + offset
        if start + n_bytes > size:
            raise Lora2ggufError(
                f"{path}: truncated: tensor {name} needs bytes up to {start + n_bytes} but the file has {size}"
            )
        data = np.frombuffer(mm, dtype=np.uint8, count=n_bytes, offset=start)
        tensors.append(TensorEntry(name, shape, qtype.name, start, n_bytes, data))
    return GGUFFile(path, version, records, metadata, tensors, alignment, data_offset, mm)


def field_value(field: Any) -> Any:
    try:
        return field.contents()
    except (UnicodeDecodeError, ValueError, IndexError):
        return None


def reader_value(reader: Any, key: str) -> Any:
    """The value of ``key`` in a gguf.GGUFReader's metadata, or None when absent or unreadable."""
    field = reader.fields.get(key)
    return None if field is None else field_value(field)


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
