"""`lora2gguf compare`: the export guide's compare_models.py, measured rather than promised.

The merged model in PyTorch float32 is the reference. Every GGUF file (F16 and each quantization) runs
in real llama.cpp and is fed the very token ids PyTorch saw (the Hugging Face tokenizer's), so every
difference comes from the weights and the runtime, not from tokenization. Per file: perplexity and its
ratio to the reference, KL divergence of the next-token distributions (mean, median, 99th percentile,
max), top-1 agreement, greedy generation agreement on the test prompts, size, bits per weight, tensor
types (plus the quantizer's sidecar), and llama.cpp prompt / generation speed.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

HELP = "compare GGUF files in llama.cpp against the merged float model in PyTorch (compare_models.json)"

logger = logging.getLogger(__name__)

SCHEMA = "lora2gguf/compare_models/1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reference", required=True, type=Path, help="merged Hugging Face model folder")
    parser.add_argument(
        "--gguf", required=True, action="append", type=Path, help="a GGUF file to compare (repeat the flag)"
    )
    parser.add_argument("--config", help="config.yaml to read evaluation, test_prompts and generation from")
    parser.add_argument("--eval-text", help="held-out text for perplexity / KL")
    parser.add_argument("--max-tokens", type=int, help="tokens of the text scored (default 512)")
    parser.add_argument("--context", type=int, help="window / llama.cpp context size (default 512)")
    parser.add_argument("--prompts", help="test prompts: JSON/YAML file or inline JSON list of {id, text}")
    parser.add_argument("--generation", help="generation settings (only max_new_tokens is used: decoding is greedy)")
    parser.add_argument("--max-new-tokens", type=int, help="override generation.max_new_tokens")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp threads")
    parser.add_argument(
        "--speed-repeats", type=int, default=3, help="prompt-processing timing runs per file (median reported)"
    )
    parser.add_argument("--device", default="cpu", help="device of the PyTorch reference: cpu, cuda, auto")
    parser.add_argument("--out", required=True, type=Path, help="report path (compare_models.json)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the folder")
    parser.add_argument("--allow-pickle", action="store_true", help="allow pytorch_model.bin weights")


def _reference_pass(
    args: argparse.Namespace, windows: list[list[int]], prompt_ids: list[list[int]], max_new: int
) -> dict[str, Any]:
    """Everything needed from PyTorch, computed once, after which the model is released."""
    import time

    import torch

    from lora2gguf.evaluate import metrics, reference

    device = reference.select_device(args.device)
    torch.set_num_threads(args.threads)
    model, tokenizer = reference.load(
        args.reference, device, torch.float32, trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
    )
    from tqdm import tqdm

    logits = [reference.logits(model, w) for w in tqdm(windows, desc="reference logits", disable=None)]
    nll = [x for w, lg in zip(windows, logits) for x in metrics.window_nll(lg, w)]
    logger.info("reference logits done; greedy decoding of %d prompts in PyTorch", len(prompt_ids))
    stop_ids = reference.stop_token_ids(model, tokenizer)
    greedy: list[list[int]] = []
    start = time.perf_counter()
    for ids in tqdm(prompt_ids, desc="reference greedy", disable=None):
        greedy.append(reference.greedy(model, ids, max_new, stop_ids))
    seconds = time.perf_counter() - start
    result = {
        "device": device,
        "logits": logits,
        "nll": nll,
        "stop_ids": stop_ids,
        "greedy": greedy,
        "greedy_seconds": seconds,
        "parameters": reference.parameter_count(model),
        "vocab": int(logits[0].shape[1]),
        "architecture": (getattr(model.config, "architectures", None) or [None])[0],
    }
    del model
    return result


def score_gguf(path: Path, ref: dict[str, Any], windows: list[list[int]], context: int, threads: int) -> dict[str, Any]:
    """Perplexity, KL divergence and top-1 agreement of one GGUF in llama.cpp against the reference
    logits ``ref["logits"]`` of the same token windows."""
    from lora2gguf.errors import Lora2ggufError
    from lora2gguf.evaluate import metrics
    from lora2gguf.evaluate.runtime import LlamaRuntime

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


def _generation_and_speed(
    path: Path,
    ref: dict[str, Any],
    tokenizer: Any,
    prompts: list[Any],
    prompt_ids: list[list[int]],
    bench_ids: list[int],
    max_new: int,
    threads: int,
    repeats: int,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    import numpy as np

    from lora2gguf.evaluate import metrics
    from lora2gguf.evaluate.runtime import LlamaRuntime

    n_ctx = max(len(bench_ids), max(len(ids) for ids in prompt_ids) + max_new)
    with LlamaRuntime(path, n_ctx=n_ctx, n_threads=threads, logits_all=False) as rt:
        facts = {"llama_model_size_bytes": rt.model_size_bytes(), "llama_n_params": rt.n_params()}
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
        rt.perf_reset()
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
    n = len(cases)
    total_ref = sum(c["reference_tokens"] for c in cases)
    generation = {
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
    return generation, speed, facts


def run(args: argparse.Namespace) -> int:
    from lora2gguf.artifacts import sha256_file, sha256_tree, write_json
    from lora2gguf.errors import Lora2ggufError
    from lora2gguf.evaluate import gguf_facts, metrics, reference
    from lora2gguf.evaluate.settings import (
        Generation,
        resolve_evaluation,
        resolve_generation,
        resolve_prompts,
    )
    from lora2gguf.provenance import Timer, device_info, package_versions

    evaluation = resolve_evaluation(args.config, args.eval_text, args.max_tokens, args.context)
    prompts = resolve_prompts(args.config, args.prompts)
    gen: Generation = resolve_generation(args.config, args.generation)
    max_new = args.max_new_tokens or gen.max_new_tokens
    if args.threads < 1:
        raise Lora2ggufError(f"--threads {args.threads}: must be at least 1")
    if args.speed_repeats < 1:
        raise Lora2ggufError(f"--speed-repeats {args.speed_repeats}: must be at least 1")
    reference.check_model_dir(args.reference, args.allow_pickle)
    for path in args.gguf:
        if not path.is_file():
            raise Lora2ggufError(f"{path}: GGUF file not found")
    files = [gguf_facts.describe(p) for p in args.gguf]  # fail early on an unreadable file

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        args.reference, local_files_only=True, trust_remote_code=args.trust_remote_code
    )
    text = evaluation.text.read_text(encoding="utf-8")
    ids = reference.text_ids(tokenizer, text, evaluation.max_tokens)
    windows = metrics.windows(ids, evaluation.context)
    if not windows:
        raise Lora2ggufError(f"{evaluation.text}: fewer than 2 tokens to score")
    prompt_ids = [reference.chat_prompt_ids(tokenizer, p.text)[0] for p in prompts]
    logger.info(
        "reference %s: %d tokens in %d window(s) of <= %d, %d prompts, %d new tokens each",
        args.reference, len(ids), len(windows), evaluation.context, len(prompts), max_new,
    )
    with Timer() as ref_timer:
        ref = _reference_pass(args, windows, prompt_ids, max_new)
    ref_ppl = metrics.perplexity(ref["nll"])
    ref_generated = sum(len(t) for t in ref["greedy"])
    logger.info("reference perplexity %.4f (%.1f s)", ref_ppl, ref_timer.seconds)

    models = []
    for path, facts in zip(args.gguf, files):
        logger.info("%s (%s): scoring in llama.cpp with %d threads", path, facts["file_type"], args.threads)
        with Timer() as timer:
            quality = score_gguf(path, ref, windows, evaluation.context, args.threads)
            generation, speed, runtime_facts = _generation_and_speed(
                path, ref, tokenizer, prompts, prompt_ids, windows[0], max_new, args.threads, args.speed_repeats
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
        models.append(entry)

    report: dict[str, Any] = {
        "schema": SCHEMA,
        "versions": package_versions(),
        "device_info": device_info(ref["device"]),
        "reference": {
            "label": "PyTorch float32",
            "path": str(args.reference),
            "sha256": sha256_tree(args.reference),
            "architecture": ref["architecture"],
            "parameters": ref["parameters"],
            "device": ref["device"],
            "dtype": "float32",
            "perplexity": ref_ppl,
            "greedy_generated_tokens": ref_generated,
            "greedy_tokens_per_s": ref_generated / ref["greedy_seconds"] if ref["greedy_seconds"] > 0 else None,
            "greedy": [
                {"id": p.id, "tokens": len(t), "text": tokenizer.decode(t, skip_special_tokens=True)}
                for p, t in zip(prompts, ref["greedy"])
            ],
            "seconds": ref_timer.seconds,
        },
        "settings": {
            "eval_text": str(evaluation.text),
            "eval_text_sha256": sha256_file(evaluation.text),
            "max_tokens": evaluation.max_tokens,
            "context": evaluation.context,
            "tokens_scored": len(ids),
            "windows": len(windows),
            "positions_scored": sum(len(w) - 1 for w in windows),
            "tokenizer": "the reference's Hugging Face tokenizer; llama.cpp receives the same token ids",
            "kl_direction": "KL(reference || GGUF) of next-token distributions, nats",
            "prompts": [{"id": p.id, "text": p.text, "tokens": len(i)} for p, i in zip(prompts, prompt_ids)],
            "max_new_tokens": max_new,
            "decoding": "greedy (argmax) on both sides, stop tokens " + str(ref["stop_ids"]),
            "threads": args.threads,
            "speed_prompt_tokens": len(windows[0]),
        },
        "models": models,
    }
    write_json(args.out, report)
    logger.info("wrote %s (%d GGUF files)", args.out, len(models))
    return 0
