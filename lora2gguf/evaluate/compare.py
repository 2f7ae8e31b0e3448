"""`lora2gguf compare`: the export guide's compare_models.py, measured rather than promised.

The merged model in PyTorch float32 is the reference. Every GGUF file (F16 and each quantization) runs
in real llama.cpp and is fed the very token ids PyTorch saw (the Hugging Face tokenizer's), so every
difference comes from the weights and the runtime, not from tokenization. Per file: perplexity and its
ratio to the reference, KL divergence of the next-token distributions (mean, median, 99th percentile,
max), top-1 agreement, greedy generation agreement on the test prompts, size, bits per weight, tensor
types (plus the quantizer's sidecar), and llama.cpp prompt / generation speed.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lora2gguf import hf
from lora2gguf.artifacts import sha256_file, sha256_tree, write_json
from lora2gguf.errors import Lora2ggufError
from lora2gguf.evaluate import gguf_facts, metrics
from lora2gguf.evaluate.runtime import LlamaRuntime, Perf
from lora2gguf.evaluate.settings import (
    Evaluation,
    Generation,
    Prompt,
    resolve_evaluation,
    resolve_generation,
    resolve_prompts,
)
from lora2gguf.provenance import Timer, build_report, device_info

logger = logging.getLogger(__name__)

REPORT_KIND = "compare_models"


@dataclass(frozen=True)
class CompareOptions:
    """What ``lora2gguf compare`` measures: the float reference, the GGUF files, the text and prompts."""

    reference: Path
    ggufs: tuple[Path, ...]
    out: Path
    config: str | None = None
    eval_text: str | None = None
    max_tokens: int | None = None
    context: int | None = None
    prompts: str | None = None
    generation: str | None = None
    max_new_tokens: int | None = None
    threads: int = os.cpu_count() or 1  # llama.cpp's threads (and torch's, for the reference)
    speed_repeats: int = 3
    device: str = "cpu"  # of the PyTorch reference
    trust_remote_code: bool = False
    allow_pickle: bool = False


@dataclass(frozen=True)
class _Inputs:
    """The checked settings, and the header facts of every GGUF file."""

    evaluation: Evaluation
    prompts: list[Prompt]
    max_new: int
    files: list[dict[str, Any]]


@dataclass(frozen=True)
class _Tokens:
    """The token ids both sides are fed: the reference tokenizer's."""

    tokenizer: Any
    ids: list[int]
    windows: list[list[int]]
    prompt_ids: list[list[int]]


def _check_inputs(options: CompareOptions) -> _Inputs:
    evaluation = resolve_evaluation(options.config, options.eval_text, options.max_tokens, options.context)
    prompts = resolve_prompts(options.config, options.prompts)
    gen: Generation = resolve_generation(options.config, options.generation)
    max_new = options.max_new_tokens or gen.max_new_tokens
    if options.threads < 1:
        raise Lora2ggufError(f"--threads {options.threads}: must be at least 1")
    if options.speed_repeats < 1:
        raise Lora2ggufError(f"--speed-repeats {options.speed_repeats}: must be at least 1")
    hf.check_model_dir(options.reference, options.allow_pickle)
    for path in options.ggufs:
        if not path.is_file():
            raise Lora2ggufError(f"{path}: GGUF file not found")
    files = [gguf_facts.describe(p) for p in options.ggufs]  # fail early on an unreadable file
    return _Inputs(evaluation, prompts, max_new, files)


def _tokenize(options: CompareOptions, inputs: _Inputs) -> _Tokens:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        options.reference, local_files_only=True, trust_remote_code=options.trust_remote_code
    )
    evaluation = inputs.evaluation
    text = evaluation.text.read_text(encoding="utf-8")
    ids = hf.text_ids(tokenizer, text, evaluation.max_tokens)
    windows = metrics.windows(ids, evaluation.context)
    if not windows:
        raise Lora2ggufError(f"{evaluation.text}: fewer than 2 tokens to score")
    prompt_ids = [hf.chat_prompt_ids(tokenizer, p.text)[0] for p in inputs.prompts]
    logger.info(
        "reference %s: %d tokens in %d window(s) of <= %d, %d prompts, %d new tokens each",
        options.reference, len(ids), len(windows), evaluation.context, len(inputs.prompts), inputs.max_new,
    )
    return _Tokens(tokenizer, ids, windows, prompt_ids)


def _reference_pass(
    options: CompareOptions, windows: list[list[int]], prompt_ids: list[list[int]], max_new: int
) -> dict[str, Any]:
    """Everything needed from PyTorch, computed once, after which the model is released."""
    import torch

    device = hf.select_device(options.device)
    torch.set_num_threads(options.threads)
    model, tokenizer = hf.load(
        options.reference, device, torch.float32, trust_remote_code=options.trust_remote_code,
        allow_pickle=options.allow_pickle,
    )
    logits = [hf.logits(model, w) for w in tqdm(windows, desc="reference logits", disable=None)]
    nll = [x for w, lg in zip(windows, logits) for x in metrics.window_nll(lg, w)]
    logger.info("reference logits done; greedy decoding of %d prompts in PyTorch", len(prompt_ids))
    stop_ids = hf.stop_token_ids(model, tokenizer)
    greedy: list[list[int]] = []
    start = time.perf_counter()
    for ids in tqdm(prompt_ids, desc="reference greedy", disable=None):
        greedy.append(hf.greedy(model, ids, max_new, stop_ids))
    seconds = time.perf_counter() - start
    result = {
        "device": device,
        "logits": logits,
        "nll": nll,
        "stop_ids": stop_ids,
        "greedy": greedy,
        "greedy_seconds": seconds,
        "parameters": hf.parameter_count(model),
        "vocab": int(logits[0].shape[1]),
        "architecture": (getattr(model.config, "architectures", None) or [None])[0],
    }
    del model
    return result


def score_gguf(path: Path, ref: dict[str, Any], windows: list[list[int]], context: int, threads: int) -> dict[str, Any]:
    """Perplexity, KL divergence and top-1 agreement of one GGUF in llama.cpp against the reference
    logits ``ref["logits"]`` of the same token windows."""
    stats = metrics.PositionStats()
    with LlamaRuntime(path, n_ctx=context, n_threads=threads, logits_all=True) as rt:
        if rt.n_vocab != ref["vocab"]:
            raise Lora2ggufError(
                f"{path}: vocabulary of {rt.n_vocab} tokens, but the reference model has {ref['vocab']} logits"
            )
        for window, ref_logits in zip(windows, ref["logits"]):
            stats.add_window(ref_logits, rt.logits(window), window)
    return {
        "perplexity": metrics.perplexity(stats.nll),
        "kl_divergence": metrics.kl_summary(stats.kl),
        "top1_agreement": metrics.top1_agreement(stats.top1_same),
        "positions": len(stats.kl),
    }


def _time_prompt(rt: LlamaRuntime, bench_ids: list[int], repeats: int) -> tuple[Perf, list[float], list[float]]:
    """llama.cpp's timers of the last run, and the rate and wall time of every run."""
    rt.time_prompt(bench_ids)  # warm-up: the first pass allocates buffers and the compute graph
    # Repeated, median taken: one pass is easily disturbed by other processes on a shared CPU.
    pp_rates, pp_walls = [], []
    for _ in range(repeats):
        rt.perf_reset()
        wall = rt.time_prompt(bench_ids)
        pp = rt.perf()
        pp_walls.append(wall)
        if pp.prompt_ms > 0:
            pp_rates.append(pp.prompt_tokens / (pp.prompt_ms / 1000))
    return pp, pp_rates, pp_walls


def _greedy_cases(
    rt: LlamaRuntime, ref: dict[str, Any], tokenizer: Any, prompts: list[Prompt], prompt_ids: list[list[int]],
    max_new: int,
) -> tuple[list[dict[str, Any]], float]:
    """Greedy continuations in llama.cpp against the reference's, and their wall-clock seconds."""
    cases = []
    gen_wall = 0.0
    for prompt, ids, ref_tokens in zip(prompts, prompt_ids, ref["greedy"]):
        result = rt.greedy(ids, max_new, ref["stop_ids"])
        gen_wall += result.generation_seconds
        agreement = metrics.token_agreement(ref_tokens, result.tokens)
        ref_text = tokenizer.decode(ref_tokens, skip_special_tokens=True)
        text = tokenizer.decode(result.tokens, skip_special_tokens=True)
        cases.append(
            {
                "id": prompt.id,
                **agreement,
                "text_similarity": metrics.text_similarity(ref_text, text),
                "text": text,
            }
        )
    return cases, gen_wall


def _generation_summary(cases: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(cases)
    total_ref = sum(c["reference_tokens"] for c in cases)
    return {
        "identical_token_fraction": sum(c["identical_fraction"] for c in cases) / n,
        "identical_prefix_fraction": sum(c["prefix_tokens"] for c in cases) / total_ref if total_ref else None,
        "identical_continuations": sum(
            1 for c in cases if c["identical_tokens"] == c["reference_tokens"] == c["candidate_tokens"]
        ),
        "text_similarity": sum(c["text_similarity"] for c in cases) / n,
        "text_similarity_min": min(c["text_similarity"] for c in cases),
        "meets_guide_95_percent": sum(c["text_similarity"] for c in cases) / n >= 0.95,
        "cases": cases,
    }


def _generation_and_speed(
    path: Path,
    ref: dict[str, Any],
    tokenizer: Any,
    prompts: list[Prompt],
    prompt_ids: list[list[int]],
    bench_ids: list[int],
    max_new: int,
    threads: int,
    repeats: int,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    n_ctx = max(len(bench_ids), max(len(ids) for ids in prompt_ids) + max_new)
    with LlamaRuntime(path, n_ctx=n_ctx, n_threads=threads, logits_all=False) as rt:
        facts = {"llama_model_size_bytes": rt.model_size_bytes(), "llama_n_params": rt.n_params()}
        pp, pp_rates, pp_walls = _time_prompt(rt, bench_ids, repeats)
        rt.perf_reset()
        cases, gen_wall = _greedy_cases(rt, ref, tokenizer, prompts, prompt_ids, max_new)
        tg = rt.perf()
    speed = {
        "threads": threads,
        "prompt_tokens": pp.prompt_tokens,
        "prompt_repeats": repeats,
        "prompt_tokens_per_s": float(np.median(pp_rates)) if pp_rates else None,
        "prompt_tokens_per_s_runs": pp_rates,
        "prompt_tokens_per_s_wall": len(bench_ids) / float(np.median(pp_walls)),
        "generated_tokens": tg.generated_tokens,
        "generation_tokens_per_s": tg.generated_tokens / (tg.generation_ms / 1000) if tg.generation_ms > 0 else None,
        "generation_tokens_per_s_wall": tg.generated_tokens / gen_wall if gen_wall > 0 else None,
        "source": "llama_perf_context timers (compute only); *_wall adds the Python loop around it",
        # Speed is only comparable between runs on an otherwise idle machine: record how busy it was.
        "load_average_1min": os.getloadavg()[0],
    }
    return _generation_summary(cases), speed, facts


def _score_file(
    options: CompareOptions, inputs: _Inputs, tokens: _Tokens, ref: dict[str, Any], ref_ppl: float,
    path: Path, facts: dict[str, Any],
) -> dict[str, Any]:
    """One GGUF file's entry of the report: its facts, quality, generation agreement and speed."""
    logger.info("%s (%s): scoring in llama.cpp with %d threads", path, facts["file_type"], options.threads)
    context = inputs.evaluation.context
    with Timer() as timer:
        quality = score_gguf(path, ref, tokens.windows, context, options.threads)
        generation, speed, runtime_facts = _generation_and_speed(
            path, ref, tokens.tokenizer, inputs.prompts, tokens.prompt_ids, tokens.windows[0], inputs.max_new,
            options.threads, options.speed_repeats,
        )
    sidecar = gguf_facts.read_sidecar(path)
    entry = {
        "label": facts["file_type"] + (" imatrix" if facts["imatrix"] else ""),
        "quantized_with_imatrix": bool(facts["imatrix"]),
        # the file's quantize.imatrix.* metadata (file, dataset, entries_count, chunks_count)
        **({"imatrix": facts["imatrix"]} if facts["imatrix"] else {}),
        "file": str(path),
        "sha256": sha256_file(path),
        "size_bytes": facts["size_bytes"],
        "size_mib": facts["size_bytes"] / 2**20,
        "bits_per_weight": facts["bits_per_weight"],
        "n_params": facts["n_params"],
        "tensor_types": facts["tensor_types"],
        "sidecar": sidecar,
        "sidecar_missing_reason": None if sidecar else f"no {gguf_facts.sidecar_path(path).name} next to the file",
        # The quantizer's own count of tensors per type must match what the file holds.
        "sidecar_matches_file": None if not sidecar or "tensor_types" not in sidecar
        else sidecar["tensor_types"] == facts["tensor_types"],
        "perplexity": quality["perplexity"],
        "perplexity_ratio": quality["perplexity"] / ref_ppl,
        "kl_divergence": quality["kl_divergence"],
        "top1_agreement": quality["top1_agreement"],
        "positions_scored": quality["positions"],
        "generation": generation,
        "speed": speed,
        "llama_cpp": runtime_facts,
        "seconds": timer.seconds,
    }
    logger.info(
        "%s: ppl %.4f (x%.4f), mean KL %.6f, top-1 %.4f, greedy tokens identical %.3f, pp %.1f tok/s, tg %.1f tok/s",
        entry["label"], entry["perplexity"], entry["perplexity_ratio"], entry["kl_divergence"]["mean"],
        entry["top1_agreement"], generation["identical_token_fraction"],
        speed["prompt_tokens_per_s"] or 0.0, speed["generation_tokens_per_s"] or 0.0,
    )
    return entry


def _reference_section(
    options: CompareOptions, inputs: _Inputs, tokens: _Tokens, ref: dict[str, Any], ref_ppl: float, seconds: float
) -> dict[str, Any]:
    generated = sum(len(t) for t in ref["greedy"])
    return {
        "label": "PyTorch float32",
        "path": str(options.reference),
        "sha256": sha256_tree(options.reference),
        "architecture": ref["architecture"],
        "parameters": ref["parameters"],
        "device": ref["device"],
        "dtype": "float32",
        "perplexity": ref_ppl,
        "greedy_generated_tokens": generated,
        "greedy_tokens_per_s": generated / ref["greedy_seconds"] if ref["greedy_seconds"] > 0 else None,
        "greedy": [
            {"id": p.id, "tokens": len(t), "text": tokens.tokenizer.decode(t, skip_special_tokens=True)}
            for p, t in zip(inputs.prompts, ref["greedy"])
        ],
        "seconds": seconds,
    }


def _settings_section(
    options: CompareOptions, inputs: _Inputs, tokens: _Tokens, ref: dict[str, Any]
) -> dict[str, Any]:
    evaluation, windows = inputs.evaluation, tokens.windows
    return {
        "eval_text": str(evaluation.text),
        "eval_text_sha256": sha256_file(evaluation.text),
        "max_tokens": evaluation.max_tokens,
        "context": evaluation.context,
        "tokens_scored": len(tokens.ids),
        "windows": len(windows),
        "positions_scored": sum(len(w) - 1 for w in windows),
        "tokenizer": "the reference's Hugging Face tokenizer; llama.cpp receives the same token ids",
        "kl_direction": "KL(reference || GGUF) of next-token distributions, nats",
        "prompts": [{"id": p.id, "text": p.text, "tokens": len(i)} for p, i in zip(inputs.prompts, tokens.prompt_ids)],
        "max_new_tokens": inputs.max_new,
        "decoding": "greedy (argmax) on both sides, stop tokens " + str(ref["stop_ids"]),
        "threads": options.threads,
        "speed_prompt_tokens": len(windows[0]),
    }


def compare_models(options: CompareOptions) -> dict[str, Any]:
    """Score every GGUF file against the float reference and write the report to ``options.out``."""
    inputs = _check_inputs(options)
    tokens = _tokenize(options, inputs)
    with Timer() as ref_timer:
        ref = _reference_pass(options, tokens.windows, tokens.prompt_ids, inputs.max_new)
    ref_ppl = metrics.perplexity(ref["nll"])
    logger.info("reference perplexity %.4f (%.1f s)", ref_ppl, ref_timer.seconds)
    models = [
        _score_file(options, inputs, tokens, ref, ref_ppl, path, facts)
        for path, facts in zip(options.ggufs, inputs.files)
    ]
    # device_info keeps its name: the comparison plot reads its cpu_count.
    body = {
        "device_info": device_info(ref["device"]),
        "reference": _reference_section(options, inputs, tokens, ref, ref_ppl, ref_timer.seconds),
        "settings": _settings_section(options, inputs, tokens, ref),
        "models": models,
    }
    report = build_report(REPORT_KIND, body)
    write_json(options.out, report)
    logger.info("wrote %s (%d GGUF files)", options.out, len(models))
    return report
