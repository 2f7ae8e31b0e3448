"""Reading a GGUF safely and copying its metadata into a gguf-py writer.

Metadata is copied as the raw bytes of each key/value record (as GGUFReader found them), so
every value keeps its exact type and bytes -- including empty arrays and strings, which
gguf-py's typed ``add_*`` helpers would silently drop, changing the header size.
"""

from __future__ import annotations

import logging
import os
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


def open_gguf(path: str | os.PathLike[str]) -> gguf.GGUFReader:
    """Open a GGUF memory-mapped; anything unreadable becomes an error naming the file."""
    path = Path(path)
    if not path.exists():
        raise Lora2ggufError(f"{path}: file not found")
    if not path.is_file():
        raise Lora2ggufError(f"{path}: not a file")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise Lora2ggufError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:  # noqa: BLE001 - gguf-py raises ValueError, IndexError, struct errors...
        raise Lora2ggufError(f"{path}: cannot read this GGUF file (truncated or corrupt?): {exc}") from None
    size = path.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != t.n_bytes:
            raise Lora2ggufError(
                f"{path}: truncated: tensor {t.name} needs bytes up to {end} but the file has {size}"
            )
    return reader


def field_value(field: Any) -> Any:
    try:
        return field.contents()
    except (UnicodeDecodeError, ValueError, IndexError):
        return None


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Key -> decoded value of every metadata key (GGUF.* header pseudo-keys excluded)."""
    return {k: field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def raw_record(field: Any) -> bytes:
    """The serialized bytes of one key/value record exactly as stored in the file."""
    return b"".join(np.asarray(part).tobytes() for part in field.parts)


def copy_metadata(
    reader: gguf.GGUFReader,
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
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in overrides or key in drop:
            continue
        writer.add_raw_kv(key, raw_record(field))
    for key, (value, vtype) in overrides.items():
        writer.add_key_value(key, value, vtype)
    alignment = reader.fields.get("general.alignment")
    if alignment is not None:
        writer.data_alignment = int(field_value(alignment))
