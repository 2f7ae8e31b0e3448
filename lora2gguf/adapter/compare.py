"""``lora2gguf adapter-compare``: base GGUF + LoRA adapter GGUF in llama.cpp against the merged GGUF of the
same type, both against the float reference (adapter_compare.json).

The reference is the merged Hugging Face model in float32 (PyTorch); ``lora2gguf merge`` verified that it
computes what the base with peft's adapter computes. llama.cpp is fed the very token ids PyTorch saw (the
reference's tokenizer, windows of ``context`` tokens over the first ``max_tokens`` of the text, as in
``lora2gguf compare``). For every GGUF type given on both sides (say F16 and Q4_K_M), two ways to ship:

- ``merged``: the merged model's GGUF of that type (merged, then converted / quantized);
- ``base+adapter``: the base model's GGUF of that type with the adapter GGUF applied by llama.cpp at scale 1
  (llama-cpp-python's ``lora_path``, which calls ``llama_set_adapters_lora`` as ``llama-server --lora`` does).

Each row: perplexity, KL(reference || row) of the next-token distributions and top-1 agreement, and the
bytes on disk of what is shipped. Per type also the direct figure KL(merged || base+adapter): for the F16
pair only the order of rounding differs (target mean < 1e-4 nats); for Q4_K_M the adapter's update is
added in F16 to a 4-bit base instead of being quantized with it. Both files of a type are measured in
one llama.cpp child process (``run_isolated``), with llama-cpp-python's defaults (flash attention off).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tqdm import tqdm

from lora2gguf import hf, metrics
from lora2gguf.artifacts import Output, check_paths, sha256_file, sha256_tree, write_json
from lora2gguf.errors import Lora2ggufError
from lora2gguf.formats.gguf import read_gguf
from lora2gguf.llamacpp import LlamaRuntime, run_isolated
from lora2gguf.provenance import Timer, build_report
from lora2gguf.settings import Evaluation, resolve_evaluation

logger = logging.getLogger(__name__)

REPORT_KIND = "adapter_compare"
# KL(merged || base+adapter) expected of unquantized pairs: only rounding order differs.
TARGET_MEAN_KL = 1e-4
_FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class AdapterCompareOptions:
    """What ``lora2gguf adapter-compare`` measures."""

    reference: Path  # the merged Hugging Face model folder (float reference)
    merged_ggufs: tuple[Path, ...]  # the merged model's GGUFs (F16, Q4_K_M, ...)
    base_ggufs: tuple[Path, ...]  # the base model's GGUFs, one per type of merged_ggufs
    adapter: Path  # the run's LoRA adapter GGUF (lora2gguf adapter)
    out: Path  # adapter_compare.json
    config: str | None = None  # config.yaml: evaluation.{text,max_tokens,context}
    eval_text: str | None = None
    max_tokens: int | None = None
    context: int | None = None
    threads: int = os.cpu_count() or 1  # llama.cpp's threads (and torch's, for the reference)
    device: str = "cpu"  # of the PyTorch reference
    trust_remote_code: bool = False
    allow_pickle: bool = False


@dataclass(frozen=True)
class Pair:
    """The merged GGUF and the base GGUF of one type."""

    type: str
    merged: Path
    base: Path


@dataclass(frozen=True)
class _PairJob:
    """What the llama.cpp child process needs for one pair (plain data: it is pickled)."""

    pair: Pair
    adapter: Path
    ref_logits: list[np.ndarray]
    windows: list[list[int]]
    context: int
    threads: int


# -- inputs -----------------------------------------------------------------------------------------
def file_type(path: Path) -> str:
    """The GGUF's general.file_type as llama.cpp names it without its prefix: F16, Q4_K_M, ..."""
    value = read_gguf(path).metadata.get("general.file_type")
    if value is None:
        raise Lora2ggufError(f"{path}: no general.file_type in the GGUF header, so its type cannot be paired")
    try:
        name = gguf.LlamaFileType(int(value)).name
    except ValueError:
        return f"FILE_TYPE_{value}"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _by_type(paths: tuple[Path, ...], flag: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in paths:
        kind = file_type(path)
        if kind in found:
            raise Lora2ggufError(f"{path}: {flag} {found[kind]} is of the same type {kind}; give one file per type")
        found[kind] = path
    return found


def pair_by_type(merged: tuple[Path, ...], base: tuple[Path, ...]) -> list[Pair]:
    """Each --merged-gguf with the --base-gguf of the same general.file_type, in the order given."""
    merged_types, base_types = _by_type(merged, "--merged-gguf"), _by_type(base, "--base-gguf")
    for kind, path in merged_types.items():
        if kind not in base_types:
            raise Lora2ggufError(
                f"{path}: --merged-gguf of type {kind} has no --base-gguf of that type "
                f"(base types given: {', '.join(base_types) or 'none'})"
            )
    for kind, path in base_types.items():
        if kind not in merged_types:
            raise Lora2ggufError(
                f"{path}: --base-gguf of type {kind} has no --merged-gguf of that type "
                f"(merged types given: {', '.join(merged_types) or 'none'})"
            )
    return [Pair(kind, path, base_types[kind]) for kind, path in merged_types.items()]


def describe_adapter(path: Path, pairs: list[Pair]) -> dict[str, Any]:
    """Header facts of the adapter GGUF; refuse a file that is no LoRA adapter or is for another architecture."""
    header = read_gguf(path)
    meta = header.metadata
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise Lora2ggufError(
            f"{path}: general.type {meta.get('general.type')!r} / adapter.type {meta.get('adapter.type')!r}: "
            "not a llama.cpp LoRA adapter GGUF (lora2gguf adapter writes one)"
        )
    arch = meta.get("general.architecture")
    for pair in pairs:
        base_arch = read_gguf(pair.base).metadata.get("general.architecture")
        if base_arch != arch:
            raise Lora2ggufError(f"{path}: adapter for architecture {arch!r}, but {pair.base} is {base_arch!r}")
    types: dict[str, int] = {}
    for tensor in header.tensors:
        types[tensor.type_name] = types.get(tensor.type_name, 0) + 1
    return {
        "file": str(path),
        "sha256": sha256_file(path),
        "size_bytes": path.stat().st_size,
        "architecture": arch,
        "alpha": meta.get("adapter.lora.alpha"),
        "n_tensors": len(header.tensors),
        "tensor_types": dict(sorted(types.items())),
    }


def _check_inputs(options: AdapterCompareOptions) -> tuple[Evaluation, list[Pair]]:
    config = options.config if options.config and not options.config.lstrip().startswith(("[", "{")) else None
    inputs = [("--reference", options.reference), ("--adapter", options.adapter), ("--config", config)]
    inputs += [("--merged-gguf", p) for p in options.merged_ggufs] + [("--base-gguf", p) for p in options.base_ggufs]
    check_paths([*inputs, ("--eval-text", options.eval_text)], [Output("--out", options.out)])
    evaluation = resolve_evaluation(options.config, options.eval_text, options.max_tokens, options.context)
    check_paths([*inputs, ("evaluation.text", evaluation.text)], [Output("--out", options.out)])
    if options.threads < 1:
        raise Lora2ggufError(f"--threads {options.threads}: must be at least 1")
    if not options.merged_ggufs:
        raise Lora2ggufError("no --merged-gguf given: nothing to compare")
    hf.check_model_dir(options.reference, options.allow_pickle)
    for path in (*options.merged_ggufs, *options.base_ggufs, options.adapter):
        if not Path(path).is_file():
            raise Lora2ggufError(f"{path}: GGUF file not found")
    return evaluation, pair_by_type(options.merged_ggufs, options.base_ggufs)


# -- the float reference ----------------------------------------------------------------------------
def _windows(options: AdapterCompareOptions, evaluation: Evaluation) -> list[list[int]]:
    """The evaluation text as the reference tokenizer cuts it, in windows (as lora2gguf compare does)."""
    tokenizer = hf.load_tokenizer(options.reference, trust_remote_code=options.trust_remote_code)
    ids = hf.text_ids(tokenizer, evaluation.text.read_text(encoding="utf-8"), evaluation.max_tokens)
    windows = metrics.windows(ids, evaluation.context)
    if not windows:
        raise Lora2ggufError(f"{evaluation.text}: fewer than 2 tokens to score")
    return windows


def _reference_logits(options: AdapterCompareOptions, windows: list[list[int]]) -> tuple[str, list[np.ndarray]]:
    """The merged model's float32 logits on every window (PyTorch); the model is released afterwards."""
    import torch

    device = hf.select_device(options.device)
    torch.set_num_threads(options.threads)
    model, _ = hf.load(
        options.reference, device, torch.float32, trust_remote_code=options.trust_remote_code,
        allow_pickle=options.allow_pickle,
    )
    logits = [hf.logits(model, w) for w in tqdm(windows, desc="reference logits", disable=None)]
    del model
    return device, logits


# -- llama.cpp ----------------------------------------------------------------------------------------
def gguf_logits(path: Path, windows: list[list[int]], context: int, threads: int,
                lora: Path | None = None) -> list[np.ndarray]:
    """llama.cpp's logits on every window: ``path`` alone, or with the adapter ``lora`` at scale 1."""
    with LlamaRuntime(path, n_ctx=context, n_threads=threads, logits_all=True, lora=lora) as rt:
        return [rt.logits(w) for w in windows]


def _stats(ref: list[np.ndarray], cand: list[np.ndarray], windows: list[list[int]], where: Path) -> dict[str, Any]:
    stats = metrics.PositionStats()
    for window, ref_logits, logits in zip(windows, ref, cand):
        if ref_logits.shape[1] != logits.shape[1]:
            raise Lora2ggufError(
                f"{where}: {logits.shape[1]} logits per position, the reference has {ref_logits.shape[1]}"
            )
        stats.add_window(ref_logits, logits, window)
    return stats.summary()


def measure_pair(job: _PairJob) -> dict[str, Any]:
    """Both ways to ship one type, against the reference and against each other (in the child process)."""
    pair = job.pair
    merged = gguf_logits(pair.merged, job.windows, job.context, job.threads)
    with_adapter = gguf_logits(pair.base, job.windows, job.context, job.threads, lora=job.adapter)
    return {
        "merged": _stats(job.ref_logits, merged, job.windows, pair.merged),
        "base+adapter": _stats(job.ref_logits, with_adapter, job.windows, pair.base),
        "direct": _stats(merged, with_adapter, job.windows, pair.base),
    }


# -- the report ---------------------------------------------------------------------------------------
def _file(role: str, path: Path) -> dict[str, Any]:
    return {"role": role, "file": str(path), "sha256": sha256_file(path), "size_bytes": path.stat().st_size}


def _rows(pair: Pair, adapter: dict[str, Any], measured: dict[str, Any], ref_ppl: float) -> list[dict[str, Any]]:
    adapter_file = {"role": "adapter", "file": adapter["file"], "sha256": adapter["sha256"],
                    "size_bytes": adapter["size_bytes"]}
    ways = (
        ("merged", f"merged {pair.type}", [_file("merged", pair.merged)]),
        ("base+adapter", f"{pair.type} base + adapter", [_file("base", pair.base), adapter_file]),
    )
    rows = []
    for way, label, files in ways:
        quality = measured[way]
        rows.append({
            "label": label,
            "way": way,
            "type": pair.type,
            "files": files,
            "size_bytes": sum(f["size_bytes"] for f in files),
            **quality,
            "perplexity_ratio": quality["perplexity"] / ref_ppl,
        })
    return rows


def _direct(pair: Pair, measured: dict[str, Any]) -> dict[str, Any]:
    direct = measured["direct"]
    entry = {
        "type": pair.type,
        "of": f"{pair.type} base + adapter",
        "against": f"merged {pair.type}",
        "kl_divergence": direct["kl_divergence"],
        "top1_agreement": direct["top1_agreement"],
        "positions": direct["positions"],
    }
    if pair.type in _FLOAT_TYPES:
        entry["target_mean_kl"] = TARGET_MEAN_KL
        entry["meets_target"] = direct["kl_divergence"]["mean"] < TARGET_MEAN_KL
    return entry


def _size(pair: Pair, adapter_bytes: int) -> dict[str, Any]:
    merged, base = pair.merged.stat().st_size, pair.base.stat().st_size
    return {
        "type": pair.type,
        "merged_bytes": merged,
        "base_bytes": base,
        "adapter_bytes": adapter_bytes,
        "base_plus_adapter_bytes": base + adapter_bytes,
        "each_further_candidate_bytes": {"merged": merged, "base+adapter": adapter_bytes},
    }


def _settings(options: AdapterCompareOptions, evaluation: Evaluation, windows: list[list[int]]) -> dict[str, Any]:
    return {
        "eval_text": str(evaluation.text),
        "eval_text_sha256": sha256_file(evaluation.text),
        "max_tokens": evaluation.max_tokens,
        "context": evaluation.context,
        "tokens_scored": sum(len(w) for w in windows),
        "windows": len(windows),
        "positions_scored": sum(len(w) - 1 for w in windows),
        "tokenizer": "the reference's Hugging Face tokenizer; llama.cpp receives the same token ids",
        "kl_direction": "KL(reference || row) of next-token distributions, nats; direct: KL(merged || base+adapter)",
        "threads": options.threads,
        "llama_cpp": "llama-cpp-python Llama(logits_all=True, flash_attn=False); the adapter through "
        "lora_path at lora_scale 1 (llama_adapter_lora_init + llama_set_adapters_lora)",
    }


def _measured() -> list[str]:
    return [
        "reference: the merged Hugging Face model in float32 (PyTorch), logits on every window",
        "per type: the merged GGUF alone, and the base GGUF with the adapter GGUF at scale 1, in llama.cpp",
        "rows: perplexity, KL(reference || row) and top-1 agreement with the reference",
        "direct: KL(merged || base+adapter) and top-1 agreement between the two ways of one type",
        "sizes: bytes on disk of the merged file, of the base file plus the adapter, and of the adapter alone",
    ]


def _body(options: AdapterCompareOptions, evaluation: Evaluation, windows: list[list[int]], ref: dict[str, Any],
          adapter: dict[str, Any], pairs: list[Pair], measured: list[dict[str, Any]]) -> dict[str, Any]:
    rows = [row for pair, m in zip(pairs, measured) for row in _rows(pair, adapter, m, ref["perplexity"])]
    return {
        "reference": ref,
        "adapter": adapter,
        "settings": _settings(options, evaluation, windows),
        "rows": rows,
        "direct": [_direct(pair, m) for pair, m in zip(pairs, measured)],
        "sizes": [_size(pair, adapter["size_bytes"]) for pair in pairs],
        "measured": _measured(),
    }


def compare_adapter(options: AdapterCompareOptions) -> dict[str, Any]:
    """Measure base + adapter against the merged GGUF of every type and write ``options.out``."""
    evaluation, pairs = _check_inputs(options)
    adapter = describe_adapter(options.adapter, pairs)
    windows = _windows(options, evaluation)
    logger.info("%s: %d window(s) of <= %d tokens; types %s", options.reference, len(windows), evaluation.context,
                ", ".join(p.type for p in pairs))
    with Timer() as timer:
        device, ref_logits = _reference_logits(options, windows)
    ref_nll = [x for w, lg in zip(windows, ref_logits) for x in metrics.window_nll(lg, w)]
    ref = {
        "model": str(options.reference),
        "dtype": "float32",
        "device": device,
        "perplexity": metrics.perplexity(ref_nll),
        "seconds": timer.seconds,
        "sha256": sha256_tree(options.reference),
        "note": "the merged model; lora2gguf merge verified it against the base with the peft adapter",
    }
    measured = []
    for pair in pairs:
        logger.info("%s: merged %s and base %s + adapter in llama.cpp", pair.type, pair.merged, pair.base)
        job = _PairJob(pair, options.adapter, ref_logits, windows, evaluation.context, options.threads)
        measured.append(run_isolated(pair.base, measure_pair, job))
    body = _body(options, evaluation, windows, ref, adapter, pairs, measured)
    report = build_report(REPORT_KIND, body, device=device)
    write_json(options.out, report)
    for entry in report["direct"]:
        logger.info("%s: KL(merged || base+adapter) mean %.3g, top-1 %.4f", entry["type"],
                    entry["kl_divergence"]["mean"], entry["top1_agreement"])
    logger.info("wrote %s", options.out)
    return report
