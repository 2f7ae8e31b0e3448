"""`lora2gguf compare`: the export guide's compare_models.py, measured rather than promised.

The merged model in PyTorch float32 is the reference. Every GGUF file (F16 and each quantization) runs
in real llama.cpp and is fed the very token ids PyTorch saw (the Hugging Face tokenizer's), so every
difference comes from the weights and the runtime, not from tokenization. Per file: perplexity and its
ratio to the reference, KL divergence of the next-token distributions (mean, median, 99th percentile,
max), top-1 agreement, greedy generation agreement on the test prompts, size, bits per weight, tensor
types (plus the quantizer's sidecar), and llama.cpp prompt / generation speed.

Each GGUF file is loaded in llama.cpp in a child process of its own (runtime.run_isolated): a file that
makes llama.cpp abort or segfault is recorded under "failed" in the report with the signal, the other
files are still scored, the report is written, and the command ends with one error line (exit 2).
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

from lora2gguf import hf, metrics
from lora2gguf.artifacts import Output, check_paths, sha256_file, sha256_tree, write_json
from lora2gguf.errors import Lora2ggufError
from lora2gguf.evaluate import gguf_facts
from lora2gguf.llamacpp import LlamaCrash, LlamaRuntime, Perf, run_isolated
from lora2gguf.settings import (
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


def _check_paths(options: CompareOptions, eval_text: Path | None = None) -> None:
    """The report must not overwrite an input or a folder (inline JSON settings are no file)."""
    settings = (("--config", options.config), ("--prompts", options.prompts), ("--generation", options.generation))
    files = [(label, value) for label, value in settings if value and not value.lstrip().startswith(("[", "{"))]
    inputs = [("--reference", options.reference), *[("--gguf", path) for path in options.ggufs], *files]
    inputs += [("--eval-text", options.eval_text), ("evaluation.text", eval_text)]
    check_paths(inputs, [Output("--out", options.out)])


def _check_inputs(options: CompareOptions) -> _Inputs:
    _check_paths(options)
    evaluation = resolve_evaluation(options.config, options.eval_text, options.max_tokens, options.context)
    _check_paths(options, evaluation.text)  # the text may come from --config
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
    return stats.summary()


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


def _llama_greedy(
    rt: LlamaRuntime, prompt_ids: list[list[int]], max_new: int, stop_ids: list[int]
) -> tuple[list[list[int]], float]:
    """Greedy continuations of every prompt in llama.cpp, and their wall-clock seconds."""
    outputs = []
    gen_wall = 0.0
    for ids in prompt_ids:
        result = rt.greedy(ids, max_new, stop_ids)
        gen_wall += result.generation_seconds
        outputs.append(result.tokens)
    return outputs, gen_wall


def _greedy_cases(
    ref_greedy: list[list[int]], tokenizer: Any, prompts: list[Prompt], outputs: list[list[int]]
) -> list[dict[str, Any]]:
    """Each prompt's llama.cpp continuation against the reference's."""
    cases = []
    for prompt, ref_tokens, tokens in zip(prompts, ref_greedy, outputs):
        agreement = metrics.token_agreement(ref_tokens, tokens)
        ref_text = tokenizer.decode(ref_tokens, skip_special_tokens=True)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        cases.append(
            {
                "id": prompt.id,
                **agreement,
                "text_similarity": metrics.text_similarity(ref_text, text),
                "text": text,
            }
        )
    return cases


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


@dataclass(frozen=True)
class _LlamaJob:
    """What the llama.cpp child process needs for one GGUF file (plain data: it is pickled)."""

    path: Path
    ref_logits: list[np.ndarray]
    vocab: int
    windows: list[list[int]]
    context: int
    prompt_ids: list[list[int]]
    stop_ids: list[int]
    max_new: int
    threads: int
    repeats: int


def _speed_and_greedy(job: _LlamaJob) -> dict[str, Any]:
    """Prompt speed and greedy decoding on an instance without per-position logits."""
    bench_ids = job.windows[0]
    n_ctx = max(len(bench_ids), max(len(ids) for ids in job.prompt_ids) + job.max_new)
    with LlamaRuntime(job.path, n_ctx=n_ctx, n_threads=job.threads, logits_all=False) as rt:
        facts = {"llama_model_size_bytes": rt.model_size_bytes(), "llama_n_params": rt.n_params()}
        pp, pp_rates, pp_walls = _time_prompt(rt, bench_ids, job.repeats)
        rt.perf_reset()
        outputs, gen_wall = _llama_greedy(rt, job.prompt_ids, job.max_new, job.stop_ids)
        tg = rt.perf()
    speed = {
        "threads": job.threads,
        "prompt_tokens": pp.prompt_tokens,
        "prompt_repeats": job.repeats,
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
    return {"greedy": outputs, "speed": speed, "llama_cpp": facts}


def _measure_in_llama(job: _LlamaJob) -> dict[str, Any]:
    """Everything llama.cpp measures of one file; runs in the child process (runtime.run_isolated)."""
    quality = score_gguf(job.path, {"logits": job.ref_logits, "vocab": job.vocab}, job.windows, job.context, job.threads)
    return {"quality": quality, **_speed_and_greedy(job)}


def _score_file(
    options: CompareOptions, inputs: _Inputs, tokens: _Tokens, ref: dict[str, Any], ref_ppl: float,
    path: Path, facts: dict[str, Any],
) -> dict[str, Any]:
    """One GGUF file's entry of the report: its facts, quality, generation agreement and speed."""
    logger.info("%s (%s): scoring in llama.cpp with %d threads", path, facts["file_type"], options.threads)
    job = _LlamaJob(
        path, ref["logits"], ref["vocab"], tokens.windows, inputs.evaluation.context, tokens.prompt_ids,
        ref["stop_ids"], inputs.max_new, options.threads, options.speed_repeats,
    )
    with Timer() as timer:
        # A child process per file: a file that crashes llama.cpp costs only its own entry.
        measured = run_isolated(path, _measure_in_llama, job)
    quality, speed, runtime_facts = measured["quality"], measured["speed"], measured["llama_cpp"]
    cases = _greedy_cases(ref["greedy"], tokens.tokenizer, inputs.prompts, measured["greedy"])
    generation = _generation_summary(cases)
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


def _score_all(
    options: CompareOptions, inputs: _Inputs, tokens: _Tokens, ref: dict[str, Any], ref_ppl: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The entries of the files scored and of those that failed (llama.cpp refused or crashed on
    them): one bad file must not throw away the scores of the others."""
    models: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for path, facts in zip(options.ggufs, inputs.files):
        try:
            models.append(_score_file(options, inputs, tokens, ref, ref_ppl, path, facts))
        except Lora2ggufError as exc:
            logger.warning("%s: not scored; going on with the other files", path)
            failed.append(
                {
                    "file": str(path),
                    "label": facts["file_type"],
                    "sha256": sha256_file(path),
                    "error": str(exc),
                    "llama_cpp_crashed": isinstance(exc, LlamaCrash),
                }
            )
    return models, failed


def _failure_message(out: Path, models: list[dict[str, Any]], failed: list[dict[str, Any]]) -> str:
    """One line: the first failure (it names its file), how many more, and where the rest went."""
    message = failed[0]["error"]
    if len(failed) > 1:
        message += f"; {len(failed) - 1} more file(s) not scored: " + ", ".join(f["file"] for f in failed[1:])
    kept = f"the scores of the other {len(models)} file(s)" if models else "no scores"
    return f"{message} ({out} holds {kept} and lists every failure under 'failed')"


def compare_models(options: CompareOptions) -> dict[str, Any]:
    """Score every GGUF file against the float reference and write the report to ``options.out``."""
    inputs = _check_inputs(options)
    tokens = _tokenize(options, inputs)
    with Timer() as ref_timer:
        ref = _reference_pass(options, tokens.windows, tokens.prompt_ids, inputs.max_new)
    ref_ppl = metrics.perplexity(ref["nll"])
    logger.info("reference perplexity %.4f (%.1f s)", ref_ppl, ref_timer.seconds)
    models, failed = _score_all(options, inputs, tokens, ref, ref_ppl)
    # device_info keeps its name: the comparison plot reads its cpu_count.
    body = {
        "device_info": device_info(ref["device"]),
        "reference": _reference_section(options, inputs, tokens, ref, ref_ppl, ref_timer.seconds),
        "settings": _settings_section(options, inputs, tokens, ref),
        "models": models,
        # only when some file could not be scored: which, and why (the others' scores are kept)
        **({"failed": failed} if failed else {}),
    }
    report = build_report(REPORT_KIND, body)
    write_json(options.out, report)
    logger.info("wrote %s (%d GGUF files)", options.out, len(models))
    if failed:
        raise Lora2ggufError(_failure_message(options.out, models, failed))
    return report
