"""GGUF in -> per-tensor quantization -> GGUF out, streaming, with a sidecar report.

The input is memory-mapped (header parsed by :func:`lora2gguf.formats.gguf.read_gguf`). The
output is written with gguf-py's GGUFWriter in one pass: header, metadata and every tensor's
info first (all sizes are known from the plan), then the data, quantized in chunks of whole
rows by a thread pool and written in order as the chunks finish. Memory therefore stays at a
few chunks per thread plus the input pages of the current tensor (released with MADV_DONTNEED
after each tensor).

Tensor order, metadata order, alignment and padding follow what ``llama_model_quantize``
writes, so for the same input our file has the same size and layout as llama.cpp's.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import importlib.metadata
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tqdm import tqdm

from lora2gguf.artifacts import Output, atomic_file, check_paths, paired_report, sha256_file
from lora2gguf.errors import Lora2ggufError
from lora2gguf.formats.gguf import GGUFFile, RawKVWriter, TensorEntry, copy_metadata, read_gguf
from lora2gguf.formats.imatrix import Imatrix, read_imatrix
from lora2gguf.provenance import PeakMemory, build_report
from lora2gguf.quantize import blocks, kquants
from lora2gguf.quantize.recipe import (
    BLOCK,
    ModelInfo,
    Plan,
    TensorChoice,
    TensorSpec,
    is_quantized,
    plan_types,
    requires_imatrix,
    tensor_bytes,
)
from lora2gguf.quantize.types import canonical_type

logger = logging.getLogger(__name__)

# ggml's GGML_QNT_VERSION, written as general.quantization_version.
QUANTIZATION_VERSION = 2
# Weights per work item: big enough that the per-item Python overhead (future, decode, encode and
# write calls) is small, small enough that a chunk's float32 copy stays in the L2/L3 cache region.
# 2^18 against 2^16: Q4_0 and Q8_0 of the 0.5B model 3.3 -> 2.7 s on 2 cores (CPU 5.4 -> 4.7 s).
CHUNK_WEIGHTS = 1 << 18


@dataclass(frozen=True)
class QuantizeOptions:
    file_type: str
    threads: int | None = None
    allow_requantize: bool = False
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    pure: bool = False
    imatrix: str | None = None  # llama.cpp imatrix GGUF: importance-weighted quantization


def default_sidecar(out_path: str | os.PathLike[str]) -> Path:
    return Path(out_path).with_suffix(".json")


def _specs(reader: GGUFFile) -> list[TensorSpec]:
    return [TensorSpec(t.name, t.shape, t.type_name) for t in reader.tensors]


def _check_requantize(path: Path, plan: Plan, allow: bool) -> None:
    quantized = [c for c in plan.choices if is_quantized(c.src_type)]
    if not quantized:
        return
    types = sorted({c.src_type for c in quantized})
    if not allow:
        raise Lora2ggufError(
            f"{path}: already quantized ({len(quantized)} tensors of type {', '.join(types)}, e.g. "
            f"{quantized[0].name}); quantize the F16/F32 file instead, or pass --allow-requantize "
            "(quality drops: errors of both quantizations add up)"
        )
    for t in types:
        qtype = gguf.GGMLQuantizationType[t]
        try:  # decode one zero block: gguf-py lacks decoders for a few exotic types
            gguf.quants.dequantize(np.zeros(gguf.GGML_QUANT_SIZES[qtype][1], np.uint8), qtype)
        except NotImplementedError:
            raise Lora2ggufError(
                f"{path}: cannot requantize tensors of type {t}: gguf-py has no decoder"
            ) from None
    logger.warning(
        "%s: requantizing %d already-quantized tensors (%s)", path, len(quantized), ", ".join(types)
    )


def _row_chunks(n_rows: int, n_per_row: int) -> list[tuple[int, int]]:
    step = max(1, CHUNK_WEIGHTS // max(1, n_per_row))
    return [(r, min(n_rows, r + step)) for r in range(0, n_rows, step)]


@dataclass(frozen=True)
class _Job:
    """One unit of output: a chunk of rows of a converted tensor, or a whole copied tensor."""

    choice: TensorChoice
    entry: TensorEntry
    rows: tuple[int, int] | None  # None: copy the tensor's bytes unchanged
    last: bool  # the tensor's final chunk: pad and release its input pages after it
    # importance per column, one row per matrix (experts stack n_mat matrices), or None
    weights: np.ndarray | None = None


def _jobs(plan: Plan, by_name: dict[str, TensorEntry], importance: dict[str, np.ndarray]) -> Iterator[_Job]:
    for c in plan.choices:
        entry = by_name[c.name]
        if not c.converts:
            yield _Job(c, entry, None, True)
            continue
        n_rows = entry.n_elements // c.shape[0]
        chunks = _row_chunks(n_rows, c.shape[0])
        for k, bounds in enumerate(chunks):
            yield _Job(c, entry, bounds, k == len(chunks) - 1, importance.get(c.name))


def _convert(job: _Job) -> np.ndarray:
    """Decode a chunk of source rows to float32 and encode it in the target type."""
    c, (r0, r1) = job.choice, job.rows  # type: ignore[misc]
    n_per_row = c.shape[0]
    n_rows = job.entry.n_elements // n_per_row
    src_rows = job.entry.data.reshape(n_rows, -1)
    values, bad = blocks.decode_finite(c.src_type, src_rows[r0:r1], n_per_row)
    if bad >= 0:
        raise Lora2ggufError(f"tensor {c.name}: non-finite value (NaN or Inf) in row {r0 + bad}")
    if job.weights is None:
        return blocks.encode(c.dst_type, values)
    # each stacked matrix (expert) has its own importance row, as llama.cpp's imatrix_for_row
    rows_per_mat = n_rows // job.weights.shape[0]
    parts = []
    start = r0
    while start < r1:
        mat = start // rows_per_mat
        stop = min(r1, (mat + 1) * rows_per_mat)
        parts.append(blocks.encode(c.dst_type, values[start - r0 : stop - r0], job.weights[mat]))
        start = stop
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _match_imatrix(path: Path, plan: Plan, imatrix: Imatrix) -> tuple[dict[str, np.ndarray], list[str]]:
    """Importance rows for every converted tensor the imatrix covers, checked as llama.cpp does:
    a size mismatch is an error (except token_embd), a missing entry quantizes that tensor plainly."""
    weights: dict[str, np.ndarray] = {}
    missing: list[str] = []
    for c in plan.choices:
        if not c.converts or c.dst_type in ("F32", "F16", "BF16"):
            continue
        entry = imatrix.entries.get(c.name)
        if entry is None:
            missing.append(c.name)
            continue
        n_per_row = c.shape[0]
        n_mat = int(np.prod(c.shape[2:]))  # 1 for a 2-D weight
        values = entry.importance()
        if values.size != n_per_row * n_mat:
            if c.name.startswith("token_embd."):
                logger.info("%s: imatrix size %d differs from tensor %s; ignored", path, values.size, c.name)
                continue
            raise Lora2ggufError(
                f"{path}: imatrix entry {c.name} has {values.size} values, tensor {c.name} needs "
                f"{n_per_row * n_mat} ({n_per_row} columns x {n_mat} matrices): imatrix of another model?"
            )
        weights[c.name] = values.reshape(n_mat, n_per_row)
    for name in missing:
        logger.info("%s: no imatrix entry for %s; quantized without importance weights", path, name)
    return weights, missing


def _write_job(fout: Any, job: _Job, fut: concurrent.futures.Future[np.ndarray] | None) -> int:
    """Write one job's bytes (copied, or converted here or by ``fut``); returns how many."""
    if job.rows is None:
        view = job.entry.data
        for start in range(0, view.nbytes, 1 << 26):
            fout.write(memoryview(view[start : start + (1 << 26)]))
        return int(view.nbytes)
    out = fut.result() if fut is not None else _convert(job)
    fout.write(memoryview(np.ascontiguousarray(out)).cast("B"))
    return int(out.nbytes)


def _write_data(
    fout: Any,
    writer: RawKVWriter,
    reader: GGUFFile,
    plan: Plan,
    sizes_out: dict[str, int],
    threads: int,
    importance: dict[str, np.ndarray],
) -> None:
    """Stream every tensor's data in plan order. Chunks of all tensors form one queue, so small
    tensors (one chunk each) still keep every thread busy; results are written in order and at
    most ``window`` chunks are in flight, which bounds memory."""
    by_name = {t.name: t for t in reader.tensors}
    jobs = _jobs(plan, by_name, importance)
    window = 2 * threads + 2
    pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="quant") if threads > 1 else None
    pending: collections.deque[tuple[_Job, concurrent.futures.Future[np.ndarray] | None]] = (
        collections.deque()
    )

    def submit_next() -> None:
        job = next(jobs, None)
        if job is not None:
            fut = pool.submit(_convert, job) if (pool is not None and job.rows is not None) else None
            pending.append((job, fut))

    bar = tqdm(
        total=len(plan.choices),
        desc=f"quantize {plan.file_type}",
        unit="tensor",
        mininterval=1.0,
        leave=False,
    )
    written = 0
    try:
        for _ in range(window):
            submit_next()
        while pending:
            job, fut = pending.popleft()
            submit_next()
            written += _write_job(fout, job, fut)
            if job.last:
                c = job.choice
                if written != sizes_out[c.name]:
                    raise AssertionError(
                        f"tensor {c.name}: wrote {written} bytes, planned {sizes_out[c.name]}"
                    )
                writer.write_padding(fout, written)
                reader.release(job.entry.offset, job.entry.n_bytes)
                logger.debug("%-36s %-16s %5s -> %-5s %s", c.name, c.shape, c.src_type, c.dst_type, c.rule)
                written = 0
                bar.update(1)
    finally:
        bar.close()
        for _, fut in pending:
            if fut is not None:
                fut.cancel()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _summary_lines(report: dict[str, Any]) -> list[str]:
    counts = ", ".join(f"{t} x{n}" for t, n in report["tensor_types"].items())
    fb = report["fallbacks"]
    lines = [
        f"{report['type']}: {report['n_tensors']} tensors: {counts}",
        f"size {report['size']['input_tensor_mib']:.2f} MiB ({report['size']['input_bits_per_weight']:.2f} BPW) -> "
        f"{report['size']['output_tensor_mib']:.2f} MiB ({report['bits_per_weight']:.2f} BPW), file {report['size']['output_file_bytes']} bytes",
        f"{fb['count']} of {report['n_tensors']} tensors required fallback quantization"
        + (f" ({'; '.join(f'{k}: {v}' for k, v in fb['by_change'].items())})" if fb["count"] else ""),
        f"time {report['time_s']:.2f} s with {report['threads']} threads, peak RSS {report['memory']['peak_rss_mb']:.0f} MB",
    ]
    return lines


# Source types the decoder reads besides the quantized ones. Integer and F64 tensors (not in the
# models llama.cpp's converters write) have no decoder here, and the writer cannot size a copy of them.
_SOURCE_FLOATS = ("F32", "F16", "BF16")


def _check_tensors(src: Path, reader: GGUFFile) -> None:
    """Refuse, naming the tensor, what would otherwise end in a traceback or an empty output."""
    if not reader.tensors:
        raise Lora2ggufError(f"{src}: the file holds no tensors: nothing to quantize")
    for t in reader.tensors:
        if 0 in t.shape:
            raise Lora2ggufError(
                f"{src}: tensor {t.name} has a zero dimension (shape {list(t.shape)}): no weights to quantize"
            )
        if not (t.type_name in _SOURCE_FLOATS or is_quantized(t.type_name)):
            raise Lora2ggufError(
                f"{src}: tensor {t.name} has type {t.type_name}, which lora2gguf quantize does not handle "
                f"(it reads {', '.join(_SOURCE_FLOATS)} and, with --allow-requantize, quantized tensors)"
            )


def _checked_plan(
    src: Path,
    reader: GGUFFile,
    model: ModelInfo,
    file_type: str,
    options: QuantizeOptions,
    imatrix: Imatrix | None,
) -> tuple[Plan, dict[str, np.ndarray], list[str]]:
    """The per-tensor types, refused before anything is written when a tensor cannot be converted;
    with the importance rows matched to the tensors, and the tensors the imatrix lacks."""
    _check_tensors(src, reader)
    plan = plan_types(
        _specs(reader),
        model,
        file_type,
        output_tensor_type=options.output_tensor_type,
        token_embedding_type=options.token_embedding_type,
        pure=options.pure,
        has_imatrix=imatrix is not None,
    )
    _check_requantize(src, plan, options.allow_requantize)
    _check_needs_imatrix(plan, imatrix is not None)
    importance: dict[str, np.ndarray] = {}
    unweighted: list[str] = []
    if imatrix is not None:
        importance, unweighted = _match_imatrix(Path(options.imatrix), plan, imatrix)
    _check_importance_rows(plan, importance)
    for c in plan.choices:
        if c.converts and c.dst_type not in blocks.ENCODABLE:
            raise Lora2ggufError(f"tensor {c.name}: cannot write type {c.dst_type}")
        if c.dst_type not in BLOCK:  # kept as it is, in a type whose size the writer does not know
            raise Lora2ggufError(
                f"{src}: tensor {c.name} of type {c.dst_type} cannot be copied by lora2gguf quantize"
            )
    return plan, importance, unweighted


def _check_needs_imatrix(plan: Plan, has_imatrix: bool) -> None:
    """llama-quantize's refusal, before any work: a tensor of a very low-bit type (tensor_requires_imatrix)
    and no importance matrix."""
    if has_imatrix:
        return
    for c in plan.choices:
        if c.converts and requires_imatrix(c.name, c.dst_type):
            raise Lora2ggufError(
                f"{plan.file_type}: this quantization requires an importance matrix! (offending tensor: "
                f"{c.name}, target type: {c.dst_type}); pass --imatrix (make one with lora2gguf imatrix)"
            )


def _check_importance_rows(plan: Plan, importance: dict[str, np.ndarray]) -> None:
    """With an imatrix, a tensor that needs importance data but has no entry is llama.cpp's "Missing
    importance matrix for tensor X in a very low-bit quantization" (it bails out mid-file; we before
    writing). The types ggml cannot quantize without weights at all (IQ2_XXS, IQ2_XS, e.g. forced on
    token_embd) are refused the same way rather than aborting as ggml does."""
    for c in plan.choices:
        if not c.converts or c.name in importance:
            continue
        if requires_imatrix(c.name, c.dst_type) or c.dst_type in blocks.IQ_NEED_WEIGHTS:
            raise Lora2ggufError(
                f"Missing importance matrix for tensor {c.name} in a very low-bit quantization ({c.dst_type}): "
                "the imatrix has no usable entry for it"
            )


def _check_paths(src: Path, dst: Path, sidecar: Path, options: QuantizeOptions, *, given: bool) -> None:
    """The GGUF and its sidecar must not overwrite the input, the imatrix or each other (an output
    named *.json has the default sidecar's own name), nor land on a folder."""
    check_paths(
        [("IN.gguf", src), ("--imatrix", options.imatrix)],
        [Output("OUT.gguf", dst), Output("--sidecar" if given else "the sidecar (OUT with .json suffix)", sidecar)],
    )


def quantize_gguf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    options: QuantizeOptions,
    sidecar: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Quantize ``src`` into ``dst`` (atomically) and write the sidecar report; returns it."""
    src, dst = Path(src), Path(dst)
    sidecar_path = Path(sidecar) if sidecar else default_sidecar(dst)
    _check_paths(src, dst, sidecar_path, options, given=sidecar is not None)
    file_type = canonical_type(options.file_type)
    threads = max(1, options.threads or os.cpu_count() or 1)

    started = time.perf_counter()
    with PeakMemory() as mem, concurrent.futures.ThreadPoolExecutor(1) as hasher:
        # The input's hash runs beside the quantization (hashlib releases the GIL); the
        # output's is computed from the bytes as they are written.
        input_hash = hasher.submit(sha256_file, src)
        imatrix = read_imatrix(options.imatrix) if options.imatrix else None
        reader = read_gguf(src)
        model = ModelInfo.from_metadata(reader.metadata, str(src))
        plan, importance, unweighted = _checked_plan(src, reader, model, file_type, options, imatrix)
        logger.info(
            "%s -> %s: %s, %d tensors, %s, %d threads", src, dst, file_type, len(plan.choices), model.arch, threads
        )
        sizes_out = {c.name: tensor_bytes(c.dst_type, c.shape) for c in plan.choices}
        with paired_report(sidecar_path) as write_sidecar, atomic_file(dst) as temp:
            output_sha256 = _write_file(
                reader, temp, plan, model, threads, sizes_out, importance, _imatrix_metadata(options, imatrix)
            )
            body = _report(src, dst, plan, model, options, threads, reader, sizes_out, temp.stat().st_size)
            body["input"]["sha256"] = input_hash.result()
            body["output"]["sha256"] = output_sha256
            body["imatrix"] = _imatrix_report(options, imatrix, plan, importance, unweighted)
            # wall time of the whole step: parse, plan, quantize, write, hash (not the sidecar itself)
            body["time_s"] = round(time.perf_counter() - started, 3)
            body["memory"] = {**mem.as_dict(), "peak_rss_mb": round(max(mem.peak_rss_mb, _rss_now_mb()), 1)}
            report = build_report("quantize", body, device=None)
            for line in _summary_lines(report):
                logger.info("%s", line)
            write_sidecar(report)
    return report


class _HashingFile:
    """A binary file wrapper that hashes everything written through it."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self.digest = hashlib.sha256()

    def write(self, data: Any) -> int:
        self.digest.update(data)
        return self._handle.write(data)

    def tell(self) -> int:
        return self._handle.tell()

    def flush(self) -> None:
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def fileno(self) -> int:
        return self._handle.fileno()


def _rss_now_mb() -> float:
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def _imatrix_metadata(
    options: QuantizeOptions, imatrix: Imatrix | None
) -> dict[str, tuple[Any, gguf.GGUFValueType]]:
    """The quantize.imatrix.* keys llama-quantize records (its kv overrides), in its order."""
    if imatrix is None:
        return {}
    meta: dict[str, tuple[Any, gguf.GGUFValueType]] = {
        # llama-quantize stores the path as given, cut to 127 bytes
        "quantize.imatrix.file": (str(options.imatrix)[:127], gguf.GGUFValueType.STRING)
    }
    if imatrix.datasets:
        meta["quantize.imatrix.dataset"] = (imatrix.datasets[0][:127], gguf.GGUFValueType.STRING)
    meta["quantize.imatrix.entries_count"] = (len(imatrix.entries), gguf.GGUFValueType.UINT32)
    if imatrix.chunk_count > 0:
        meta["quantize.imatrix.chunks_count"] = (imatrix.chunk_count, gguf.GGUFValueType.UINT32)
    return meta


def _imatrix_report(
    options: QuantizeOptions,
    imatrix: Imatrix | None,
    plan: Plan,
    importance: dict[str, np.ndarray],
    unweighted: list[str],
) -> dict[str, Any] | None:
    if imatrix is None:
        return None
    weighted_types = {c.name: c.dst_type for c in plan.choices if c.name in importance}
    return {
        "path": str(options.imatrix),
        "sha256": sha256_file(options.imatrix),  # type: ignore[arg-type]
        "entries": len(imatrix.entries),
        "datasets": imatrix.datasets,
        "chunk_count": imatrix.chunk_count,
        "chunk_size": imatrix.chunk_size,
        # Q8_0 (like F16) has no importance-weighted quantizer in llama.cpp: its tensors are counted
        # as matched but their bytes do not change.
        "tensors_matched": len(importance),
        "tensors_weighted": sum(1 for t in weighted_types.values() if t in blocks.WEIGHTED_TYPES),
        "tensors_without_entry": unweighted,
    }


def _write_file(
    reader: GGUFFile,
    path: Path,
    plan: Plan,
    model: ModelInfo,
    threads: int,
    sizes_out: dict[str, int],
    importance: dict[str, np.ndarray],
    extra_metadata: dict[str, tuple[Any, gguf.GGUFValueType]],
) -> str:
    """Write the whole output file; returns its sha256."""
    # gguf-py logs the temporary file name at INFO; our own log names the real output.
    logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)
    writer = RawKVWriter(path, model.arch)
    copy_metadata(
        reader,
        writer,
        overrides={
            "general.quantization_version": (QUANTIZATION_VERSION, gguf.GGUFValueType.UINT32),
            "general.file_type": (plan.llama_ftype, gguf.GGUFValueType.UINT32),
            **extra_metadata,
        },
    )
    for c in plan.choices:
        # The element shape in numpy order (outermost first); a non-uint8 dtype keeps gguf-py
        # from reinterpreting it as a byte shape.
        writer.add_tensor_info(
            c.name,
            tuple(reversed(c.shape)),
            np.dtype(np.float32),
            sizes_out[c.name],
            raw_dtype=gguf.GGMLQuantizationType[c.dst_type],
        )
    writer.open_output_file()
    assert writer.fout is not None
    hashing = _HashingFile(writer.fout[0])
    writer.fout[0] = hashing  # type: ignore[call-overload]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    assert writer.fout is not None
    fout = writer.fout[0]
    writer.write_padding(fout, fout.tell())
    try:
        _write_data(fout, writer, reader, plan, sizes_out, threads, importance)
    finally:
        writer.close()
    return hashing.digest.hexdigest()


def _encoders(plan: Plan) -> dict[str, Any]:
    """Which implementation encoded the blocks (all are byte-identical to ggml's reference)."""
    used = {c.dst_type for c in plan.choices if c.converts}
    k_backend = None
    if used & set(blocks.K_TYPES):
        k_backend = kquants.resolve_backend()
    try:
        numba_version: str | None = importlib.metadata.version("numba")
    except importlib.metadata.PackageNotFoundError:
        numba_version = None
    return {
        "legacy": "gguf-py quantize_blocks (Q4_0, Q4_1, Q5_0, Q5_1); lora2gguf (Q8_0)",
        "kquants_backend": k_backend,
        "lowbit": "numba" if used & set(blocks.LOWBIT_TYPES) else None,
        "iquants": "numba" if used & set(blocks.IQ_TYPES) else None,
        "numba": numba_version,
    }


def _tensor_row(c: TensorChoice) -> dict[str, Any]:
    return {
        "name": c.name,
        "shape": c.shape,
        "src_type": c.src_type,
        "type": c.dst_type,
        "bytes": tensor_bytes(c.dst_type, c.shape),
        "rule": c.rule,
        "fallback": c.fallback,
    }


def _fallback_summary(plan: Plan) -> dict[str, Any]:
    """Tensors whose wanted type does not fit their row length, counted by change (as llama-quantize logs)."""
    fallbacks = plan.fallbacks
    by_change: dict[str, int] = {}
    for c in fallbacks:
        assert c.fallback is not None
        key = f"{c.fallback['wanted']}->{c.fallback['used']}"
        by_change[key] = by_change.get(key, 0) + 1
    return {
        "count": len(fallbacks),
        "by_change": by_change,
        "tensors": [{"name": c.name, **(c.fallback or {})} for c in fallbacks],
    }


def _report(
    src: Path,
    dst: Path,
    plan: Plan,
    model: ModelInfo,
    options: QuantizeOptions,
    threads: int,
    reader: GGUFFile,
    sizes_out: dict[str, int],
    file_bytes: int,
) -> dict[str, Any]:
    """The sidecar's fields (hashes, imatrix, time and memory are filled in by the caller)."""
    by_name = {t.name: t for t in reader.tensors}
    n_elements = sum(int(np.prod(c.shape)) for c in plan.choices)
    bytes_in = sum(int(by_name[c.name].n_bytes) for c in plan.choices)
    bytes_out = sum(sizes_out.values())
    fallbacks = _fallback_summary(plan)
    mib = 1024 * 1024
    return {
        "type": plan.file_type,
        "general.file_type": plan.llama_ftype,
        "general.quantization_version": QUANTIZATION_VERSION,
        "default_tensor_type": plan.default_type,
        "input": {"path": str(src), "size_bytes": src.stat().st_size, "sha256": None},
        "output": {"path": str(dst), "size_bytes": file_bytes, "sha256": None},
        "model": {
            "arch": model.arch,
            "n_layer": model.n_layer,
            "n_expert": model.n_expert,
            "tied_embeddings": plan.tied_embeddings,
        },
        "options": {
            "threads": options.threads,
            "allow_requantize": options.allow_requantize,
            "output_tensor_type": options.output_tensor_type,
            "token_embedding_type": options.token_embedding_type,
            "pure": options.pure,
            "imatrix": options.imatrix,
        },
        "threads": threads,
        "n_tensors": len(plan.choices),
        "n_converted": sum(1 for c in plan.choices if c.converts),
        # tensors per type (the name the comparison step reads)
        "tensor_types": plan.counts(),
        "fallback_count": fallbacks["count"],
        "fallbacks": fallbacks,
        "n_elements": n_elements,
        # llama.cpp's BPW: all tensor bytes (not the header) * 8 / all weights.
        "bits_per_weight": round(bytes_out * 8 / n_elements, 4) if n_elements else None,
        "size": {
            "input_tensor_bytes": bytes_in,
            "input_tensor_mib": round(bytes_in / mib, 3),
            "input_bits_per_weight": round(bytes_in * 8 / n_elements, 4) if n_elements else None,
            "output_tensor_bytes": bytes_out,
            "output_tensor_mib": round(bytes_out / mib, 3),
            "output_file_bytes": file_bytes,
        },
        "tensors": [_tensor_row(c) for c in plan.choices],
        "encoders": _encoders(plan),
    }
