"""llama.cpp's imatrix GGUF format: write it, read it back, turn it into quantization weights.

The layout is the one ``llama-imatrix`` writes and ``llama-quantize --imatrix`` reads
(tools/imatrix/imatrix.cpp, common/imatrix-loader.cpp):

* metadata ``general.type = "imatrix"``, ``imatrix.datasets`` (array of strings),
  ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (uint32);
* per weight matrix ``W`` two F32 tensors: ``W.in_sum2`` with ggml shape ``(n_in, n_mat)``, the sum
  over all calibration tokens of the squared input activation of every column, and ``W.counts``
  with ggml shape ``(1, n_mat)``, the number of tokens summed (``n_mat`` is 1 for dense weights,
  the expert count for stacked experts).

llama.cpp's quantizer uses ``in_sum2 / counts`` (the mean squared activation per column) as the
importance of each column, and all ones for a matrix whose count is zero.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from lora2gguf.errors import Lora2ggufError
from lora2gguf.formats.gguf import GGUFFile, TensorEntry, read_gguf, string_array

GENERAL_TYPE = "imatrix"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUFFIX_SUMS = ".in_sum2"
SUFFIX_COUNTS = ".counts"


@dataclass
class ImatrixEntry:
    """Statistics of one weight matrix: ``sums`` (n_mat, n_in) and ``counts`` (n_mat,), float32."""

    sums: np.ndarray
    counts: np.ndarray

    def importance(self) -> np.ndarray:
        """Mean squared activation per column, flattened to ``n_mat * n_in`` as llama-quantize does."""
        n_mat, n_in = self.sums.shape
        out = np.ones((n_mat, n_in), dtype=np.float32)
        for j in range(n_mat):
            if self.counts[j] > 0:
                # float32 division, as the C++ loader
                out[j] = self.sums[j] / np.float32(self.counts[j])
        return out.reshape(-1)


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0


def write_imatrix(path: str | os.PathLike[str], imatrix: Imatrix) -> None:
    """Write ``imatrix`` to ``path`` (the caller provides atomicity) in llama.cpp's layout."""
    writer = gguf.GGUFWriter(path, arch="")
    # llama-imatrix writes no architecture key; gguf-py adds one by default.
    writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
    writer.add_type(GENERAL_TYPE)
    writer.add_array(KEY_DATASETS, list(imatrix.datasets))
    writer.add_uint32(KEY_CHUNK_COUNT, int(imatrix.chunk_count))
    writer.add_uint32(KEY_CHUNK_SIZE, int(imatrix.chunk_size))
    for name in sorted(imatrix.entries):
        entry = imatrix.entries[name]
        sums = np.ascontiguousarray(entry.sums, dtype=np.float32)
        counts = np.ascontiguousarray(entry.counts, dtype=np.float32).reshape(-1, 1)
        if sums.ndim != 2 or counts.shape[0] != sums.shape[0]:
            raise ValueError(f"{name}: sums {sums.shape} and counts {counts.shape} do not pair up")
        # numpy shape (n_mat, n_in) is ggml shape (n_in, n_mat); counts (n_mat, 1) is ggml (1, n_mat)
        writer.add_tensor(name + SUFFIX_SUMS, sums)
        writer.add_tensor(name + SUFFIX_COUNTS, counts)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """Read an imatrix GGUF (formats.gguf.read_gguf, llama.cpp's checks); every problem is reported
    with the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise Lora2ggufError(f"{path}: imatrix file not found")
    file = read_gguf(path)
    imatrix = _read_metadata(path, file)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for tensor in file.tensors:
        name, values = tensor.name, _f32_values(path, tensor)
        if name.endswith(SUFFIX_SUMS):
            sums[name[: -len(SUFFIX_SUMS)]] = values
        elif name.endswith(SUFFIX_COUNTS):
            if tensor.shape[0] != 1:
                raise Lora2ggufError(f"{path}: tensor {name} has shape {list(tensor.shape)}, expected (1, n_mat)")
            counts[name[: -len(SUFFIX_COUNTS)]] = values.reshape(-1)
        else:
            raise Lora2ggufError(f"{path}: tensor {name} is neither <weight>.in_sum2 nor <weight>.counts")
    _pair_up(path, imatrix, sums, counts)
    if not imatrix.entries:
        raise Lora2ggufError(f"{path}: no <weight>.in_sum2 / <weight>.counts tensors")
    return imatrix


def _read_metadata(path: Path, file: GGUFFile) -> Imatrix:
    """general.type and the three imatrix.* keys llama-quantize needs."""
    metadata = file.metadata
    kind = metadata.get(gguf.Keys.General.TYPE)
    if kind != GENERAL_TYPE:
        raise Lora2ggufError(
            f"{path}: general.type is {kind!r}, expected 'imatrix' (is this a model file? the legacy "
            ".dat imatrix format is not read: convert it with llama-imatrix --in-file X.dat -o X.gguf)"
        )
    for key in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE):
        if key not in metadata:
            raise Lora2ggufError(f"{path}: metadata key {key} missing (llama-quantize refuses such a file)")
    datasets = metadata[KEY_DATASETS]
    if datasets is None:  # an array of strings, left undecoded by read_gguf
        datasets = string_array(file, KEY_DATASETS)
    return Imatrix(
        datasets=[str(d) for d in datasets] if isinstance(datasets, list) else [str(datasets)],
        chunk_count=int(metadata[KEY_CHUNK_COUNT]),
        chunk_size=int(metadata[KEY_CHUNK_SIZE]),
    )


def _f32_values(path: Path, tensor: TensorEntry) -> np.ndarray:
    """A copy of an F32 tensor's values as (n_mat, n_in): ggml shape (ne0, ne1) is numpy (ne1, ne0)."""
    if tensor.type_name != gguf.GGMLQuantizationType.F32.name:
        raise Lora2ggufError(f"{path}: tensor {tensor.name} is {tensor.type_name}, expected F32")
    n_mat = tensor.shape[1] if len(tensor.shape) > 1 else 1
    return tensor.data.view(np.float32).reshape(n_mat, tensor.shape[0]).copy()


def _pair_up(path: Path, imatrix: Imatrix, sums: dict[str, np.ndarray], counts: dict[str, np.ndarray]) -> None:
    """Sums and counts of each weight into ``imatrix.entries``; both present, matching and finite."""
    for name in sorted(set(sums) | set(counts)):
        if name not in sums or name not in counts:
            missing = SUFFIX_SUMS if name not in sums else SUFFIX_COUNTS
            raise Lora2ggufError(f"{path}: tensor {name}{missing} missing (sums and counts come in pairs)")
        if sums[name].shape[0] != counts[name].shape[0]:
            raise Lora2ggufError(
                f"{path}: {name}: {sums[name].shape[0]} matrices of sums but {counts[name].shape[0]} counts"
            )
        if not (np.isfinite(sums[name]).all() and np.isfinite(counts[name]).all()):
            raise Lora2ggufError(f"{path}: tensor {name}{SUFFIX_SUMS} holds non-finite values")
        imatrix.entries[name] = ImatrixEntry(sums[name], counts[name])
