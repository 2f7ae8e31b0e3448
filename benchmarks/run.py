"""`make bench`: the export of a Qwen2-0.5B-sized model, timed step by step against llama.cpp.

Inputs (built once by benchmarks/build_model.py, not timed): a random model with Qwen2-0.5B's exact
architecture in bf16 and a rank-8 LoRA on every linear layer, in LLaMA-Factory's layout. Then, each
step as a fresh child process, ``--runs`` times (median reported, every run kept in the JSON):

    merge              lora2gguf merge (peft merge_and_unload + reload check), CPU, bf16
    convert F16        lora2gguf convert          vs llama.cpp convert_hf_to_gguf.py (llama-cpp-python
                                                      0.3.36 sdist, its vendored gguf-py), same folder
    quantize <type>    lora2gguf quantize_gguf    vs llama_cpp.llama_model_quantize, same F16 file,
                                                      same thread count
    imatrix            lora2gguf imatrix (merged  vs llama-imatrix (`make llama-tools`) on the F16 file,
                       folder, CPU)                   the same 2048 tokens of the demo's training text
                                                      in chunks of 512, same thread count
                                                      (benchmarks/imatrix_speed.py)

Times: whole child process wall clock ("process s": interpreter start and imports included, what a
user waits for) and, where the tool reports it, the step's own time ("in-call s"). Peak memory: the
child's maximum resident set size from wait4() (ru_maxrss; memory-mapped file pages that are
resident count, for both sides), and for quantize also the RSS sampled inside the call. CPU seconds
(user + system) are recorded too: on a shared, loaded machine they are distorted less than wall time.
Runs of ours and llama.cpp alternate in order, so page-cache warmth favours neither.

    .venv/bin/python benchmarks/run.py                       # everything, 3 runs, writes benchmarks/results/
    .venv/bin/python benchmarks/run.py --runs 1 --types Q4_K_M --no-write
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lora2gguf.artifacts import read_json, write_json  # noqa: E402
from lora2gguf.demo.dataset import render_text as render_demo_text  # noqa: E402
from lora2gguf.formats.gguf import read_gguf  # noqa: E402
from lora2gguf.provenance import device_info, package_versions  # noqa: E402

logger = logging.getLogger("benchmarks.run")

# The low-bit types last: IQ4_NL / IQ4_XS take about a minute per side on 2 CPUs (hidden size 896 is
# not a multiple of 256, so most of their tensors fall back to IQ4_NL, llama.cpp's slowest 4-bit search).
# "+imatrix": quantized with the importance matrix of the imatrix step (ours, given to both sides).
DEFAULT_TYPES = ("Q4_K_M", "Q5_K_M", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L",
                 "IQ4_NL", "IQ4_XS", "Q4_K_M+imatrix", "Q4_0+imatrix", "Q5_1+imatrix")
IMATRIX_SUFFIX = "+imatrix"
TARGETS = {
    "export_total_s": 60.0,  # merge + convert F16 + quantize Q4_K_M, whole processes
    "merge_peak_mb": 2098.0,  # 2.2 GB (decimal) in MiB: about twice the 0.99 GB model
    "quantize_ratio": 1.0,  # ours / llama.cpp, time
    "convert_ratio": 1.0,  # ours / llama.cpp, time
    "peak_mb": 1536.0,  # convert and quantize, peak RSS
    "imatrix_ratio": 1.0,  # ours / llama-imatrix, time and peak RSS
}
# The original export guide's budgets for a 0.5B model (merge 2-3 min, convert 5-10 min, quantize 10-15 min).
GUIDE = {"merge": "2-3 min", "convert": "5-10 min", "quantize": "10-15 min", "total": "20-30 min"}


def _load_module(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _env() -> dict[str, str]:
    # Children import lora2gguf from this checkout (and llama_oracle from tests/) and never reach
    # the Hugging Face hub.
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )


def measure(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run ``cmd`` as a child; wall time, CPU time and peak RSS from wait4(); output to ``log``."""
    load = os.getloadavg()[0]
    with open(log, "wb") as out:
        start = time.perf_counter()
        # Output to a file, not a pipe: llama.cpp logs a lot to stderr and a full pipe would stall it.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed with exit code {proc.returncode}; log {log}:\n{tail}")
    return {
        "process_s": round(wall, 3),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
        "load_avg_1min_at_start": round(load, 2),
    }


def _result_line(log: Path) -> dict[str, Any]:
    lines = [ln for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{log}: the child printed no RESULT line")
    return json.loads(lines[-1][len("RESULT ") :])


def _lora2gguf() -> list[str]:
    return [sys.executable, "-m", "lora2gguf.cli"]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(values), 3) if values else None


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": runs}
    for key in ("process_s", "in_call_s", "cpu_s", "in_call_cpu_s", "peak_rss_mb", "in_call_peak_rss_mb"):
        med = _median(runs, key)
        if med is not None:
            out[f"median_{key}"] = med
    out["min_process_s"] = round(min(r["process_s"] for r in runs), 3)
    out["max_process_s"] = round(max(r["process_s"] for r in runs), 3)
    out["max_peak_rss_mb"] = round(max(r["peak_rss_mb"] for r in runs), 1)
    in_call = [r["in_call_peak_rss_mb"] for r in runs if r.get("in_call_peak_rss_mb") is not None]
    if in_call:
        out["max_in_call_peak_rss_mb"] = round(max(in_call), 1)
    return out


def compare_gguf(ours: Path, theirs: Path) -> dict[str, Any]:
    """Same tensors (names, order, shapes, types, bytes) and which metadata keys differ."""
    ours, theirs = Path(ours), Path(theirs)
    a, b = read_gguf(ours), read_gguf(theirs)
    same_layout = [(t.name, t.shape, t.type_name) for t in a.tensors] == [(t.name, t.shape, t.type_name) for t in b.tensors]
    differing = []
    if same_layout:
        for ta, tb in zip(a.tensors, b.tensors):
            if ta.n_bytes != tb.n_bytes or hashlib.sha256(ta.data).digest() != hashlib.sha256(tb.data).digest():
                differing.append(ta.name)
    ra, rb = dict(a.records), dict(b.records)
    keys = sorted(k for k in set(ra) | set(rb) if ra.get(k) != rb.get(k))
    return {
        "byte_identical_file": _sha256(ours) == _sha256(theirs),
        "same_tensor_layout": same_layout,
        "tensors_with_different_bytes": differing if same_layout else None,
        "metadata_keys_differing": keys,
    }


def _compare_in_child(ours: Path, theirs: Path, work: Path) -> dict[str, Any]:
    """compare_gguf in a child: reading two 1 GB files through mmap would raise this process's RSS high-water
    mark, and every later child inherits it in its ru_maxrss (Linux keeps it across fork + exec)."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[3]); import run; "
            "print('RESULT ' + json.dumps(run.compare_gguf(sys.argv[1], sys.argv[2])))")
    log = work / "compare.log"
    measure([sys.executable, "-c", code, str(ours), str(theirs), str(ROOT / "benchmarks")], log)
    return _result_line(log)


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


def ensure_inputs(work: Path, seed: int, rebuild: bool) -> tuple[Path, Path, dict[str, Any]]:
    inputs = work / "inputs"
    stamp = inputs / "built.json"
    if rebuild or not stamp.is_file() or json.loads(stamp.read_text()).get("seed") != seed:
        logger.info("building the Qwen2-0.5B-shaped model and its LoRA run in %s (once; not timed)", inputs)
        start = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "build_model.py"), str(inputs), "--seed", str(seed)],
                       check=True, env=_env(), cwd=ROOT)
        stamp.write_text(json.dumps({"seed": seed, "build_s": round(time.perf_counter() - start, 1)}) + "\n")
    base, run = inputs / "base", inputs / "run"
    config = json.loads((base / "config.json").read_text())
    info = {
        "builder": "benchmarks/build_model.py",
        "seed": seed,
        "architecture": config["architectures"][0],
        "shape": {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                         "num_key_value_heads", "vocab_size", "tie_word_embeddings")},
        "dtype": config.get("dtype") or config.get("torch_dtype"),
        "adapter": {k: v for k, v in json.loads((run / "adapter_config.json").read_text()).items()
                    if k in ("r", "lora_alpha", "target_modules", "peft_type")},
        "sha256": {
            "base/model.safetensors": _sha256(base / "model.safetensors"),
            "run/adapter_model.safetensors": _sha256(run / "adapter_model.safetensors"),
        },
        "tokenizer": "the demo's tiny byte-level BPE (lora2gguf.demo.tiny), embedding padded to 151936 rows",
    }
    return base, run, info


def bench_merge(base: Path, run: Path, work: Path, runs: int) -> tuple[dict[str, Any], Path]:
    merged = work / "merged"
    results = []
    for i in range(runs):
        report = work / "merge_report.json"
        m = measure(_lora2gguf() + ["merge", "--base", str(base), "--adapter", str(run), "--out", str(merged),
                                    "--device", "cpu", "--report", str(report)], work / f"merge-{i}.log")
        data = json.loads(report.read_text())
        m["in_call_s"] = data["timing_s"]["total"]
        m["phases_s"] = data["timing_s"]
        m["in_call_peak_rss_mb"] = data["memory"]["peak_rss_mb"]
        m["verification"] = {k: data["verification"].get(k) for k in ("max_abs_logit_delta", "mean_kl", "top1_agreement")}
        results.append(m)
        logger.info("merge run %d: %.1f s (in-call %.1f s), peak %.0f MB", i + 1, m["process_s"], m["in_call_s"], m["peak_rss_mb"])
    out = _summary(results)
    out["dtype"] = data["settings"]["dtype"]
    out["device"] = data["settings"]["device"]
    out["torch_threads_note"] = "torch's default thread count (all cores)"
    return out, merged


def _llama_convert_cmd(llama_dir: Path, runner: str, merged: Path, out: Path) -> list[str]:
    job = [{"model": str(merged), "outtype": "f16", "out": str(out), "pre": "qwen2"}]
    return [sys.executable, "-c", runner, str(llama_dir), json.dumps(job)]


def bench_convert(merged: Path, work: Path, runs: int, peers: bool) -> tuple[dict[str, Any], Path]:
    ours_out = work / "model-f16.gguf"
    theirs_out = work / "llama-model-f16.gguf"
    llama_dir = runner = None
    note = None
    if peers:
        tc = _load_module("_bench_test_convert", ROOT / "tests" / "test_convert.py")
        llama_dir = tc._find_vendored_llama_cpp()
        runner = tc.REFERENCE_RUNNER
        if llama_dir is None:
            note = f"llama-cpp-python {tc.SDIST_VERSION} sdist not available in {tc.SDIST_CACHE}: peer not run"
            logger.warning(note)
    ours, theirs = [], []
    for i in range(runs):
        order = ("ours", "llama.cpp") if i % 2 == 0 else ("llama.cpp", "ours")
        for impl in order:
            if impl == "ours":
                report = work / "convert_report.json"
                m = measure(_lora2gguf() + ["convert", str(merged), str(ours_out), "--outtype", "f16", "--no-progress",
                                            "--report", str(report)], work / f"convert-ours-{i}.log")
                data = json.loads(report.read_text())
                m["in_call_s"] = _find_number(data, ("time_s", "seconds", "elapsed_s"))
                m["in_call_peak_rss_mb"] = _find_number(data, ("peak_rss_mb",))
                ours.append(m)
            elif llama_dir is not None:
                m = measure(_llama_convert_cmd(llama_dir, runner, merged, theirs_out), work / f"convert-llama-{i}.log")
                theirs.append(m)
            else:
                continue
            logger.info("convert %s run %d: %.1f s, peak %.0f MB", impl, i + 1, m["process_s"], m["peak_rss_mb"])
    result: dict[str, Any] = {"outtype": "f16", "ours": _summary(ours), "output_bytes": ours_out.stat().st_size,
                              "output_sha256": _sha256(ours_out)}
    if theirs:
        result["llama_cpp"] = _summary(theirs)
        result["llama_cpp"]["tool"] = f"convert_hf_to_gguf.py from {llama_dir} (its gguf-py), pre-tokenizer qwen2"
        result["llama_cpp"]["note"] = (
            "the tiny tokenizer's hash is unknown to llama.cpp, so its pre-tokenizer lookup is wrapped to answer "
            "'qwen2' (tests/test_convert.py REFERENCE_RUNNER); process time includes its torch import")
        result["same_as_llama_cpp"] = _compare_in_child(ours_out, theirs_out, work)
        result["ratio_process_s"] = round(result["ours"]["median_process_s"] / result["llama_cpp"]["median_process_s"], 2)
        result["ratio_cpu_s"] = round(result["ours"]["median_cpu_s"] / result["llama_cpp"]["median_cpu_s"], 2)
        result["ratio_peak_rss"] = round(result["ours"]["max_peak_rss_mb"] / result["llama_cpp"]["max_peak_rss_mb"], 2)
        theirs_out.unlink()
    else:
        result["llama_cpp"] = None
        result["llama_cpp_reason"] = note or "--no-peers"
    return result, ours_out


def _find_number(data: Any, keys: tuple[str, ...]) -> float | None:
    """First numeric value under one of ``keys`` anywhere in a report (reports nest them differently)."""
    if isinstance(data, dict):
        for key in keys:
            if isinstance(data.get(key), (int, float)) and not isinstance(data.get(key), bool):
                return float(data[key])
        for value in data.values():
            found = _find_number(value, keys)
            if found is not None:
                return found
    elif isinstance(data, list):
        for value in data:
            found = _find_number(value, keys)
            if found is not None:
                return found
    return None


def bench_quantize(
    f16: Path, work: Path, types: list[str], runs: int, threads: int, peers: bool, imatrix: Path | None = None
) -> dict[str, Any]:
    # The quantize engineer's child script: the call is timed inside the child, RSS sampled during it.
    bq = _load_module("_bench_quantize", ROOT / "benchmarks" / "quantize.py")
    impls = ("ours", "llama.cpp") if peers else ("ours",)
    results: dict[str, Any] = {}
    for ftype in types:
        weighted = ftype.endswith(IMATRIX_SUFFIX)
        if weighted and imatrix is None:
            results[ftype] = {"skipped": "no importance matrix (--no-imatrix)"}
            continue
        args = [ftype.removesuffix(IMATRIX_SUFFIX), str(threads), str(imatrix) if weighted else ""]
        runs_by: dict[str, list[dict[str, Any]]] = {impl: [] for impl in impls}
        for i in range(runs):
            order = impls if i % 2 == 0 else tuple(reversed(impls))
            for impl in order:
                dst = work / f"{impl}-{ftype}.gguf"
                log = work / f"quantize-{impl}-{ftype}-{i}.log"
                m = measure([sys.executable, "-c", bq._CHILD, impl, str(f16), str(dst), *args], log)
                inner = _result_line(log)
                m["in_call_s"] = round(inner["total_s"], 3)
                m["in_call_peak_rss_mb"] = round(inner["peak_rss_mb"], 1)
                m["in_call_cpu_s"] = round(inner["cpu_s"], 3)
                runs_by[impl].append(m)
                logger.info("quantize %s %s run %d: %.1f s in-call, %.1f s process, peak %.0f MB", ftype, impl, i + 1,
                            m["in_call_s"], m["process_s"], m["peak_rss_mb"])
        entry: dict[str, Any] = {"ours": _summary(runs_by["ours"]),
                                 "output_bytes": (work / f"ours-{ftype}.gguf").stat().st_size}
        if weighted:
            entry["imatrix"] = {"path": str(imatrix), "sha256": _sha256(imatrix), "made_by": "lora2gguf imatrix"}
        if peers:
            entry["llama_cpp"] = _summary(runs_by["llama.cpp"])
            entry["byte_identical_file"] = _sha256(work / f"ours-{ftype}.gguf") == _sha256(work / f"llama.cpp-{ftype}.gguf")
            _quantize_ratios(entry)
        results[ftype] = entry
        for impl in impls:
            if ftype != "Q4_K_M" or impl != "ours":
                (work / f"{impl}-{ftype}.gguf").unlink(missing_ok=True)
    return results


def _quantize_ratios(entry: dict[str, Any]) -> None:
    """ours / llama.cpp for each median both sides have (in-call CPU seconds exist from 2026-12-03 on)."""
    o, t = entry["ours"], entry["llama_cpp"]
    for ratio, key in (("ratio_in_call_s", "median_in_call_s"), ("ratio_process_s", "median_process_s"),
                       ("ratio_cpu_s", "median_cpu_s"), ("ratio_in_call_cpu_s", "median_in_call_cpu_s")):
        if key in o and key in t:
            entry[ratio] = round(o[key] / t[key], 2)
    entry["ratio_peak_rss"] = round(o["max_in_call_peak_rss_mb"] / t["max_in_call_peak_rss_mb"], 2)


def bench_imatrix(merged: Path, f16: Path, work: Path, runs: int, threads: int, peers: bool, tokens: int) -> dict[str, Any]:
    """lora2gguf imatrix on the merged folder against llama-imatrix on its F16 file (benchmarks/imatrix_speed.py)."""
    bi = _load_module("_bench_imatrix", ROOT / "benchmarks" / "imatrix_speed.py")
    text = work / "imatrix-train.txt"
    text.write_text(render_demo_text("train"), encoding="utf-8")
    setup = bi.ImatrixBench(merged, f16, text, work, tokens, 512, threads, bi.llama_tools() if peers else None)
    result = bi.bench_imatrix(setup, runs)
    if not peers:
        result["llama_cpp_reason"] = "--no-peers"
    return result


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def table_rows(res: dict[str, Any]) -> list[list[str]]:
    rows = []
    merge = res["merge"]
    rows.append(["merge (peft, CPU bf16, incl. tensor + logit checks)", _fmt(merge["median_process_s"]),
                 _fmt(merge["median_in_call_s"]), _fmt(merge["max_peak_rss_mb"], ".0f"), "-", "-", "-", "-"])
    conv = res["convert"]
    peer = conv.get("llama_cpp")
    rows.append(["convert F16", _fmt(conv["ours"]["median_process_s"]), _fmt(conv["ours"].get("median_in_call_s")),
                 _fmt(conv["ours"]["max_peak_rss_mb"], ".0f"),
                 _fmt(peer["median_process_s"]) if peer else "n/a", _fmt(peer["max_peak_rss_mb"], ".0f") if peer else "n/a",
                 _fmt(conv.get("ratio_process_s"), ".2f"), _fmt(conv.get("ratio_peak_rss"), ".2f")])
    for ftype, q in res["quantize"].items():
        if "skipped" in q:
            continue
        peer = q.get("llama_cpp")
        rows.append([f"quantize {ftype}", _fmt(q["ours"]["median_process_s"]), _fmt(q["ours"]["median_in_call_s"]),
                     _fmt(q["ours"]["max_in_call_peak_rss_mb"], ".0f"),
                     _fmt(peer["median_in_call_s"]) if peer else "n/a",
                     _fmt(peer["max_in_call_peak_rss_mb"], ".0f") if peer else "n/a",
                     _fmt(q.get("ratio_in_call_s"), ".2f"), _fmt(q.get("ratio_peak_rss"), ".2f")])
    imx = res.get("imatrix")
    if imx:
        peer = imx.get("llama_cpp")
        rows.append([f"imatrix ({imx['calibration']['tokens']} tokens)", _fmt(imx["ours"]["median_process_s"]),
                     _fmt(imx["ours"].get("median_in_call_s")), _fmt(imx["ours"]["max_peak_rss_mb"], ".0f"),
                     _fmt(peer["median_process_s"]) if peer else "n/a",
                     _fmt(peer["max_peak_rss_mb"], ".0f") if peer else "n/a",
                     _fmt(imx.get("ratio_process_s"), ".2f"), _fmt(imx.get("ratio_peak_rss"), ".2f")])
    return rows


HEADER = ["step", "ours process s", "ours in-call s", "ours peak MB", "llama.cpp s", "llama.cpp peak MB",
          "time ours/llama.cpp", "memory ours/llama.cpp"]


def render_text(res: dict[str, Any]) -> str:
    rows = [HEADER] + table_rows(res)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines += ["", *render_verdicts(res)]
    return "\n".join(lines)


def render_verdicts(res: dict[str, Any]) -> list[str]:
    out = []
    for check in res["targets"]:
        mark = "MET" if check["met"] else ("n/a" if check["met"] is None else "MISSED")
        out.append(f"{mark:6} {check['what']}: {check['measured']} (target {check['target']})")
    return out


def evaluate_targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    checks = []
    total = res["export_total"]
    if total["process_s"] is not None:
        checks.append({"what": "whole export merge + F16 + Q4_K_M (process times)", "measured": f"{total['process_s']:.1f} s",
                       "target": f"< {TARGETS['export_total_s']:.0f} s", "met": total["process_s"] < TARGETS["export_total_s"]})
    merge_peak = res["merge"]["max_peak_rss_mb"]
    checks.append({"what": "merge peak RSS", "measured": f"{merge_peak:.0f} MB",
                   "target": f"<= {res.get('targets_definition', TARGETS).get('merge_peak_mb', TARGETS['merge_peak_mb']):.0f} MB",
                   "met": merge_peak <= TARGETS["merge_peak_mb"]})
    for ftype, q in res["quantize"].items():
        if "skipped" in q:
            continue
        if "ratio_in_call_s" in q:
            cpu = q.get("ratio_in_call_cpu_s", q["ratio_cpu_s"])
            checks.append({"what": f"quantize {ftype} time vs llama.cpp (in-call; its CPU seconds in brackets)",
                           "measured": f"{q['ratio_in_call_s']:.2f}x ({cpu:.2f}x)",
                           "target": f"<= {TARGETS['quantize_ratio']:.2f}x",
                           "met": q["ratio_in_call_s"] <= TARGETS["quantize_ratio"]})
        peak = q["ours"]["max_in_call_peak_rss_mb"]
        checks.append({"what": f"quantize {ftype} peak RSS", "measured": f"{peak:.0f} MB",
                       "target": f"< {TARGETS['peak_mb']:.0f} MB", "met": peak < TARGETS["peak_mb"]})
    conv = res["convert"]
    if conv.get("ratio_process_s") is not None:
        checks.append({"what": "convert F16 time vs llama.cpp's converter", "measured": f"{conv['ratio_process_s']:.2f}x",
                       "target": "<= 1.00x", "met": conv["ratio_process_s"] <= TARGETS["convert_ratio"]})
    checks.append({"what": "convert F16 peak RSS", "measured": f"{conv['ours']['max_peak_rss_mb']:.0f} MB",
                   "target": f"< {TARGETS['peak_mb']:.0f} MB", "met": conv["ours"]["max_peak_rss_mb"] < TARGETS["peak_mb"]})
    imx = res.get("imatrix") or {}
    if imx.get("ratio_process_s") is not None:
        checks.append({"what": "imatrix time vs llama-imatrix (process; CPU seconds in brackets)",
                       "measured": f"{imx['ratio_process_s']:.2f}x ({imx['ratio_cpu_s']:.2f}x)",
                       "target": f"<= {TARGETS['imatrix_ratio']:.2f}x",
                       "met": imx["ratio_process_s"] <= TARGETS["imatrix_ratio"]})
        checks.append({"what": "imatrix peak RSS vs llama-imatrix", "measured": f"{imx['ratio_peak_rss']:.2f}x",
                       "target": f"<= {TARGETS['imatrix_ratio']:.2f}x",
                       "met": imx["ratio_peak_rss"] <= TARGETS["imatrix_ratio"]})
    return checks


def render_markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        f"# lora2gguf export benchmark, {res['date']}, {m['cpu']} ({m['cpu_count']} CPUs)",
        "",
        f"Model: random weights with Qwen2-0.5B's architecture ({res['inputs']['architecture']}, "
        f"{res['inputs']['dtype']}, 494 M parameters, vocab {res['inputs']['shape']['vocab_size']}), "
        f"LoRA r={res['inputs']['adapter'].get('r')} on all linear layers. Median of {res['runs']} runs "
        f"(merge: {res['merge_runs']}); quantize with {res['threads']} threads for both sides.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(HEADER) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(res)]
    total = res["export_total"]
    lines += [
        "",
        f"Whole export (merge + convert F16 + quantize Q4_K_M): **{total['process_s']:.1f} s** as separate processes "
        f"({total['in_call_s']:.1f} s inside the calls). The original export guide budgets {GUIDE['total']} "
        f"(merge {GUIDE['merge']}, convert {GUIDE['convert']}, quantize {GUIDE['quantize']}).",
        "",
        "Targets:",
        "",
        *[f"- {line}" for line in render_verdicts(res)],
        "",
        "Columns: *process s* is the whole child process (interpreter start and imports included); *in-call s* is the "
        "step's own time as the tool reports it. For quantize, both sides are compared in-call (the call alone, "
        "imports excluded). For convert, both sides are whole processes (llama.cpp's converter imports torch). "
        "Peak MB: for merge and convert the child's maximum resident set (wait4 ru_maxrss); for quantize the RSS "
        "sampled every 10 ms inside the call (benchmarks/quantize.py's child), both sides alike. Both count resident "
        "memory-mapped file pages. For imatrix, both sides are whole processes and peak MB is ru_maxrss; our "
        "in-call s is the forward passes alone.",
        "",
        f"Load: 1-minute load average {res['load_average']['before'][0]:.1f} before and "
        f"{res['load_average']['after'][0]:.1f} after, on {m['cpu_count']} CPUs. {res['load_note']}",
    ]
    return "\n".join(lines) + "\n"


def load_note(before: float, after: float) -> str:
    """What the 1-minute load averages at the start and the end say about the wall times."""
    if max(before, after) <= (os.cpu_count() or 1):
        return "The machine was not loaded beyond its core count."
    return (
        "The 1-minute load average was above the core count at the start or the end (the figure after is "
        "taken right after the last 2-thread run, so it includes the benchmark's own load): wall times may "
        "be inflated for both sides; the ours/llama.cpp ratios (runs alternate) and CPU seconds are the "
        "comparable figures."
    )


def rescore(res: dict[str, Any]) -> dict[str, Any]:
    """Recompute every summary, ratio and target verdict from the runs kept in a results JSON (after a change
    in what the table reports); the measurements themselves are not touched."""
    conv = res["convert"]
    conv["ours"] = _summary(conv["ours"]["runs"])
    if conv.get("llama_cpp"):
        extra = {k: v for k, v in conv["llama_cpp"].items() if k in ("tool", "note")}
        conv["llama_cpp"] = {**_summary(conv["llama_cpp"]["runs"]), **extra}
    for entry in res["quantize"].values():
        if "skipped" in entry:
            continue
        entry["ours"] = _summary(entry["ours"]["runs"])
        if entry.get("llama_cpp"):
            entry["llama_cpp"] = _summary(entry["llama_cpp"]["runs"])
            _quantize_ratios(entry)
    if res.get("imatrix"):
        _load_module("_bench_imatrix", ROOT / "benchmarks" / "imatrix_speed.py").summarize(res["imatrix"])
    res["load_note"] = load_note(res["load_average"]["before"][0], res["load_average"]["after"][0])
    res["targets"] = evaluate_targets(res)
    return res


def machine_slug(info: dict[str, Any]) -> str:
    cpu = re.sub(r"[^a-z0-9]+", "-", str(info.get("cpu", "cpu")).lower()).strip("-")
    return f"{cpu}-{info.get('cpu_count')}cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lora2gguf-bench",
                        help="folder for the model, merged folder and GGUF files (about 4 GB)")
    parser.add_argument("--runs", type=int, default=3, help="runs per convert/quantize measurement")
    parser.add_argument("--merge-runs", type=int, help="runs of the merge (default: --runs)")
    parser.add_argument("--types", nargs="+", default=list(DEFAULT_TYPES))
    parser.add_argument("--threads", type=int, default=2, help="quantize threads, both sides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rebuild", action="store_true", help="rebuild the input model even if present")
    parser.add_argument("--no-peers", action="store_true", help="skip llama.cpp's converter, quantizer and llama-imatrix")
    parser.add_argument("--imatrix-tokens", type=int, default=2048, help="calibration tokens (chunks of 512)")
    parser.add_argument("--no-imatrix", action="store_true", help="skip the importance-matrix comparison")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--machine", help="machine name for the results file (default: from the CPU model)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--from-json", type=Path, help="re-render (and rescore) an existing results JSON; measure nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.imatrix_tokens % 512:
        parser.error("--imatrix-tokens must be a multiple of 512 (llama-imatrix uses whole chunks)")

    if args.from_json:
        res = rescore(read_json(args.from_json))
        print(render_text(res))
        if not args.no_write:
            write_json(args.from_json, res)
            args.from_json.with_suffix(".md").write_text(render_markdown(res), encoding="utf-8")
        return 0

    peers = not args.no_peers
    if peers and importlib.util.find_spec("llama_cpp") is None:
        raise SystemExit("llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36), or pass --no-peers")
    args.work.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(args.work).free < 5 * 2**30:
        raise SystemExit(f"{args.work}: less than 5 GB free; pass --work elsewhere")
    started = _dt.datetime.now(_dt.timezone.utc)
    load_before = os.getloadavg()
    base, run, inputs = ensure_inputs(args.work, args.seed, args.rebuild)
    steps = args.work / "steps"
    steps.mkdir(exist_ok=True)

    merge, merged = bench_merge(base, run, steps, args.merge_runs or args.runs)
    convert, f16 = bench_convert(merged, steps, args.runs, peers)
    imatrix = None if args.no_imatrix else bench_imatrix(merged, f16, steps, args.runs, args.threads, peers,
                                                         args.imatrix_tokens)
    # The weighted types use our importance matrix, on both sides (llama-quantize reads the same file).
    imatrix_file = None if args.no_imatrix else steps / "ours-imatrix.gguf"
    quantize = bench_quantize(f16, steps, args.types, args.runs, args.threads, peers, imatrix_file)
    load_after = os.getloadavg()

    q4 = quantize.get("Q4_K_M", {}).get("ours")
    export_total = {
        # None (not NaN: the results JSON holds no NaN) when Q4_K_M was not among --types.
        "process_s": None if q4 is None else round(merge["median_process_s"] + convert["ours"]["median_process_s"]
                                                   + q4["median_process_s"], 1),
        "in_call_s": None if q4 is None else round(merge["median_in_call_s"] + (convert["ours"].get("median_in_call_s")
                                                                                or 0.0) + q4["median_in_call_s"], 1),
        "parts": "median merge + median convert F16 + median quantize Q4_K_M",
    }
    machine = device_info()
    res: dict[str, Any] = {
        "schema": "lora2gguf/bench/1",
        "date": started.strftime("%Y-%m-%d"),
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "memory_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "versions": package_versions(),
        "python": platform.python_version(),
        "runs": args.runs,
        "merge_runs": args.merge_runs or args.runs,
        "threads": args.threads,
        "inputs": inputs,
        "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in load_after]},
        "load_note": load_note(load_before[0], load_after[0]),
        "merge": merge,
        "convert": convert,
        "quantize": quantize,
        "imatrix": imatrix,
        "export_total": export_total,
        "guide_expectations": GUIDE,
        "targets_definition": TARGETS,
    }
    res["targets"] = evaluate_targets(res)
    print(render_text(res))
    if not args.no_write:
        stem = f"{res['date']}-{args.machine or machine_slug(machine)}"
        write_json(args.results / f"{stem}.json", res)
        (args.results / f"{stem}.md").write_text(render_markdown(res), encoding="utf-8")
        logger.info("wrote %s.json and .md", args.results / stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
