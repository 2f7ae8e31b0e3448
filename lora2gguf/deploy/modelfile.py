"""The Ollama Modelfile of a GGUF and the deploy notes: the file's chat template as a Go template,
every stop token, the default system prompt and the context size.

The Jinja template is translated only when the translation renders exactly what the template renders
(template.translate checks it on a battery of conversations); otherwise the Modelfile carries no
TEMPLATE, the report and the log say why, and no parity is claimed for Ollama.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora2gguf.artifacts import Output, atomic_file, check_paths, read_text, sha256_file, write_json
from lora2gguf.deploy.chat_facts import ChatFacts, generation_eos_ids, read_chat_facts
from lora2gguf.deploy.notes import deploy_notes
from lora2gguf.deploy.template import Translation, translate
from lora2gguf.errors import Lora2ggufError
from lora2gguf.provenance import build_report

logger = logging.getLogger(__name__)


@dataclass
class DeployOptions:
    gguf: Path  # the file to deploy (e.g. model-q4_km.gguf)
    modelfile: Path
    notes: Path | None = None  # deploy.md
    report: Path | None = None  # deploy.json
    merged: Path | None = None  # the merged Hugging Face folder: generation_config.json, the vLLM command
    chat_template: Path | None = None  # a Jinja file to carry instead of the GGUF's own template
    name: str = "model"  # the model name in the commands (ollama create <name>)


@dataclass
class StopToken:
    text: str
    sources: list[str] = field(default_factory=list)


def stop_tokens(facts: ChatFacts, merged: Path | None, translation: Translation) -> list[StopToken]:
    """Every string that ends a reply: the GGUF's EOS and EOT, generation_config.json's eos ids and
    the template's end-of-turn marker, each with where it came from."""
    found: dict[str, StopToken] = {}

    def add(text: str, source: str) -> None:
        if text:
            found.setdefault(text, StopToken(text)).sources.append(source)

    add(facts.token(facts.eos_id), "tokenizer.ggml.eos_token_id")
    add(facts.token(facts.eot_id), "tokenizer.ggml.eot_token_id")
    for token_id in generation_eos_ids(merged):
        add(facts.token(token_id), "generation_config.json eos_token_id")
    if translation.shape is not None:
        add(translation.shape.end_of_turn.strip(), "chat template end of turn")
    return list(found.values())


def _translation(facts: ChatFacts, template: str | None, source: str) -> Translation:
    if template is None:
        return Translation(exact=False, shape=None, go_template=None, family="none",
                           reason=f"{facts.path}: no chat template ({'tokenizer.chat_template'} missing)",
                           conversations_checked=0)
    return translate(template, bos_token=facts.token(facts.bos_id), eos_token=facts.token(facts.eos_id),
                     add_bos=facts.add_bos, source=source)


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise Lora2ggufError(f'{what}: contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile_text(gguf_name: str, translation: Translation, stops: list[StopToken], num_ctx: int | None) -> str:
    lines = [
        "# Ollama Modelfile written by lora2gguf deploy: ollama create <name> -f Modelfile",
        f"FROM ./{gguf_name}",
    ]
    if translation.exact and translation.go_template is not None:
        lines.append(f"TEMPLATE {_quoted(translation.go_template, 'the translated template')}")
        system = translation.shape.default_system if translation.shape else None
        if system:
            lines.append(f"SYSTEM {_quoted(system, 'the default system prompt')}")
    else:
        lines.append(f"# no TEMPLATE: {translation.reason}")
    lines += [f"PARAMETER stop {_parameter_value(stop.text)}" for stop in stops]
    if num_ctx:
        lines.append(f"PARAMETER num_ctx {num_ctx}")
    return "\n".join(lines) + "\n"


def _parameter_value(text: str) -> str:
    # a quoted Modelfile value in JSON string syntax: Ollama's parser reads the same escapes, and
    # read_modelfile reads it back
    return json.dumps(text, ensure_ascii=False)


def _check(options: DeployOptions) -> None:
    check_paths(
        [("GGUF", options.gguf), ("--merged", options.merged), ("--chat-template", options.chat_template)],
        [Output("--modelfile", options.modelfile), Output("--notes", options.notes), Output("--report", options.report)],
    )


def _carried_template(options: DeployOptions, facts: ChatFacts) -> tuple[str | None, str]:
    """The template the Modelfile carries and where it comes from: --chat-template wins over the GGUF's."""
    if options.chat_template is None:
        return facts.template, f"{facts.path} ({'tokenizer.chat_template'})"
    return read_text(options.chat_template, "chat template"), str(options.chat_template)


def _report(options: DeployOptions, facts: ChatFacts, source: str, translation: Translation,
            stops: list[StopToken], modelfile_sha: str) -> dict[str, Any]:
    shape = translation.shape
    return build_report("deploy", {
        "model": options.name,
        "gguf": {"path": str(options.gguf), "sha256": sha256_file(options.gguf), "architecture": facts.architecture,
                 "context_length": facts.context_length, "add_bos_token": facts.add_bos},
        "template_source": source,
        "template": {
            "translated": translation.exact,
            "family": translation.family,
            "conversations_checked": translation.conversations_checked,
            "reason": translation.reason,
            "default_system": shape.default_system if shape else None,
            "end_of_turn": shape.end_of_turn if shape else None,
        },
        "stop": [{"text": stop.text, "sources": stop.sources} for stop in stops],
        "modelfile": {"path": str(options.modelfile), "sha256": modelfile_sha,
                      "has_template": translation.exact, "num_ctx": facts.context_length},
        "notes": str(options.notes) if options.notes else None,
    })


def deploy(options: DeployOptions) -> dict[str, Any]:
    """Write the Modelfile (next to the GGUF it names), deploy.md and deploy.json."""
    _check(options)
    facts = read_chat_facts(options.gguf)
    template, source = _carried_template(options, facts)
    translation = _translation(facts, template, source)
    if not translation.exact:
        logger.warning("%s: the chat template is not translated for Ollama: %s", source, translation.reason)
    stops = stop_tokens(facts, options.merged, translation)
    relative = os.path.relpath(options.gguf, options.modelfile.parent)
    text = modelfile_text(relative, translation, stops, facts.context_length)
    with atomic_file(options.modelfile) as temp:
        temp.write_text(text, encoding="utf-8")
    if options.notes is not None:
        with atomic_file(options.notes) as temp:
            temp.write_text(deploy_notes(facts, options.modelfile, options.merged, options.name, translation),
                            encoding="utf-8")
    report = _report(options, facts, source, translation, stops, sha256_file(options.modelfile))
    if options.report is not None:
        write_json(options.report, report)
    logger.info("wrote %s (template %s, %d stop strings)", options.modelfile,
                "translated" if translation.exact else "not translated", len(stops))
    return report


@dataclass
class ModelfileContent:
    template: str | None
    system: str | None
    stops: list[str]


def read_modelfile(path: Path) -> ModelfileContent:
    """TEMPLATE, SYSTEM and the stop strings of a Modelfile as written by modelfile_text."""
    text = read_text(path, "Modelfile")
    blocks = dict(re.findall(r'^(TEMPLATE|SYSTEM) """(.*?)"""$', text, flags=re.MULTILINE | re.DOTALL))
    stops = [json.loads(value) for value in re.findall(r'^PARAMETER stop (".*")$', text, flags=re.MULTILINE)]
    return ModelfileContent(blocks.get("TEMPLATE"), blocks.get("SYSTEM"), stops)
