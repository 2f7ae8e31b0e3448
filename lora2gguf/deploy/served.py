"""The served round trip: what `lora2gguf serve` answers must be llama.cpp's own greedy answer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora2gguf.llamacpp import LlamaRuntime

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]


@dataclass
class Case:
    name: str
    messages: Messages
    reference_ids: list[int]


def runtime_answers(gguf: Path, cases: list[Case], stop_ids: list[int], max_new_tokens: int, n_ctx: int,
                    threads: int, flash_attn: bool) -> dict[str, list[int]]:
    """llama-cpp-python's greedy continuation of each reference prompt (a stop token ends it and is kept)."""
    with LlamaRuntime(gguf, n_ctx=n_ctx, n_threads=threads, logits_all=False, flash_attn=flash_attn) as runtime:
        return {case.name: runtime.greedy(case.reference_ids, max_new_tokens, stop_ids).tokens for case in cases}


def server_answers(server: Any, cases: list[Case], max_new_tokens: int) -> dict[str, list[int]]:
    """llama-server's own greedy continuation of each reference prompt given as token ids (/completion,
    no template involved): the same engine and settings as its chat answers, so any difference in
    a chat answer comes from the prompt the chat path built."""
    answers = {}
    for case in cases:
        reply = server.post("/completion", {"prompt": case.reference_ids, "n_predict": max_new_tokens,
                                            "temperature": 0.0, "top_k": 1, "return_tokens": True})
        answers[case.name] = [int(t) for t in reply["tokens"]]
    return answers


def agreement(served: dict[str, list[int]], other: dict[str, list[int]]) -> str:
    same = sum(served[name] == other[name] for name in served)
    return f"{same}/{len(served)}"


def _served_ids(reply: dict[str, Any]) -> list[int] | None:
    """The sampled token ids, stop token included: llama-server returns them with verbose and
    return_tokens; llama-cpp-python's server has no such field (its answer is compared as text)."""
    tokens = reply.get("__verbose", {}).get("tokens")
    return None if tokens is None else [int(t) for t in tokens]


def _answer_check(case: Case, reply: dict[str, Any], expected: list[int], stop_ids: set[int],
                  seconds: float, detokenize: Any) -> dict[str, Any]:
    choice = reply["choices"][0]
    stopped = bool(expected) and expected[-1] in stop_ids
    expected_text = detokenize(expected[:-1] if stopped else expected)
    got = choice["message"].get("content") or ""
    served_ids = _served_ids(reply)
    usage = reply.get("usage", {})
    completion = int(usage.get("completion_tokens", 0))
    return {
        "conversation": case.name,
        "prompt_tokens": usage.get("prompt_tokens"),
        "reference_prompt_tokens": len(case.reference_ids),
        "prompt_tokens_match": usage.get("prompt_tokens") == len(case.reference_ids),
        "compared_as": "token ids" if served_ids is not None else "text",
        "answer_matches_llama_cpp_greedy": served_ids == expected if served_ids is not None else got == expected_text,
        "answer_ids": served_ids,
        "expected_ids": expected,
        "answer": got,
        "expected_answer": expected_text,
        "finish_reason": choice.get("finish_reason"),
        "expected_finish_reason": "stop" if stopped else "length",
        "completion_tokens": completion,
        "seconds": round(seconds, 4),
        "server_timings": reply.get("timings"),
    }


def ask_greedily(server: Any, messages: Messages, max_new_tokens: int, **extra: Any) -> tuple[dict[str, Any], float]:
    if server.backend == "llama-server":
        extra = {"verbose": True, "return_tokens": True, **extra}  # the sampled ids come back
    start = time.perf_counter()
    reply = server.chat(messages, temperature=0.0, top_k=1, max_tokens=max_new_tokens, **extra)
    return reply, time.perf_counter() - start


def forced_stop(server: Any, case: Case, stop_id: int, max_new_tokens: int) -> dict[str, Any]:
    """The demo models rarely end a reply within a few tokens: a logit bias on the end-of-turn token
    makes the server meet it at once, and the reply must then end there with finish_reason "stop"."""
    reply, _ = ask_greedily(server, case.messages, max_new_tokens, logit_bias={str(stop_id): 100.0})
    choice = reply["choices"][0]
    return {
        "conversation": case.name,
        "stop_token_id": stop_id,
        "finish_reason": choice.get("finish_reason"),
        "completion_tokens": reply.get("usage", {}).get("completion_tokens"),
        "ends_at_stop": choice.get("finish_reason") == "stop",
    }


def served_round_trip(server: Any, cases: list[Case], expected: dict[str, list[int]], stop_ids: list[int],
                      max_new_tokens: int, detokenize: Any) -> dict[str, Any]:
    checks = []
    for case in cases:
        reply, seconds = ask_greedily(server, case.messages, max_new_tokens)
        checks.append(_answer_check(case, reply, expected[case.name], set(stop_ids), seconds, detokenize))
    tokens = sum(c["completion_tokens"] for c in checks)
    seconds = sum(c["seconds"] for c in checks)
    end_of_turn = stop_ids[0]
    return {
        "conversations": checks,
        "all_prompt_tokens_match": all(c["prompt_tokens_match"] for c in checks),
        "all_answers_match": all(c["answer_matches_llama_cpp_greedy"] for c in checks),
        "forced_stop": forced_stop(server, cases[0], end_of_turn, max_new_tokens),
        "client_tokens_per_second": round(tokens / seconds, 2) if seconds else None,
    }
