"""Compute an importance matrix: load the merged model, collect over the calibration text, write the
imatrix GGUF (usable by ``lora2gguf quantize --imatrix`` and llama.cpp's ``llama-quantize --imatrix``)
and its report."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora2gguf import hf
from lora2gguf.artifacts import Output, atomic_file, check_paths, paired_report, sha256_file, sha256_tree
from lora2gguf.errors import Lora2ggufError
from lora2gguf.formats.imatrix import Imatrix, write_imatrix
from lora2gguf.imatrix.collect import CollectStats, collect
from lora2gguf.provenance import PeakMemory, build_report, device_info

logger = logging.getLogger(__name__)

REPORT_KIND = "imatrix"


@dataclass(frozen=True)
class ImatrixOptions:
    """What ``lora2gguf imatrix`` computes: the model, the calibration text, where the result goes."""

    model: Path
    text: Path
    out: Path
    report: Path | None = None  # default: out with a .json suffix
    chunk_size: int = 512
    max_tokens: int | None = None
    device: str = "auto"
    threads: int = os.cpu_count() or 1
    trust_remote_code: bool = False
    allow_pickle: bool = False


def _report_path(options: ImatrixOptions) -> Path:
    return options.report or options.out.with_suffix(".json")


def _check_paths(options: ImatrixOptions) -> None:
    """The imatrix and its report must not overwrite the model, the text or each other (an --out
    named *.json has the default report's own name), nor land on a folder."""
    check_paths(
        [("--model", options.model), ("--text", options.text)],
        [
            Output("--out", options.out),
            Output("--report" if options.report else "the report (OUT with .json suffix)", _report_path(options)),
        ],
    )


def _read_text(options: ImatrixOptions) -> str:
    if options.max_tokens is not None and options.max_tokens < 1:
        raise Lora2ggufError(f"--max-tokens must be at least 1, got {options.max_tokens}")
    if not options.text.is_file():
        raise Lora2ggufError(f"{options.text}: calibration text not found")
    try:
        return options.text.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise Lora2ggufError(f"{options.text}: not UTF-8 text ({exc})") from exc


def _collect(options: ImatrixOptions, text: str) -> tuple[Imatrix, CollectStats, PeakMemory]:
    """Run the model over the text in float32; the memory window covers loading and collection.

    The weights load in the checkpoint's own dtype (on the CPU, memory maps of the safetensors files):
    the collection widens them as it goes, so no float32 copy of the model is ever made."""
    # Before torch loads its OpenMP runtime (it is first imported here): idle OpenMP threads that spin
    # between the thousands of small parallel regions of a forward pass cost about 15% more CPU
    # seconds on a loaded 2-core machine, taken from the other processes, for no gain in wall time.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    device = hf.select_device(options.device)
    torch.set_num_threads(options.threads)
    with PeakMemory() as mem:
        model, tokenizer = hf.load(
            options.model, device, "auto",
            trust_remote_code=options.trust_remote_code, allow_pickle=options.allow_pickle,
        )
        imatrix, stats = collect(
            model, tokenizer, options.model, text,
            chunk_size=options.chunk_size, max_tokens=options.max_tokens, dataset=str(options.text),
        )
        del model
    return imatrix, stats, mem


def _report(
    options: ImatrixOptions, imatrix: Imatrix, stats: CollectStats, mem: PeakMemory, written: Path,
    model_sha256: dict[str, str],
) -> dict[str, Any]:
    """The report; ``written`` holds the imatrix's bytes (its temporary path, before the rename)."""
    body = {
        "output": {"path": str(options.out), "sha256": sha256_file(written), "entries": len(imatrix.entries)},
        "model": {"path": str(options.model), "sha256": model_sha256},
        "calibration": {
            "text": str(options.text),
            "sha256": sha256_file(options.text),
            "tokens_in_text": stats.tokens_available,
            "tokens_used": stats.tokens_used,
            "max_tokens": options.max_tokens,
            "chunk_size": options.chunk_size,
            "chunks": stats.chunks,
        },
        "measured": {
            "what": "sum over tokens of the squared input of every blk.* linear layer, and the token count",
            "forward_seconds": round(stats.seconds, 3),
            "tokens_per_second": round(stats.tokens_used / stats.seconds, 1) if stats.seconds > 0 else None,
            "peak_rss_mb": mem.peak_rss_mb,
            **({"cuda_peak_mb": mem.cuda_peak_mb} if mem.cuda_peak_mb is not None else {}),
            "precision": "float32 compute (weights widened from the checkpoint's dtype), float64 squares and sums, "
                         "stored float32",
        },
        # Named device_info, as the report has always named it (build_report's device= would say "device").
        "device_info": device_info(stats.device),
    }
    return build_report(REPORT_KIND, body)


def compute_imatrix(options: ImatrixOptions) -> dict[str, Any]:
    """Write the importance matrix to ``options.out`` and its report next to it (or to ``options.report``)."""
    _check_paths(options)
    text = _read_text(options)
    # The model's checksums (for the report) are computed while the imports and the loading, which run
    # on one core, leave the others idle (hashlib releases the GIL).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="imatrix-sha256") as pool:
        model_sha256 = pool.submit(sha256_tree, options.model)
        imatrix, stats, mem = _collect(options, text)
        model_checksums = model_sha256.result()
    with paired_report(_report_path(options)) as write_report, atomic_file(options.out) as tmp:
        write_imatrix(tmp, imatrix)
        logger.info(
            "%s: %d matrices from %d tokens in %d chunks of %d (%.1f s on %s)",
            options.out, len(imatrix.entries), stats.tokens_used, stats.chunks, options.chunk_size,
            stats.seconds, stats.device,
        )  # fmt: skip
        report = _report(options, imatrix, stats, mem, written=tmp, model_sha256=model_checksums)
        write_report(report)
    return report
