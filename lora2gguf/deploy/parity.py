"""Chat parity: is the prompt a server builds from a conversation the prompt training saw?

For every test prompt and three fixed conversations (multi-turn, with a system prompt, without one)
the prompt token ids are rendered by each renderer a deployed model meets and compared with the
reference (the training template when the user names one, else the merged model's own Hugging Face
chat template):

- ``hf``: the merged folder's tokenizer, ``apply_chat_template`` (the run's saved template);
- ``llama-cpp-python``: its chat formatter built from the GGUF's metadata, as its server builds it;
- ``llama-server``: llama.cpp's own template engine (``/apply-template`` then ``/tokenize``);
- ``ollama``: the Modelfile's TEMPLATE rendered by Go's text/template with Ollama's data, tokenized
  as Ollama's runner tokenizes (special tokens parsed, BOS per the GGUF).

Then a served round trip: ``lora2gguf serve`` on the file answers every conversation greedily and
must give llama.cpp's own greedy continuation of the reference ids, count the reference's prompt
tokens, and end with finish_reason "stop" on a stop token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora2gguf import hf
from lora2gguf.artifacts import Output, check_paths, read_text, sha256_file, write_json
from lora2gguf.deploy import renderers
from lora2gguf.deploy.chat_facts import ChatFacts, generation_eos_ids, read_chat_facts
from lora2gguf.deploy.modelfile import read_modelfile
from lora2gguf.deploy.renderers import Renderer
from lora2gguf.deploy.served import Case, agreement, runtime_answers, server_answers, served_round_trip
from lora2gguf.deploy.server import RunningServer, ServeOptions
from lora2gguf.errors import Lora2ggufError
from lora2gguf.provenance import build_report
from lora2gguf.settings import Prompt

logger = logging.getLogger(__name__)

# The fixed conversations beside the test prompts: a counselling exchange in two turns and one
# with the school counsellor's own system prompt.
SYSTEM_PROMPT = "你是一名学校心理咨询师，请耐心、温和地回答学生的问题。"
ASSISTANT_REPLY = "听起来你最近压力很大。能具体说说是什么让你最担心吗？"
FOLLOW_UP = "主要是怕让父母失望。I keep thinking about it at night."

Messages = list[dict[str, str]]


@dataclass
class ParityOptions:
    merged: Path  # the merged Hugging Face folder: its tokenizer renders the reference
    gguf: Path  # the deployed file
    modelfile: Path
    out: Path  # chat_parity.json
    prompts: list[Prompt]
    training_template: Path | None = None  # the Jinja template the run was trained with
    max_new_tokens: int = 32
    threads: int = 2
    serve: bool = True  # the served round trip (needs llama-server or llama-cpp-python's server)


@dataclass
class Conversation:
    name: str
    messages: Messages


def conversations(prompts: list[Prompt]) -> list[Conversation]:
    if not prompts:
        raise Lora2ggufError("test_prompts: empty; chat parity needs at least one prompt")
    first = prompts[0].text
    cases = [Conversation(f"prompt:{p.id}", [{"role": "user", "content": p.text}]) for p in prompts]
    cases.append(Conversation("multi-turn", [
        {"role": "user", "content": first},
        {"role": "assistant", "content": ASSISTANT_REPLY},
        {"role": "user", "content": FOLLOW_UP},
    ]))
    cases.append(Conversation("with-system", [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": first},
    ]))
    return cases


def first_difference(reference: list[int], ids: list[int], facts: ChatFacts) -> dict[str, Any] | None:
    """Where two id sequences part, with the tokens around it as text; None when identical."""
    if reference == ids:
        return None
    position = next((i for i, (a, b) in enumerate(zip(reference, ids)) if a != b), min(len(reference), len(ids)))
    window = slice(max(0, position - 3), position + 4)
    return {
        "position": position,
        "reference_tokens": [facts.token(i) for i in reference[window]],
        "renderer_tokens": [facts.token(i) for i in ids[window]],
        "reference_length": len(reference),
        "renderer_length": len(ids),
    }


def _reference(options: ParityOptions, tokenizer: Any) -> tuple[list[Renderer], list[str]]:
    """The reference renderer first: the training template when named, then the run's own template."""
    run_template = renderers.hf_renderer(
        "hf", tokenizer, None, f"transformers apply_chat_template with {options.merged}'s chat template")
    if options.training_template is None:
        return [run_template], []
    text = read_text(options.training_template, "training template")
    training = renderers.hf_renderer(
        "training-template", tokenizer, text, f"transformers apply_chat_template with {options.training_template}")
    return [training, run_template], [f"reference: the training template {options.training_template}"]


def _compare(renderer: Renderer, cases: list[Case], facts: ChatFacts) -> dict[str, Any]:
    if renderer.render is None:
        return {"how": renderer.how, "measured": False, "reason": renderer.reason}
    rows = []
    for case in cases:
        ids = renderer.render(case.messages)
        difference = first_difference(case.reference_ids, ids, facts)
        rows.append({"conversation": case.name, "identical": difference is None, "first_difference": difference})
    identical = sum(row["identical"] for row in rows)
    if identical < len(rows):
        logger.warning("%s renders %d of %d conversations differently from the reference",
                       renderer.name, len(rows) - identical, len(rows))
    return {"how": renderer.how, "measured": True, "notes": renderer.notes, "identical": identical,
            "of": len(rows), "conversations": rows}


def _stop_ids(options: ParityOptions, facts: ChatFacts, stops: list[str]) -> list[int]:
    ids = [facts.token_id(text) for text in stops]
    ids += generation_eos_ids(options.merged) + [i for i in (facts.eot_id, facts.eos_id) if i is not None]
    return list(dict.fromkeys(i for i in ids if i is not None))


def _check(options: ParityOptions) -> None:
    check_paths(
        [("--merged", options.merged), ("--gguf", options.gguf), ("--modelfile", options.modelfile),
         ("--training-template", options.training_template)],
        [Output("--out", options.out)],
    )


def _context_for(cases: list[Case], max_new_tokens: int) -> int:
    """A context that holds the longest conversation and its answer, in steps of 256 tokens."""
    need = max(len(case.reference_ids) for case in cases) + max_new_tokens + 8
    return -(-need // 256) * 256


def _engine_answers(options: ParityOptions, server: Any, cases: list[Case], stop_ids: list[int],
                    n_ctx: int) -> tuple[dict[str, list[int]], str, dict[str, str]]:
    """The answers a chat reply must equal: the serving engine's greedy continuation of the reference
    ids; and how often llama-cpp-python's in-process greedy agrees (flash attention off, its default,
    and on, llama-server's default on CPU)."""
    runtime = {fa: runtime_answers(options.gguf, cases, stop_ids, options.max_new_tokens, n_ctx, options.threads, fa)
               for fa in (False, True)}
    if server.backend == "llama-server":
        expected, how = server_answers(server, cases, options.max_new_tokens), "llama-server /completion on the reference ids"
    else:
        expected, how = runtime[False], "llama-cpp-python greedy on the reference ids (flash attention off, as its server)"
    cross = {f"llama-cpp-python, flash attention {'on' if fa else 'off'}": agreement(expected, answers)
             for fa, answers in runtime.items()}
    return expected, how, cross


def _serve_and_compare(options: ParityOptions, cases: list[Case], others: list[Renderer], llm: Any,
                       facts: ChatFacts, stop_ids: list[int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Renderer comparisons and the served round trip, with one server for both."""
    n_ctx = _context_for(cases, options.max_new_tokens)
    if not options.serve:
        rendered = others + [renderers.llama_server_renderer(None, "not asked for (--no-serve)")]
        return {r.name: _compare(r, cases, facts) for r in rendered}, {"measured": False, "reason": "--no-serve"}
    with RunningServer(ServeOptions(model=options.gguf, ctx_size=n_ctx, threads=options.threads)) as server:
        post = server.post if server.backend == "llama-server" else None
        reason = None if post else "llama-server is not built (make llama-tools); served by llama-cpp-python"
        rendered = others + [renderers.llama_server_renderer(post, reason)]
        results = {r.name: _compare(r, cases, facts) for r in rendered}
        expected, how, cross = _engine_answers(options, server, cases, stop_ids, n_ctx)
        detokenize = lambda ids: llm.detokenize(ids).decode("utf-8", "replace")  # noqa: E731
        served = served_round_trip(server, cases, expected, stop_ids, options.max_new_tokens, detokenize)
        served = {"measured": True, "backend": server.backend, "n_ctx": n_ctx, "expected_answers": how,
                  **served, "greedy_agreement_with_the_engine": cross}
    return results, served


def _summary(results: dict[str, dict[str, Any]], served: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {
        name: (f"{r['identical']}/{r['of']} identical" if r["measured"] else f"not measured: {r['reason']}")
        for name, r in results.items()
    }
    if served.get("measured"):
        summary["served"] = {key: served[key] for key in ("all_prompt_tokens_match", "all_answers_match")}
        summary["served"]["forced_stop_ends_at_stop"] = served["forced_stop"]["ends_at_stop"]
    return summary


def chat_parity(options: ParityOptions) -> dict[str, Any]:
    """Write chat_parity.json; a difference is a finding (reported and logged), not an error."""
    _check(options)
    facts = read_chat_facts(options.gguf)
    modelfile = read_modelfile(options.modelfile)
    tokenizer = hf.load_tokenizer(options.merged)
    references, notes = _reference(options, tokenizer)
    reference = references[0]
    cases = [Case(c.name, c.messages, reference.render(c.messages)) for c in conversations(options.prompts)]
    llm = renderers.vocab_only(options.gguf)
    others = references[1:] + [renderers.llama_cpp_python_renderer(llm),
                               renderers.ollama_renderer(llm, modelfile, facts)]
    stop_ids = _stop_ids(options, facts, modelfile.stops)
    results, served = _serve_and_compare(options, cases, others, llm, facts, stop_ids)
    report = build_report("chat_parity", {
        "gguf": {"path": str(options.gguf), "sha256": sha256_file(options.gguf)},
        "merged": str(options.merged),
        "modelfile": {"path": str(options.modelfile), "sha256": sha256_file(options.modelfile),
                      "has_template": modelfile.template is not None},
        "training_template": str(options.training_template) if options.training_template else None,
        "reference": {"renderer": reference.name, "how": reference.how},
        "notes": notes,
        "stop_token_ids": stop_ids,
        "summary": _summary(results, served),
        "conversations": [{"name": c.name, "messages": c.messages, "reference_ids": c.reference_ids} for c in cases],
        "renderers": results,
        "served": served,
    })
    write_json(options.out, report)
    logger.info("chat parity: %s", report["summary"])
    return report
