"""deploy.md: the exact commands that serve a model's files with each runtime people use."""

from __future__ import annotations

from pathlib import Path

from lora2gguf.deploy.chat_facts import ChatFacts
from lora2gguf.deploy.template import Translation

# Servers bind to the loopback interface in every command: exposing a model is a decision to make.
HOST = "127.0.0.1"


def _ollama_section(modelfile: Path, name: str, translation: Translation) -> list[str]:
    status = (
        "The Modelfile carries the model's chat template translated to Ollama's Go template "
        f"(checked on {translation.conversations_checked} conversations), its default system prompt and every stop token."
        if translation.exact
        else f"The Modelfile carries **no TEMPLATE**: {translation.reason}. Ollama then guesses a template "
        "from the GGUF; check its prompts before relying on it."
    )
    return [
        "## Ollama",
        "",
        status,
        "",
        "```sh",
        f"ollama create {name} -f {modelfile}",
        f"ollama run {name}",
        "```",
        "",
    ]


def deploy_notes(facts: ChatFacts, modelfile: Path, merged: Path | None, name: str, translation: Translation) -> str:
    """Markdown with one section per runtime, each naming the file it serves."""
    gguf = facts.path
    ctx = facts.context_length or 4096
    lines = [
        f"# Deploying {name}",
        "",
        f"File: `{gguf}` ({gguf.stat().st_size / 2**20:.1f} MiB, architecture {facts.architecture}, "
        f"context {facts.context_length or 'unknown'}). Every server below binds to {HOST}; choose "
        "another host only behind an API key or a proxy.",
        "",
        "## llama.cpp server (OpenAI-compatible, the file's own chat template)",
        "",
        "One slot and no prompt cache make every answer independent of the requests before it; raise "
        "`--parallel` and drop `--no-cache-prompt` for throughput.",
        "",
        "```sh",
        f"lora2gguf serve {gguf} --port 8080            # llama-server --jinja when built, else llama-cpp-python",
        f"llama-server -m {gguf} --jinja --host {HOST} --port 8080 -c {ctx} --parallel 1 --no-cache-prompt",
        f"curl http://{HOST}:8080/v1/chat/completions -H 'Content-Type: application/json' \\",
        "  -d '{\"messages\": [{\"role\": \"user\", \"content\": \"你好\"}]}'",
        "```",
        "",
        "## llama.cpp on an edge device (interactive chat in a terminal)",
        "",
        "```sh",
        f"llama-cli -m {gguf} --jinja -cnv -c {ctx}",
        "```",
        "",
        *_ollama_section(modelfile, name, translation),
        "## LM Studio",
        "",
        "LM Studio reads the chat template embedded in the GGUF.",
        "",
        "```sh",
        f"lms import {gguf}",
        "```",
        "",
    ]
    if merged is not None:
        lines += [
            "## vLLM (the merged Hugging Face folder; not run by lora2gguf)",
            "",
            "```sh",
            f"vllm serve {merged} --served-model-name {name} --host {HOST} --port 8000",
            "```",
            "",
        ]
    return "\n".join(lines)
