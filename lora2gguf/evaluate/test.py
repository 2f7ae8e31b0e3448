"""`lora2gguf test`: the export guide's inference test of the merged model (test_merged_model.py).

Each test prompt becomes a chat user turn (the model's chat template applied), the model answers with
the configured generation settings, and the report records per case the reply, token counts, time to
first token, latency and tokens/s, plus load time, peak memory, device, dtype and versions.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lora2gguf import hf
from lora2gguf.artifacts import Output, check_paths, sha256_tree, write_json
from lora2gguf.errors import Lora2ggufError
from lora2gguf.evaluate import decode
from lora2gguf.settings import Generation, Prompt, resolve_decode, resolve_generation, resolve_prompts
from lora2gguf.provenance import PeakMemory, Timer, build_report, device_info

logger = logging.getLogger(__name__)

REPORT_KIND = "merged_model_test"


@dataclass(frozen=True)
class TestOptions:
    """What ``lora2gguf test`` runs: the model, where the prompts and settings come from, the device."""

    __test__ = False  # a name starting with Test: keep pytest from collecting it where tests import it

    model: Path
    out: Path
    config: str | None = None
    prompts: str | None = None
    generation: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    batch: str = "auto"  # auto, on or off
    decode: str | None = None  # auto, eager or cuda-graph; None: the config's evaluation.decode, else auto
    threads: int | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False


@dataclass(frozen=True)
class _Placement:
    """Where and how the model runs."""

    device: str
    dtype: Any  # a torch dtype
    batched: bool
    batch_reason: str
    decode: str  # the requested decoding path (auto, eager, cuda-graph)


@dataclass(frozen=True)
class _Answers:
    """What the model run produced and what it cost."""

    architecture: str | None
    parameters: int
    stop_ids: list[int]
    template_applied: bool
    cases: list[dict[str, Any]]
    load_seconds: float
    generation_seconds: float
    memory: dict[str, float | None]
    decode: dict[str, Any]  # path, reason, set-up seconds and what the set-up built


class _StepClock:
    """A stopping criterion that never stops: transformers calls it once per generated token for the
    whole batch, which gives the time of every decoding step (first call = first token)."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.times: list[float] = []

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        self.times.append(time.perf_counter() - self.start)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _generation_config(gen: Generation, stop_ids: list[int], pad_id: int) -> Any:
    from transformers import GenerationConfig

    # A fresh config, so that sampling defaults stored in the model folder (top_k=50, temperature...)
    # do not silently change what the configured settings mean.
    kwargs: dict[str, Any] = {
        "max_new_tokens": gen.max_new_tokens,
        "do_sample": gen.do_sample,
        "repetition_penalty": gen.repetition_penalty,
        "eos_token_id": stop_ids or None,
        "pad_token_id": pad_id,
        "num_beams": 1,
    }
    if gen.do_sample:
        kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=0)
    return GenerationConfig(**kwargs)


def _generate(model: Any, batch_ids: list[list[int]], gen_config: Any, pad_id: int, seed: int) -> tuple[list[list[int]], list[float]]:
    """Generate for one or more prompts (left-padded) and return the new tokens per prompt and the
    step times (seconds after the call started)."""
    import torch
    from transformers import StoppingCriteriaList

    device = next(model.parameters()).device
    width = max(len(ids) for ids in batch_ids)
    input_ids = torch.full((len(batch_ids), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch_ids), width), dtype=torch.long)
    for row, ids in enumerate(batch_ids):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention[row, width - len(ids) :] = 1
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    clock = _StepClock(time.perf_counter())
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            generation_config=gen_config,
            stopping_criteria=StoppingCriteriaList([clock]),
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    clock.times.append(time.perf_counter() - clock.start)  # end of the call
    new = output[:, width:].tolist()
    return new, clock.times


def _trim(tokens: list[int], stop_ids: set[int], pad_id: int) -> tuple[list[int], bool]:
    """Cut a row at its first stop token (kept); later positions are padding of a finished row."""
    for index, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: index + 1], True
    return tokens, False


@dataclass(frozen=True)
class _Batch:
    """What the decoding of the prompts needs: ids, settings, stop tokens, grouping."""

    prompts: list[Prompt]
    prompt_ids: list[list[int]]
    gen: Generation
    stop_ids: list[int]
    batched: bool


def _case(tokenizer: Any, work: _Batch, index: int, tokens: list[int], stopped: bool, first: float, latency: float) -> dict[str, Any]:
    """One case of the report; ``first`` and ``latency``: seconds after its generation started."""
    reply = tokens[:-1] if stopped else tokens
    return {
        "id": work.prompts[index].id,
        "prompt": work.prompts[index].text,
        "response": tokenizer.decode(reply, skip_special_tokens=True),
        "prompt_tokens": len(work.prompt_ids[index]),
        "generated_tokens": len(tokens),
        "stopped_by": "eos" if stopped else "max_new_tokens",
        "time_to_first_token_s": first,
        "latency_s": latency,
        "tokens_per_s": len(tokens) / latency if latency > 0 else None,
    }


def _eager_cases(model: Any, tokenizer: Any, work: _Batch) -> tuple[list[dict[str, Any]], float]:
    """The cases through transformers' generate(); also the seconds of the unreported warm-up."""
    gen, stop_ids, prompt_ids = work.gen, work.stop_ids, work.prompt_ids
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = stop_ids[0] if stop_ids else 0
    gen_config = _generation_config(gen, stop_ids, pad_id)
    stops = set(stop_ids)
    groups = [list(range(len(prompt_ids)))] if work.batched else [[i] for i in range(len(prompt_ids))]
    # Warm-up (not reported): the first forward pass pays one-off costs (allocator, kernel selection,
    # CUDA context) that would otherwise land on the first case's time to first token.
    with Timer() as warm_up:
        _generate(model, [prompt_ids[0]], _generation_config(replace(gen, max_new_tokens=2), stop_ids, pad_id), pad_id, gen.seed)
    results: dict[int, dict[str, Any]] = {}
    for group in tqdm(groups, desc="generating", unit="batch" if work.batched else "prompt", disable=None):
        new, times = _generate(model, [prompt_ids[i] for i in group], gen_config, pad_id, gen.seed)
        for row, index in enumerate(group):
            tokens, stopped = _trim(new[row], stops, pad_id)
            # Step k (0-based) produced token k; the row finished when its last token was produced.
            latency = times[len(tokens) - 1] if work.batched and tokens else times[-1]
            results[index] = _case(tokenizer, work, index, tokens, stopped, times[0], latency)
    return [results[i] for i in range(len(prompt_ids))], warm_up.seconds


def _fast_cases(model: Any, tokenizer: Any, work: _Batch, capture: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The cases through the static cache and CUDA graphs (decode.py); also what the set-up built
    and cost (warm-up and capture, timed apart from the cases)."""
    import torch

    ids, new_tokens, stops = work.prompt_ids, work.gen.max_new_tokens, set(work.stop_ids)
    rows = len(ids) if work.batched else 1
    positions = decode.cache_positions(ids, new_tokens)
    with torch.inference_mode():
        with Timer() as setup:
            decoder = decode.GraphDecoder(model, rows, positions, capture=capture)
            graphs = decoder.setup(ids, new_tokens)
            _synchronize(model)
        if work.batched:
            results = decoder.decode(ids, new_tokens, stops)
        else:
            results = [decoder.decode([p], new_tokens, stops)[0] for p in tqdm(ids, desc="generating", unit="prompt", disable=None)]
    cases = [_case(tokenizer, work, i, r.tokens, r.stopped, r.times[0], r.times[-1]) for i, r in enumerate(results)]
    built = {"setup_seconds": setup.seconds, "graphs_captured": graphs, "cache_rows": rows, "cache_positions": positions,
             "prefill": decoder.prefill_mode if work.batched else "rows"}
    return cases, built


def _synchronize(model: Any) -> None:
    import torch

    if next(model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()


def _cases(model: Any, tokenizer: Any, work: _Batch, choice: decode.DecodeChoice) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Answer every prompt on the chosen path; the report's decode record beside the cases."""
    record: dict[str, Any] = {"requested": choice.requested, "path": choice.path, "reason": choice.reason}
    if choice.path == decode.FAST:
        try:
            cases, built = _fast_cases(model, tokenizer, work, capture=True)
            return cases, record | built
        except RuntimeError as exc:
            if choice.requested != "auto":
                raise Lora2ggufError(f"--decode {decode.FAST}: the fast path failed: {exc}") from exc
            # auto promised a working test, not a fast one: say so and answer eagerly.
            logger.warning("the %s path failed (%s); decoding eagerly", decode.FAST, str(exc).splitlines()[0])
            record.update(path=decode.EAGER, reason=f"auto: eager, the {decode.FAST} path failed: {str(exc).splitlines()[0]}")
    cases, warm_up = _eager_cases(model, tokenizer, work)
    return cases, record | {"setup_seconds": warm_up}


def _place(options: TestOptions, n_prompts: int, gen: Generation) -> _Placement:
    """Device, dtype, torch threads, whether the prompts go in one batch, the requested decoding."""
    import torch

    device = hf.select_device(options.device)
    dtype = hf.select_dtype(options.dtype, device, options.model)
    if options.threads is not None:
        if options.threads < 1:
            raise Lora2ggufError(f"--threads {options.threads}: must be at least 1")
        torch.set_num_threads(options.threads)
    batched = options.batch == "on" or (options.batch == "auto" and device.startswith("cuda") and n_prompts > 1)
    batch_reason = {
        "on": "--batch on",
        "off": "--batch off",
        "auto": "auto: one batch on CUDA, where a step costs about the same for 1 or 6 rows"
        if batched
        else "auto: one prompt at a time on CPU, where a padded batch measured slower than one-by-one "
        "decoding (2-core CPU, tiny Qwen2: 23 s vs 6 s for 6 prompts) and per-case latency stays meaningful",
    }[options.batch]
    requested = resolve_decode(options.config, options.decode)
    decode.check_request(requested, device, gen)  # an impossible explicit request fails before loading
    logger.info("device %s, dtype %s, %d prompts, %s", device, str(dtype).removeprefix("torch."), n_prompts,
                "batched" if batched else "one at a time")
    return _Placement(device, dtype, batched, batch_reason, requested)


def _answer(options: TestOptions, place: _Placement, prompts: list[Prompt], gen: Generation) -> _Answers:
    """Load the model and answer every prompt, timing the load and the generation."""
    with PeakMemory(cuda=place.device.startswith("cuda")) as memory:
        with Timer() as load_timer:
            model, tokenizer = hf.load(
                options.model, place.device, place.dtype,
                trust_remote_code=options.trust_remote_code, allow_pickle=options.allow_pickle,
            )
        stop_ids = hf.stop_token_ids(model, tokenizer)
        if not stop_ids:
            logger.warning("%s: no eos token configured; every reply runs to max_new_tokens", options.model)
        encoded = [hf.chat_prompt_ids(tokenizer, p.text) for p in prompts]
        template_applied = all(applied for _, applied in encoded)
        if not template_applied:
            logger.warning("%s: the tokenizer has no chat template; prompts are used as plain text", options.model)
        choice = decode.choose(place.decode, place.device, gen, model)
        logger.info("decoding: %s (%s)", choice.path, choice.reason)
        work = _Batch(prompts, [ids for ids, _ in encoded], gen, stop_ids, place.batched)
        with Timer() as gen_timer:
            cases, decoding = _cases(model, tokenizer, work, choice)
    return _Answers(
        architecture=(getattr(model.config, "architectures", None) or [None])[0],
        parameters=hf.parameter_count(model),
        stop_ids=stop_ids,
        template_applied=template_applied,
        cases=cases,
        load_seconds=load_timer.seconds,
        generation_seconds=gen_timer.seconds,
        memory=memory.as_dict(),
        decode=decoding,
    )


def _summary(answers: _Answers, device: str) -> dict[str, Any]:
    cases = answers.cases
    latencies = [c["latency_s"] for c in cases]
    rates = [c["tokens_per_s"] for c in cases if c["tokens_per_s"] is not None]
    total_tokens = sum(c["generated_tokens"] for c in cases)
    peak = answers.memory
    seconds = answers.generation_seconds
    after_setup = seconds - answers.decode["setup_seconds"]
    on_cuda = device.startswith("cuda")
    return {
        "cases": len(cases),
        "decode_path": answers.decode["path"],
        "load_seconds": answers.load_seconds,
        # generation_seconds: the whole answering, set-up included; setup_seconds: the part before the
        # first case (eager: a 2-token warm-up; cuda-graph: warm-up and capture).
        "generation_seconds": seconds,
        "setup_seconds": answers.decode["setup_seconds"],
        "mean_latency_s": sum(latencies) / len(latencies),
        "mean_time_to_first_token_s": sum(c["time_to_first_token_s"] for c in cases) / len(cases),
        "mean_tokens_per_s": sum(rates) / len(rates) if rates else None,
        "generated_tokens": total_tokens,
        "overall_tokens_per_s": total_tokens / seconds if seconds > 0 else None,
        "overall_tokens_per_s_after_setup": total_tokens / after_setup if after_setup > 0 else None,
        "peak_memory_mb": peak["cuda_peak_allocated_mb"] if on_cuda else peak["peak_rss_mb"],
        "peak_memory_kind": "cuda_max_memory_allocated" if on_cuda else "process_rss",
        "memory": peak,
        # Timings are only comparable on an otherwise idle machine: record how busy it was.
        "load_average_1min": os.getloadavg()[0],
    }


_TIMING = {
    decode.EAGER: "wall clock after one unreported 2-token warm-up; time_to_first_token_s includes the prompt's forward pass; in a batch, "
    "latency_s is when that row produced its last token",
    decode.FAST: "wall clock after the set-up (a warm-up prefill per distinct prompt length, warm-up steps and the CUDA graph "
    "capture: setup_seconds); "
    "time_to_first_token_s includes the prompt's forward pass (in a batch, the rows are prefilled one after another); "
    "latency_s is when that row produced its last token",
}


def _report(options: TestOptions, place: _Placement, gen: Generation, answers: _Answers) -> dict[str, Any]:
    import torch

    # device_info stays a field of its own (next to the "device" string) as the report has always had it.
    body = {
        "model": {
            "path": str(options.model),
            "architecture": answers.architecture,
            "parameters": answers.parameters,
            "sha256": sha256_tree(options.model),
        },
        "device": place.device,
        "device_info": device_info(place.device),
        "dtype": str(place.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "settings": {
            "generation": gen.as_dict(),
            "chat_template_applied": answers.template_applied,
            "stop_token_ids": answers.stop_ids,
            "batched": place.batched,
            "batch_reason": place.batch_reason,
            "decode": answers.decode,
            "timing": _TIMING[answers.decode["path"]],
        },
        "cases": answers.cases,
        "summary": _summary(answers, place.device),
    }
    return build_report(REPORT_KIND, body)


def _check_paths(options: TestOptions) -> None:
    """The report must not overwrite the model, a settings file or a folder (inline JSON is no file)."""
    settings = (("--config", options.config), ("--prompts", options.prompts), ("--generation", options.generation))
    files = [(label, value) for label, value in settings if value and not value.lstrip().startswith(("[", "{"))]
    check_paths([("--model", options.model), *files], [Output("--out", options.out)])


def run_test(options: TestOptions) -> dict[str, Any]:
    """Answer the test prompts with the merged model and write the report to ``options.out``."""
    _check_paths(options)
    prompts = resolve_prompts(options.config, options.prompts)
    gen = resolve_generation(options.config, options.generation)
    hf.check_model_dir(options.model, options.allow_pickle)
    place = _place(options, len(prompts), gen)
    answers = _answer(options, place, prompts, gen)
    report = _report(options, place, gen, answers)
    write_json(options.out, report)
    logger.info(
        "wrote %s: %d cases, mean latency %.2f s, mean %.1f tokens/s",
        options.out, len(answers.cases), report["summary"]["mean_latency_s"],
        report["summary"]["mean_tokens_per_s"] or 0.0,
    )
    return report
