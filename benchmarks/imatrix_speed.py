"""Benchmark: the cost of calibration on a Qwen2-0.5B-sized model, against llama.cpp's own tools.

Inputs as in benchmarks/run.py (benchmarks/build_model.py: Qwen2-0.5B's exact shape, bf16, built
once, not timed), its F16 GGUF (lora2gguf convert, not timed) and the demo's training text. Each
step is a fresh child process (wall time, CPU time and peak RSS from wait4(), as in run.py), the
implementations taking turns at going first from run to run, so none is always first:

    imatrix           lora2gguf imatrix (PyTorch, CPU)  vs  llama-imatrix on the F16 GGUF, the same
                      text cut to the same whole chunks, the same thread count
    quantize Q4_K_M   (--quantize) lora2gguf quantize --imatrix vs llama-quantize --imatrix, both
                      given our imatrix (and the plain quantization of both for the difference)

The machine may be shared: every run records the 1-minute load average at its start, and CPU
seconds (user + system) are given beside wall time; on a loaded machine they are the fairer
comparison. Also reported: how close the two importance matrices are (cosine similarity per entry,
the token counts), with --reference how far ours is from an earlier imatrix file (e.g. one written
by a previous version of the collection, on the same tokens), and with --quantize whether the two
imatrix quantizations are byte-identical. With --previous DIR (a folder holding an earlier
``lora2gguf`` package), that version's ``lora2gguf imatrix`` takes its turns too: before and after
under the same load, and how far apart their results are.

llama.cpp's tools come from --llama-bin, LORA2GGUF_LLAMA_BIN or .cache/llama-tools/bin (`make
llama-tools`); without them only our side is measured and the result says so.

    .venv/bin/python benchmarks/imatrix_speed.py --tokens 2048 --threads 2 --runs 3 --out results.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from run import _lora2gguf, _sha256, _summary, ensure_inputs, measure  # noqa: E402  (benchmarks/run.py)

from lora2gguf.artifacts import write_json  # noqa: E402
from lora2gguf.demo.dataset import render_text  # noqa: E402
from lora2gguf.formats.imatrix import read_imatrix  # noqa: E402
from lora2gguf.provenance import build_report, device_info  # noqa: E402

logger = logging.getLogger("benchmarks.imatrix_speed")


def llama_tools(given: Path | None = None) -> Path | None:
    """The folder with llama-imatrix: ``given``, else LORA2GGUF_LLAMA_BIN, else `make llama-tools`' output."""
    for folder in (given, os.environ.get("LORA2GGUF_LLAMA_BIN"), ROOT / ".cache" / "llama-tools" / "bin"):
        if folder and (Path(folder) / "llama-imatrix").is_file():
            return Path(folder)
    return None


def prepare_f16(base: Path, work: Path) -> Path:
    """The F16 GGUF of the benchmark model for llama-imatrix (converted once, not timed)."""
    f16 = work / "imatrix-model-f16.gguf"
    if not f16.is_file():
        measure(_lora2gguf() + ["convert", str(base), str(f16), "--outtype", "f16", "--no-progress"], work / "convert.log")
    return f16


def _ours_cmd(base: Path, text: Path, out: Path, tokens: int, chunk_size: int, threads: int,
              tree: Path | None = None) -> list[str]:
    """``lora2gguf imatrix``: this checkout's, or the package in ``tree`` (an earlier version) ahead of it."""
    args = ["imatrix", "--model", str(base), "--text", str(text), "--out", str(out), "--max-tokens", str(tokens),
            "--chunk-size", str(chunk_size), "--device", "cpu", "--threads", str(threads)]  # fmt: skip
    if tree is None:
        return _lora2gguf() + args
    code = "import sys; sys.path.insert(0, sys.argv.pop(1)); from lora2gguf.cli import main; sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", code, str(tree), *args]


def _llama_cmd(tools: Path, f16: Path, text: Path, out: Path, tokens: int, chunk_size: int, threads: int) -> list[str]:
    return [str(tools / "llama-imatrix"), "-m", str(f16), "-f", str(text), "-o", str(out), "-c", str(chunk_size),
            "--chunks", str(tokens // chunk_size), "--no-ppl", "-t", str(threads)]  # fmt: skip


def agreement(ours: Path, theirs: Path) -> dict[str, Any]:
    """Cosine similarity of the two importance vectors per entry, and the tokens each counted."""
    a, b = read_imatrix(ours), read_imatrix(theirs)
    cosines = []
    for name in set(a.entries) & set(b.entries):
        x, y = a.entries[name].importance(), b.entries[name].importance()
        cosines.append(float(x @ y / ((x @ x) ** 0.5 * (y @ y) ** 0.5)))
    return {
        "same_entries": set(a.entries) == set(b.entries),
        "entries": len(a.entries),
        "tokens_ours": float(next(iter(a.entries.values())).counts[0]),
        "tokens_llama_cpp": float(next(iter(b.entries.values())).counts[0]),
        "cosine_min": min(cosines),
        "cosine_median": statistics.median(cosines),
    }


def difference(ours: Path, reference: Path) -> dict[str, Any]:
    """How far ours is from another imatrix file of the same model and tokens (relative, per value)."""
    import numpy as np

    a, b = read_imatrix(ours), read_imatrix(reference)
    if set(a.entries) != set(b.entries):
        return {"reference": str(reference), "same_entries": False}
    worst, mean, same_counts = 0.0, [], True
    for name, entry in a.entries.items():
        x, y = entry.sums.astype(np.float64), b.entries[name].sums.astype(np.float64)
        rel = np.abs(x - y) / np.maximum(np.abs(y), np.finfo(np.float32).tiny)
        worst, mean = max(worst, float(rel.max())), mean + [float(rel.mean())]
        same_counts &= bool(np.array_equal(entry.counts, b.entries[name].counts))
    return {"reference": str(reference), "reference_sha256": _sha256(reference), "same_entries": True,
            "same_counts": same_counts, "max_relative_difference": worst,
            "mean_relative_difference": float(np.mean(mean)), "bit_identical_values": worst == 0.0}  # fmt: skip


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """(Re)compute the medians of an imatrix result and its ratios to llama.cpp from the runs it keeps."""
    for impl in ("ours", "previous"):
        if result.get(impl):
            result[impl] = _summary(result[impl]["runs"])
    t = result.get("llama_cpp") and _summary(result["llama_cpp"]["runs"])
    if not t:
        return result
    result["llama_cpp"] = t
    for impl, prefix in (("ours", ""), ("previous", "previous_")):
        if result.get(impl):
            o = result[impl]
            result[f"{prefix}ratio_process_s"] = round(o["median_process_s"] / t["median_process_s"], 3)
            result[f"{prefix}ratio_cpu_s"] = round(o["median_cpu_s"] / t["median_cpu_s"], 3)
            result[f"{prefix}ratio_peak_rss"] = round(o["max_peak_rss_mb"] / t["max_peak_rss_mb"], 3)
    return result


@dataclass(frozen=True)
class ImatrixBench:
    """What the imatrix runs share: the model (HF folder and its F16 GGUF), text, tokens, threads."""

    base: Path
    f16: Path
    text: Path
    work: Path
    tokens: int
    chunk_size: int
    threads: int
    tools: Path | None = None  # llama-imatrix's folder
    previous: Path | None = None  # an earlier lora2gguf package, for before/after

    def run(self, impl: str, i: int) -> dict[str, Any]:
        """One run of ``impl`` (ours, previous or llama.cpp) as a fresh process."""
        out, log = self.work / f"{impl}-imatrix.gguf", self.work / f"imatrix-{impl}-{i}.log"
        if impl == "llama.cpp":
            assert self.tools is not None
            return measure(_llama_cmd(self.tools, self.f16, self.text, out, self.tokens, self.chunk_size, self.threads),
                           log)
        tree = self.previous if impl == "previous" else None
        m = measure(_ours_cmd(self.base, self.text, out, self.tokens, self.chunk_size, self.threads, tree), log)
        report = json.loads(out.with_suffix(".json").read_text())["measured"]
        m["in_call_s"] = report["forward_seconds"]
        m["in_call_peak_rss_mb"] = report["peak_rss_mb"]
        return m


def previous_tree(tree: Path) -> dict[str, Any]:
    """Which earlier collection ran: the folder and the checksums of its imatrix step's modules."""
    return {"path": str(tree), "sha256": {f.name: _sha256(f) for f in sorted((tree / "lora2gguf" / "imatrix").glob("*.py"))}}


def bench_imatrix(setup: ImatrixBench, runs: int) -> dict[str, Any]:
    """``runs`` runs of each implementation on the same tokens, taking turns at going first."""
    impls = ["ours"] + (["llama.cpp"] if setup.tools else []) + (["previous"] if setup.previous else [])
    by: dict[str, list[dict[str, Any]]] = {impl: [] for impl in impls}
    for i in range(runs):
        for impl in impls[i % len(impls):] + impls[: i % len(impls)]:
            m = setup.run(impl, i)
            by[impl].append(m)
            logger.info("imatrix %s run %d: %.1f s, %.1f CPU s, peak %.0f MB, load %.1f", impl, i + 1,
                        m["process_s"], m["cpu_s"], m["peak_rss_mb"], m["load_avg_1min_at_start"])
    result: dict[str, Any] = {
        "calibration": {"tokens": setup.tokens, "chunk_size": setup.chunk_size, "chunks": setup.tokens // setup.chunk_size},
        "threads": setup.threads,
        "ours": {"runs": by["ours"]},
        "llama_cpp": {"runs": by["llama.cpp"]} if setup.tools else None,
        "llama_cpp_tools": str(setup.tools) if setup.tools else None,
    }
    if setup.previous:
        result["previous"] = {"runs": by["previous"]}
        result["previous_tree"] = previous_tree(setup.previous)
        result["difference_to_previous"] = difference(setup.work / "ours-imatrix.gguf",
                                                      setup.work / "previous-imatrix.gguf")
    summarize(result)
    if setup.tools is None:
        result["llama_cpp_reason"] = "llama-imatrix not found (make llama-tools, or LORA2GGUF_LLAMA_BIN)"
    else:
        result["agreement"] = agreement(setup.work / "ours-imatrix.gguf", setup.work / "llama.cpp-imatrix.gguf")
    return result


def bench_quantize(f16: Path, imatrix: Path, work: Path, runs: int, threads: int, tools: Path | None) -> dict[str, Any]:
    """Q4_K_M with and without ``imatrix``: ours against llama-quantize, alternating."""
    steps: dict[str, dict[str, list[dict[str, Any]]]] = {"quantize_plain": {}, "quantize_imatrix": {}}
    for i in range(runs):
        for kind, extra in (("quantize_plain", []), ("quantize_imatrix", ["--imatrix", str(imatrix)])):
            order = ("ours", "llama.cpp") if i % 2 == 0 else ("llama.cpp", "ours")
            for impl in order:
                if impl == "ours":
                    out = work / f"ours-{kind}.gguf"
                    m = measure(_lora2gguf() + ["quantize", str(f16), str(out), "Q4_K_M", "--threads", str(threads),
                                                *extra], work / f"{kind}-ours-{i}.log")
                    m["in_call_s"] = json.loads(out.with_suffix(".json").read_text())["time_s"]
                elif tools is not None:
                    m = measure([str(tools / "llama-quantize"), *extra, str(f16), str(work / f"llama-{kind}.gguf"),
                                 "Q4_K_M", str(threads)], work / f"{kind}-llama-{i}.log")
                else:
                    continue
                steps[kind].setdefault(impl, []).append(m)
    result: dict[str, Any] = {step: {impl: _summary(r) for impl, r in by.items()} for step, by in steps.items()}
    if tools is not None:
        result["q4_k_m_imatrix_byte_identical"] = _sha256(work / "ours-quantize_imatrix.gguf") == _sha256(
            work / "llama-quantize_imatrix.gguf"
        )
    return result


def _table(result: dict[str, Any]) -> list[str]:
    imx = result["imatrix"]
    lines = ["| imatrix | wall s | CPU s | peak RSS MB | load (1 min) at start |", "|---|---:|---:|---:|---|"]
    for label, key in (("lora2gguf", "ours"), ("llama-imatrix", "llama_cpp"), ("lora2gguf, previous", "previous")):
        if imx.get(key):
            s = imx[key]
            loads = ", ".join(f"{r['load_avg_1min_at_start']:.1f}" for r in s["runs"])
            lines.append(f"| {label} | {s['median_process_s']:.1f} | {s['median_cpu_s']:.1f} | "
                         f"{s['max_peak_rss_mb']:.0f} | {loads} |")
    for label, prefix in (("ours / llama.cpp", ""), ("previous / llama.cpp", "previous_")):
        if f"{prefix}ratio_process_s" in imx:
            lines.append(f"| {label} | {imx[prefix + 'ratio_process_s']:.2f} | {imx[prefix + 'ratio_cpu_s']:.2f} | "
                         f"{imx[prefix + 'ratio_peak_rss']:.2f} | |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lora2gguf-bench")
    parser.add_argument("--tokens", type=int, default=2048, help="calibration tokens (whole chunks)")
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--llama-bin", type=Path)
    parser.add_argument("--reference", type=Path, help="an earlier imatrix of the same tokens to compare ours with")
    parser.add_argument("--previous", type=Path,
                        help="a folder holding an earlier lora2gguf package: its imatrix runs too, in turn (before/after)")
    parser.add_argument("--quantize", action="store_true", help="also time Q4_K_M with and without our imatrix")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.tokens % args.chunk_size:
        parser.error("--tokens must be a multiple of --chunk-size (llama-imatrix uses whole chunks)")

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    base, _run, model_info = ensure_inputs(work, seed=0, rebuild=False)
    tools = llama_tools(args.llama_bin)
    f16 = prepare_f16(base, work)
    text = work / "train.txt"
    text.write_text(render_text("train"), encoding="utf-8")
    load_before = os.getloadavg()
    setup = ImatrixBench(base, f16, text, work, args.tokens, args.chunk_size, args.threads, tools, args.previous)
    imx = bench_imatrix(setup, args.runs)
    if args.reference:
        imx["difference_to_reference"] = difference(work / "ours-imatrix.gguf", args.reference)
    body: dict[str, Any] = {
        "what": "imatrix collection on a Qwen2-0.5B-shaped model: lora2gguf imatrix vs llama-imatrix, alternating",
        "model": model_info,
        "calibration_text": "demo training split",
        "imatrix": imx,
    }
    if args.quantize:
        body["quantize"] = bench_quantize(f16, work / "ours-imatrix.gguf", work, args.runs, args.threads, tools)
    body["load_average"] = {"before": [round(x, 2) for x in load_before],
                            "after": [round(x, 2) for x in os.getloadavg()], "cpu_count": os.cpu_count()}
    body["device"] = device_info()
    result = build_report("bench-imatrix", body)

    print(f"\nQwen2-0.5B shape, {args.tokens} tokens in chunks of {args.chunk_size}, {args.threads} threads, "
          f"median of {args.runs}\n")
    print("\n".join(_table(result)))
    for key in ("agreement", "difference_to_reference", "difference_to_previous"):
        if key in imx:
            print(f"\n{key}: {imx[key]}")
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
