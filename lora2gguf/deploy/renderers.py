"""The prompt renderers a deployed model meets, each turning a conversation into token ids.

Each is built once per report and is either measured (``render`` set) or not (``reason`` says why):
a renderer we cannot run here is reported as such, never guessed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora2gguf import hf
from lora2gguf.deploy.chat_facts import TEMPLATE_KEY, ChatFacts
from lora2gguf.deploy.modelfile import ModelfileContent
from lora2gguf.deploy.template import GoRenderer

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]
Post = Callable[[str, dict[str, Any]], dict[str, Any]]


@dataclass
class Renderer:
    name: str
    how: str
    render: Callable[[Messages], list[int]] | None  # None: not measured
    reason: str | None = None  # why it was not measured
    notes: list[str] = field(default_factory=list)


def hf_renderer(name: str, tokenizer: Any, template: str | None, how: str) -> Renderer:
    return Renderer(name, how, lambda messages: hf.chat_ids(tokenizer, messages, template))


def vocab_only(gguf: Path) -> Any:
    """The GGUF's tokenizer in llama.cpp (no weights loaded)."""
    from llama_cpp import Llama

    return Llama(model_path=str(gguf), vocab_only=True, verbose=False)


def _builtin_formatter(name: str) -> Callable[..., Any]:
    from llama_cpp import llama_chat_format

    functions = {"chatml": "format_chatml", "llama-3": "format_llama3", "mistral-instruct": "format_mistral_instruct"}
    return getattr(llama_chat_format, functions[name])


def llama_cpp_python_renderer(llm: Any) -> Renderer:
    """llama-cpp-python's chat formatting as its server does it: a built-in format when the GGUF's
    template equals one it knows verbatim, else a Jinja formatter on the GGUF's template with the
    BOS/EOS texts of the vocabulary; the prompt is tokenized with add_bos = not added_special."""
    from llama_cpp import llama_chat_format

    how = "llama_cpp.llama_chat_format on the GGUF metadata, tokenized by llama.cpp"
    template = llm.metadata.get(TEMPLATE_KEY)
    if template is None:
        return Renderer("llama-cpp-python", how, None, f"{TEMPLATE_KEY} missing: it would use a default format")
    notes = []
    guessed = llama_chat_format.guess_chat_format_from_gguf_metadata(llm.metadata)
    if guessed is not None:
        formatter = _builtin_formatter(guessed)
        notes.append(f"the template equals llama-cpp-python's '{guessed}' verbatim, so it uses that built-in format")
    else:
        text = llm._model.token_get_text
        eos, bos = llm.token_eos(), llm.token_bos()
        formatter = llama_chat_format.Jinja2ChatFormatter(
            template=template, eos_token=text(eos) if eos != -1 else "", bos_token=text(bos) if bos != -1 else "",
            stop_token_ids=[eos])

    def render(messages: Messages) -> list[int]:
        result = formatter(messages=messages)
        return list(llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True))

    return Renderer("llama-cpp-python", how, render, notes=notes)


def ollama_renderer(llm: Any, modelfile: ModelfileContent, facts: ChatFacts) -> Renderer:
    """The Modelfile's TEMPLATE through Go's text/template with Ollama's data (GoRenderer), tokenized
    as Ollama's runner does: special tokens parsed, BOS added when the GGUF asks for it."""
    how = "Go text/template with Ollama's chat data (lora2gguf/deploy/ollama_render.go), tokenized by llama.cpp"
    if modelfile.template is None:
        return Renderer("ollama", how, None, "the Modelfile has no TEMPLATE (the chat template was not translated)")
    missing = GoRenderer.available()
    if missing is not None:
        return Renderer("ollama", how, None, missing)
    go = GoRenderer()

    def render(messages: Messages) -> list[int]:
        text = go.render(modelfile.template, messages, modelfile.system)
        return list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))

    return Renderer("ollama", how, render, notes=[f"tokenized with add_special (BOS added: {facts.add_bos})"])


def llama_server_renderer(post: Post | None, reason: str | None) -> Renderer:
    """llama.cpp's own template engine in llama-server --jinja: /apply-template renders, /tokenize with
    add_special and parse_special, as the chat completion endpoint tokenizes its prompt."""
    how = "llama-server --jinja: POST /apply-template, then POST /tokenize (add_special, parse_special)"
    if post is None:
        return Renderer("llama-server", how, None, reason)

    def render(messages: Messages) -> list[int]:
        prompt = post("/apply-template", {"messages": messages})["prompt"]
        tokens = post("/tokenize", {"content": prompt, "add_special": True, "parse_special": True})["tokens"]
        return [int(t) for t in tokens]

    return Renderer("llama-server", how, render)
