"""A model's Jinja chat template, rendered as transformers renders it and translated to Ollama's Go
template when, and only when, the translation renders exactly the same prompts.

Recognition never looks at the template's text or name: probe conversations whose contents are
sentinels are rendered, the literal pieces between the sentinels are fitted into a ChatShape (start,
per-role prefix and suffix, generation prompt, where a system message goes, default system prompt),
and every candidate shape is checked on a battery of conversations against the Jinja rendering, with
the conversation fed the way Ollama feeds its TEMPLATE (Modelfile SYSTEM inserted when the first
message is not a system message, consecutive messages of one role collated; see ollama_render.go).
A template the shape cannot reproduce exactly gets no Go template, and the reason says where.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox

from lora2gguf.errors import Lora2ggufError

logger = logging.getLogger(__name__)

Messages = Sequence[dict[str, Any]]

# --- Jinja, as transformers' apply_chat_template renders it --------------------------------------------


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks assistant text with it (for its
    assistant-token masks); rendering keeps the body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore-prefixed attributes, as transformers' sandbox does."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (Jinja's own signature trick)
        self, values = args[0], dict(*args[1:], **kwargs)
        for name in values:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, values)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r}: underscore names are refused")


class _DictBuilder:
    """The `dict` global: builds dicts, exposes nothing of the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any) -> dict:
        return dict.fromkeys(*args)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers replaces Jinja's tojson, which HTML-escapes, with plain json.dumps
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_DictBuilder(),
                       namespace=_Namespace)
    return env.from_string(template)


def _roles(messages: Messages) -> str:
    return ", ".join(str(m.get("role")) for m in messages) or "no messages"


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def render_jinja(template: str, messages: Messages, *, add_generation_prompt: bool, bos_token: str | None,
                 eos_token: str | None, source: str = "chat template", continue_final_message: bool = False) -> str:
    """The text transformers' apply_chat_template(tokenize=False) renders: same sandbox, options,
    filters and globals; `tools`/`documents` are None; BOS/EOS given only when the tokenizer has them
    (an empty string means none). continue_final_message leaves the final message open, as
    transformers does. Any template failure -> Lora2ggufError naming ``source``."""
    if add_generation_prompt and continue_final_message:
        raise ValueError("add_generation_prompt and continue_final_message exclude each other")
    try:
        compiled = _compile(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise Lora2ggufError(f"{source}: the chat template does not parse (line {exc.lineno}): {exc.message}") from exc
    # transformers drops None-valued keys so that templates see a missing key, not "None"
    chat = [{key: value for key, value in m.items() if value is not None} for m in messages]
    if continue_final_message:
        if not chat or not isinstance(chat[-1].get("content"), str):
            raise ValueError("continue_final_message needs a final message with string content")
        chat[-1]["content"] += _CONTINUE_TAG
    context: dict[str, Any] = {"messages": chat, "tools": None, "documents": None,
                               "add_generation_prompt": add_generation_prompt}
    context.update({k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v})
    try:
        text = compiled.render(**context)
    except Exception as exc:  # the template is foreign code: any failure is the template's
        raise Lora2ggufError(f"{source}: the chat template fails on a conversation ({_roles(messages)}): "
                             f"{type(exc).__name__}: {exc}") from exc
    return _cut_continued(text, messages, source) if continue_final_message else text


def _cut_continued(text: str, messages: Messages, source: str) -> str:
    """Cut the rendering right after the final message's content, as transformers does."""
    final = str(messages[-1]["content"])
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in text or tag not in text:
        raise Lora2ggufError(f"{source}: the chat template drops part of the final message, so it cannot be "
                             f"continued ({_roles(messages)})")
    at = text.rindex(tag)
    return text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()


# --- the shape of a chat template and its Ollama rendering ----------------------------------------------

@dataclass(frozen=True)
class ChatShape:
    """The literal pieces a chat template renders around message contents.

    A system message renders as system_prefix + content + system_suffix: as its own turn
    (placement "turn"), or folded into a user turn right after user_prefix: the first user message
    ("first_user"), the last one ("last_user") or the final message of the conversation when it is a
    user message, dropped otherwise ("final_user"). After a final user message comes
    generation_prompt; a final assistant message stays open (Ollama's prefill convention).
    """

    start: str  # what the TEMPLATE renders first (without runner_bos)
    runner_bos: str  # BOS text the Jinja template starts with that Ollama's runner adds instead ("" if none)
    system_prefix: str
    system_suffix: str
    system_placement: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation_prompt: str
    default_system: str | None  # rendered when the conversation has no system message
    end_of_turn: str  # the marker closing an assistant turn ("" when the template has none)


@dataclass(frozen=True)
class Translation:
    exact: bool
    shape: ChatShape | None
    go_template: str | None
    reason: str | None  # why not exact: which conversation, and the first differing character
    conversations_checked: int
    family: str  # descriptive only, derived from the shape; never used to decide


def ollama_messages(messages: Messages, system: str | None) -> list[dict[str, str]]:
    """The messages Ollama's TEMPLATE sees for a /api/chat request (server/routes.go ChatHandler,
    template/template.go collate): the Modelfile SYSTEM first unless the first message is a system
    message, consecutive messages of one role (except tool) joined by a blank line."""
    msgs = [{"role": str(m["role"]), "content": str(m.get("content") or "")} for m in messages]
    if msgs and msgs[0]["role"] != "system" and system:
        msgs.insert(0, {"role": "system", "content": system})
    collated: list[dict[str, str]] = []
    for m in msgs:
        if collated and collated[-1]["role"] == m["role"] and m["role"] != "tool":
            collated[-1]["content"] += "\n\n" + m["content"]
        else:
            collated.append(dict(m))
    return collated


def render_shape(shape: ChatShape, messages: Messages) -> str:
    """What go_template(shape) renders for messages already prepared by ollama_messages (Python
    twin of the Go template; tests run both)."""
    folded = shape.system_placement != "turn"
    pending = folded and bool(messages) and messages[0]["role"] == "system"
    system = messages[0]["content"] if pending else ""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    out = [shape.start]
    for i, m in enumerate(messages):
        last = i == len(messages) - 1
        if m["role"] == "system" and not folded:
            out += [shape.system_prefix, m["content"], shape.system_suffix]
        elif m["role"] == "user":
            out.append(shape.user_prefix)
            if pending and _folds_here(shape.system_placement, i == last_user, last):
                out += [shape.system_prefix, system, shape.system_suffix]
                pending = shape.system_placement != "first_user"
            out += [m["content"], shape.user_suffix, shape.generation_prompt if last else ""]
        elif m["role"] == "assistant":
            out += [shape.assistant_prefix, m["content"], "" if last else shape.assistant_suffix]
    return "".join(out)


def _folds_here(placement: str, is_last_user: bool, is_final: bool) -> bool:
    return {"first_user": True, "last_user": is_last_user, "final_user": is_final}[placement]


# --- the Go template ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Action:
    code: str  # the inside of a {{ ... }} action


def _go_literal(text: str) -> str | _Action:
    """Template text, or a Go string constant where raw text would not survive: "{{" would open an
    action, and Ollama's Modelfile parser drops non-printable runes and ends a value at \"\"\"."""
    risky = "{{" in text or '"""' in text or any(not c.isprintable() and c not in "\n\r\t" for c in text)
    return _Action(_go_string(text)) if risky else text


def _go_string(text: str) -> str:
    """A Go interpreted string literal of text, with only printable runes raw."""
    escapes = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
    out = []
    for c in text:
        if c in escapes:
            out.append(escapes[c])
        elif c.isprintable():
            out.append(c)
        else:
            out.append(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}")
    return '"' + "".join(out) + '"'


def _template_text(parts: Sequence[str | _Action]) -> str:
    """Join literals and actions. An action after an action goes on a new line with `{{-` (which
    trims only that formatting newline); an action after a literal never trims, so the literal's own
    whitespace stays."""
    merged: list[str | _Action] = []
    for part in parts:
        if isinstance(part, str) and merged and isinstance(merged[-1], str):
            merged[-1] += part
        elif part != "":
            merged.append(part)
    out: list[str] = []
    after_action = True
    for part in (_go_literal(p) if isinstance(p, str) else p for p in merged):
        if isinstance(part, _Action):
            out.append(("\n{{- " if out else "{{- ") + part.code + " }}" if after_action else "{{ " + part.code + " }}")
            after_action = True
        else:
            out.append(part)
            after_action = False
    return "".join(out)


def _fold_condition(placement: str) -> str:
    return {"first_user": "$system", "last_user": "and $system (eq $i $lastUser)",
            "final_user": "and $system $last"}[placement]


def go_template(shape: ChatShape) -> str:
    """An Ollama messages-style TEMPLATE (Go text/template, builtins only) rendering ``shape``."""
    folded = shape.system_placement != "turn"
    parts: list[str | _Action] = [shape.start]
    if folded:
        parts += [_Action('$system := false'), _Action('$systemText := ""'),
                  # nested, not `and`: before Go 1.18 `and` evaluated every argument (index of an empty list)
                  _Action("if .Messages"), _Action('if eq (index .Messages 0).Role "system"'),
                  _Action("$system = true"), _Action("$systemText = (index .Messages 0).Content"),
                  _Action("end"), _Action("end")]
    if shape.system_placement == "last_user":
        parts += [_Action("$lastUser := -1"), _Action("range $i, $m := .Messages"),
                  _Action('if eq $m.Role "user"'), _Action("$lastUser = $i"), _Action("end"), _Action("end")]
    parts += [_Action("range $i, $m := .Messages"), _Action("$last := eq (len (slice $.Messages $i)) 1")]
    if not folded:
        parts += [_Action('if eq $m.Role "system"'), shape.system_prefix, _Action("$m.Content"), shape.system_suffix]
        parts.append(_Action('else if eq $m.Role "user"'))
    else:
        parts.append(_Action('if eq $m.Role "user"'))
    parts.append(shape.user_prefix)
    if folded:
        parts += [_Action(f"if {_fold_condition(shape.system_placement)}"), shape.system_prefix,
                  _Action("$systemText"), shape.system_suffix]
        if shape.system_placement == "first_user":
            parts.append(_Action("$system = false"))
        parts.append(_Action("end"))
    parts += [_Action("$m.Content"), shape.user_suffix]
    if shape.generation_prompt:
        parts += [_Action("if $last"), shape.generation_prompt, _Action("end")]
    parts += [_Action('else if eq $m.Role "assistant"'), shape.assistant_prefix, _Action("$m.Content")]
    if shape.assistant_suffix:
        parts += [_Action("if not $last"), shape.assistant_suffix, _Action("end")]
    parts += [_Action("end"), _Action("end")]
    return _template_text(parts)


def family_of(shape: ChatShape) -> str:
    """A descriptive label for reports (never used to decide anything)."""
    text = shape.user_prefix + shape.assistant_prefix + shape.user_suffix
    for marker, name in (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"),
                         ("<start_of_turn>", "gemma"), ("<|user|>", "phi3"), ("[INST]", "mistral")):
        if marker in text:
            return f"{name}-like"
    return "other"


# --- recognising the shape: probe conversations with sentinel contents ---------------------------------

_SYSTEM, _USER1, _ASSISTANT1, _USER2 = "zqSYSTEMqz", "zqUSER1qz", "zqASSISTANT1qz", "zqUSER2qz"
_SENTINEL_ROLES = {_SYSTEM: "system", _USER1: "first user", _ASSISTANT1: "assistant", _USER2: "second user"}


def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


class _NotExact(Exception):
    """Why no shape reproduces the template (becomes Translation.reason)."""


@dataclass(frozen=True)
class _Jinja:
    template: str
    bos: str
    eos: str
    add_bos: bool
    source: str

    @property
    def runner_bos(self) -> str:
        return self.bos if self.add_bos else ""

    def render(self, messages: Messages, mode: str, name: str, required: bool = False) -> str:
        """The prompt Ollama must reproduce: the Jinja text without the BOS the runner adds.
        mode: "generate" (generation prompt), "close" (none), "continue" (final message left open)."""
        try:
            text = render_jinja(self.template, messages, add_generation_prompt=mode == "generate",
                                continue_final_message=mode == "continue", bos_token=self.bos,
                                eos_token=self.eos, source=self.source)
        except Lora2ggufError as exc:
            if required:
                raise
            cause = exc.__cause__
            what = str(exc).removeprefix(f"{self.source}: ") if cause is None else f"{type(cause).__name__}: {cause}"
            raise _NotExact(f"{self.source}: the template fails on conversation '{name}': {what}") from exc
        if not self.runner_bos:
            return text
        if not text.startswith(self.runner_bos):
            raise _NotExact(
                f"conversation '{name}': the GGUF adds BOS {self.runner_bos!r} itself (tokenizer.ggml.add_bos_token) "
                f"but the template's prompt does not start with it, so Ollama's prompt would carry a BOS that "
                f"the template does not render")
        return text[len(self.runner_bos):]


def _pieces(text: str, sentinels: Sequence[str], name: str) -> list[str] | None:
    """The text around the sentinels, [before, between..., after]; None when they are not in this order."""
    for sentinel in sentinels:
        if (count := text.count(sentinel)) != 1:
            raise _NotExact(f"probe conversation '{name}': the {_SENTINEL_ROLES[sentinel]} message's content is "
                            f"rendered {count} times verbatim, not once (the template changes, drops or repeats "
                            f"message content)")
    positions = [text.index(s) for s in sentinels]
    if positions != sorted(positions):
        return None
    pieces, at = [], 0
    for sentinel, position in zip(sentinels, positions):
        pieces.append(text[at:position])
        at = position + len(sentinel)
    return [*pieces, text[at:]]


def _in_order(text: str, sentinels: Sequence[str], name: str) -> list[str]:
    pieces = _pieces(text, sentinels, name)
    if pieces is None:
        raise _NotExact(f"probe conversation '{name}': the messages are not rendered in conversation order")
    return pieces


@dataclass(frozen=True)
class _Probes:
    pre: str  # before the only user message of a conversation without system message
    tail_user: str  # after a final user message, generation prompt added
    tail_user_closed: str  # after a final user message, no generation prompt
    user_to_assistant: str
    assistant_to_user: str
    tail_assistant_closed: str  # after a final assistant message, closed
    system_first: tuple[str, str] | None  # [system, user]: before the system, system to user; None: not before
    system_later: tuple[str, str] | None  # [system, user, assistant, user] with the system in the second user
    # turn: assistant to system, system to user; None when it is not there


def _probe(j: _Jinja) -> _Probes:
    one, closed = [_msg("user", _USER1)], [_msg("user", _USER1), _msg("assistant", _ASSISTANT1)]
    two = [*closed, _msg("user", _USER2)]
    pre, tail_user = _in_order(j.render(one, "generate", "user", required=True), [_USER1], "user")
    tail_user_closed = _in_order(j.render(one, "close", "user"), [_USER1], "user")[1]
    pre2, user_to_assistant, assistant_to_user, tail2 = _in_order(
        j.render(two, "generate", "user, assistant, user"), [_USER1, _ASSISTANT1, _USER2], "user, assistant, user")
    if (pre2, tail2) != (pre, tail_user):
        raise _NotExact("probe conversations 'user' and 'user, assistant, user': the text before the first user "
                        "message or after the last one differs with the number of turns")
    tail_assistant_closed = _in_order(j.render(closed, "close", "user, assistant"),
                                      [_USER1, _ASSISTANT1], "user, assistant")[2]
    name = "system, user"
    first = _pieces(j.render([_msg("system", _SYSTEM), *one], "generate", name), [_SYSTEM, _USER1], name)
    name = "system, user, assistant, user"
    later = _pieces(j.render([_msg("system", _SYSTEM), *two], "generate", name),
                    [_USER1, _ASSISTANT1, _SYSTEM, _USER2], name)
    return _Probes(pre, tail_user, tail_user_closed, user_to_assistant, assistant_to_user, tail_assistant_closed,
                   None if first is None else (first[0], first[1]), None if later is None else (later[2], later[3]))


def _common_prefix(*texts: str) -> str:
    return os.path.commonprefix(list(texts))


def _common_suffix(*texts: str) -> str:
    return os.path.commonprefix([t[::-1] for t in texts])[::-1]


def _snap_end(text: str) -> str:
    """Do not end inside a bracketed token ("<|end|>\\n<|" -> "<|end|>\\n"): only the names of the
    pieces depend on it (every split renders the same), so prefer whole tokens."""
    opening, closing = max(text.rfind("<"), text.rfind("[")), max(text.rfind(">"), text.rfind("]"))
    return text[:opening] if opening > closing else text


def _snap_start(text: str) -> str:
    """Do not start inside a bracketed token ("s>[INST] " -> "[INST] ")."""
    closings = [i for i in (text.find(">"), text.find("]")) if i >= 0]
    openings = [i for i in (text.find("<"), text.find("[")) if i >= 0]
    if closings and min(closings) < min(openings, default=len(text)):
        return text[min(closings) + 1:]
    return text


def _strip_end(text: str, tail: str) -> str | None:
    return text[:len(text) - len(tail)] if text.endswith(tail) else None


def _middle(text: str, head: str, tail: str) -> str | None:
    """text == head + middle + tail -> middle (None when it is not)."""
    if len(text) >= len(head) + len(tail) and text.startswith(head) and text.endswith(tail):
        return text[len(head):len(text) - len(tail)]
    return None


def _assistant_user_splits(p: _Probes) -> list[tuple[str, str]]:
    """Ways to split the text between an assistant and the next user message into the assistant's
    suffix and the user's prefix: what a closed final assistant turn ends with, or what the first
    user turn starts with."""
    joint = p.assistant_to_user
    suffix = _snap_end(_common_prefix(joint, p.tail_assistant_closed))
    prefix = _snap_start(_common_suffix(joint, p.pre))
    return list(dict.fromkeys([(suffix, joint[len(suffix):]), (joint[:len(joint) - len(prefix)], prefix)]))


def _candidates(p: _Probes, bos: str) -> list[ChatShape]:
    user_suffix = _snap_end(_common_prefix(p.user_to_assistant, p.tail_user, p.tail_user_closed))
    shapes: list[ChatShape] = []
    for assistant_suffix, user_prefix in _assistant_user_splits(p):
        pieces = dict(user_prefix=user_prefix, user_suffix=user_suffix, runner_bos="",
                      assistant_prefix=p.user_to_assistant[len(user_suffix):], assistant_suffix=assistant_suffix,
                      generation_prompt=p.tail_user[len(user_suffix):], end_of_turn=assistant_suffix.strip())
        shapes += _turn_shapes(p, pieces, bos) + _folded_shapes(p, pieces)
    return list(dict.fromkeys(shapes))


def _turn_shapes(p: _Probes, pieces: dict[str, Any], bos: str) -> list[ChatShape]:
    """System message as its own turn: [system, user] renders start + system_prefix, the system,
    system_suffix + user_prefix; a default system prompt renders the same way without one."""
    user_prefix = pieces["user_prefix"]
    start_and_default = _strip_end(p.pre, user_prefix)
    if p.system_first is None or start_and_default is None:
        return []
    before, between = p.system_first
    system_suffix = _strip_end(between, user_prefix)
    if system_suffix is None:
        return []
    turn = dict(pieces, system_suffix=system_suffix, system_placement="turn")
    shapes = []
    if before.startswith(start_and_default):
        shapes.append(ChatShape(start=start_and_default, system_prefix=before[len(start_and_default):],
                                default_system=None, **turn))
    default = _middle(start_and_default, before, system_suffix)
    if default:  # Ollama inserts no empty SYSTEM, so an empty default cannot be reproduced
        # A BOS text at the start is either the start or the system turn's opener: SmolLM2's BOS is
        # <|im_start|>, which opens every turn. Both are tried; the battery keeps the one that renders.
        starts = [bos, ""] if bos and before.startswith(bos) else [""]
        shapes += [ChatShape(start=start, system_prefix=before[len(start):], default_system=default, **turn)
                   for start in starts]
    return shapes


def _folded_shapes(p: _Probes, pieces: dict[str, Any]) -> list[ChatShape]:
    """System folded into a user turn: user_prefix + system_prefix + system + system_suffix + content."""
    user_prefix = pieces["user_prefix"]
    start = _strip_end(p.pre, user_prefix)
    shapes = []
    if p.system_first is not None:
        before, between = p.system_first
        folded = dict(pieces, system_suffix=between, system_placement="first_user")
        if start is not None and before.startswith(start + user_prefix):
            shapes.append(ChatShape(start=start, system_prefix=before[len(start + user_prefix):],
                                    default_system=None, **folded))
        default, at = _middle(p.pre, before, between), before.find(user_prefix)
        if default and at >= 0:
            shapes.append(ChatShape(start=before[:at], system_prefix=before[at + len(user_prefix):],
                                    default_system=default, **folded))
    if p.system_later is not None and start is not None and p.system_later[0].startswith(p.assistant_to_user):
        system_prefix = p.system_later[0][len(p.assistant_to_user):]
        for placement in ("last_user", "final_user"):
            shapes.append(ChatShape(start=start, system_prefix=system_prefix, system_suffix=p.system_later[1],
                                    system_placement=placement, default_system=None, **pieces))
    return shapes


# --- verification: the battery of conversations --------------------------------------------------------


@dataclass(frozen=True)
class BatteryCase:
    name: str
    messages: tuple[dict[str, str], ...]
    mode: str  # "generate": ends with a user message; "continue": an assistant message left open
    optional: bool = False  # checked only when the template accepts the conversation


def _case(name: str, *turns: tuple[str, str], mode: str = "generate", optional: bool = False) -> BatteryCase:
    return BatteryCase(name, tuple(_msg(role, content) for role, content in turns), mode, optional)


_S, _U, _A = "system", "user", "assistant"
# After an optional system message every conversation alternates user/assistant, as chat templates
# require; so Ollama's collation changes none of them. A system message later in the conversation is
# optional: many templates refuse it, and a refusal leaves nothing to compare with.
BATTERY: tuple[BatteryCase, ...] = (
    _case("one user message", (_U, "Hello! Who are you?")),
    _case("system and user", (_S, "You answer in one sentence."), (_U, "Name a colour.")),
    _case("two turns", (_U, "Hi"), (_A, "Hello, how can I help?"), (_U, "Tell me a joke.")),
    _case("system and two turns", (_S, "Be brief."), (_U, "Hi"), (_A, "Hello."), (_U, "Bye")),
    _case("system and three turns", (_S, "Be kind."), (_U, "one"), (_A, "two"), (_U, "three"), (_A, "four"),
          (_U, "five")),
    _case("unicode", (_S, "Réponds en français 🇫🇷 — «merci»"), (_U, "日本語で答えて: ¿qué tal? Ω≈ç√")),
    _case("newlines in contents", (_U, "line one\nline two\n\n- item\n- item"), (_A, "```python\nprint(1)\n```"),
          (_U, "and a\r\nCRLF?")),
    _case("surrounding whitespace", (_S, "  padded system \n"), (_U, "\n  hi there  \n"), (_A, " leading space"),
          (_U, "trailing space ")),
    _case("template syntax in contents", (_U, "{{ .Content }} {% if x %}{{ x }}{% endif %} {{- end }}"),
          (_A, "{#- #} $last .System"), (_U, '"""quoted"""')),
    _case("empty system message", (_S, ""), (_U, "hi")),
    _case("empty assistant reply", (_U, "hi"), (_A, ""), (_U, "still there?")),
    _case("continue an assistant reply", (_U, "Count to three."), (_A, "One, two,"), mode="continue"),
    _case("continue with system and history", (_S, "Count slowly."), (_U, "Count to two."), (_A, "One, two."),
          (_U, "Again."), (_A, "One,"), mode="continue"),
    _case("system message mid-conversation", (_U, "Hi"), (_A, "Hello."), (_S, "Now answer in French."),
          (_U, "Bye"), optional=True),
)

_Expected = list[tuple[BatteryCase, str | _NotExact]]


def _expected(j: _Jinja) -> _Expected:
    """The Jinja prompt of every battery conversation (or why there is none); optional conversations
    the template refuses are left out."""
    expected: _Expected = []
    for case in BATTERY:
        try:
            expected.append((case, j.render(case.messages, case.mode, case.name)))
        except _NotExact as exc:
            if not case.optional:
                expected.append((case, exc))
    return expected


def _check(shape: ChatShape, expected: _Expected) -> tuple[int, str | None]:
    """(conversations that render identically before the first that does not, why it does not)."""
    for done, (case, want) in enumerate(expected):
        if isinstance(want, _NotExact):
            return done, str(want)
        got = render_shape(shape, ollama_messages(case.messages, shape.default_system))
        if got != want:
            where = f"conversation '{case.name}' ({done + 1} of {len(expected)})"
            return done, _difference(where, want, got, case.messages)
    return len(expected), None


def _difference(where: str, want: str, got: str, messages: Messages) -> str:
    at = len(_common_prefix(want, got))
    reason = (f"{where}: the Jinja template and the Ollama TEMPLATE differ at character {at}: Jinja renders "
              f"{want[max(0, at - 20):at + 30]!r}, the TEMPLATE {got[max(0, at - 20):at + 30]!r}")
    changed = [m["content"] for m in messages if m["content"] and m["content"] not in want]
    if changed:
        reason += (f"; the template does not render message content verbatim (e.g. {changed[0]!r}: trimmed, dropped "
                   f"or otherwise changed), which Ollama's TEMPLATE cannot do")
    return reason


def translate(template: str, *, bos_token: str | None, eos_token: str | None, add_bos: bool,
              source: str = "chat template") -> Translation:
    """Recognise the template's shape from what it renders and translate it to Ollama's TEMPLATE;
    exact only when every battery conversation renders identically (BOS left to the runner when the
    GGUF adds it). A template that cannot render a single user turn -> Lora2ggufError."""
    j = _Jinja(template, bos_token or "", eos_token or "", add_bos, source)
    try:
        shapes = _candidates(_probe(j), j.bos)
    except _NotExact as exc:
        return _not_exact(str(exc), 0, "unrecognised")
    if not shapes:
        return _not_exact("the probe conversations fit no supported shape (system message as its own turn or "
                          "folded into the first, last or final user turn)", 0, "unrecognised")
    expected = _expected(j)
    best: tuple[int, str, ChatShape] | None = None
    for shape in shapes:
        checked, reason = _check(shape, expected)
        if reason is None:
            shape = replace(shape, runner_bos=j.runner_bos)
            return Translation(exact=True, shape=shape, go_template=go_template(shape), reason=None,
                               conversations_checked=checked, family=family_of(shape))
        if best is None or checked > best[0]:
            best = (checked, reason, shape)
    assert best is not None
    return _not_exact(best[1], best[0], family_of(best[2]))


def _not_exact(reason: str, checked: int, family: str) -> Translation:
    return Translation(exact=False, shape=None, go_template=None, reason=reason, conversations_checked=checked,
                       family=family)


# --- Ollama's template execution, for real: Go --------------------------------------------------------

_GO_SOURCE = "lora2gguf/deploy/ollama_render.go"


def _go_env(workdir: Path) -> dict[str, str]:
    """Build offline with the local toolchain; give Go a cache where CI leaves HOME unset."""
    env = dict(os.environ, CGO_ENABLED="0", GOTOOLCHAIN="local", GOPROXY="off", GOFLAGS="", GOWORK="off")
    if not env.get("HOME"):
        env.setdefault("GOCACHE", str(workdir / "gocache"))
        env.setdefault("GOPATH", str(workdir / "gopath"))
    return env


def _build_renderer() -> Path:
    missing = GoRenderer.available()
    if missing is not None:
        raise Lora2ggufError(f"{_GO_SOURCE}: {missing}")
    workdir = Path(tempfile.mkdtemp(prefix="lora2gguf-ollama-render-"))
    atexit.register(shutil.rmtree, workdir, True)
    source = resources.files("lora2gguf.deploy").joinpath("ollama_render.go").read_text(encoding="utf-8")
    # built from a copy in its own folder: no go.mod or go.work of the surroundings applies
    (workdir / "main.go").write_text(source, encoding="utf-8")
    binary = workdir / "ollama_render"
    try:
        proc = subprocess.run(["go", "build", "-o", str(binary), "main.go"], cwd=workdir, env=_go_env(workdir),
                              capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Lora2ggufError(f"{_GO_SOURCE}: go build failed: {exc}") from exc
    if proc.returncode != 0:
        raise Lora2ggufError(f"{_GO_SOURCE}: go build failed: {(proc.stderr or proc.stdout).strip()[-2000:]}")
    logger.debug("built %s into %s", _GO_SOURCE, binary)
    return binary


class GoRenderer:
    """Renders an Ollama TEMPLATE with Go's text/template and the data Ollama's /api/chat gives it
    (ollama_render.go, built once per process into a temporary folder)."""

    _binary: Path | None = None
    _lock = threading.Lock()

    @staticmethod
    def available() -> str | None:
        """None when Go is there, else why the TEMPLATE cannot be rendered."""
        if shutil.which("go") is None:
            return "Go is not installed (no `go` on PATH; Debian: apt-get install golang-go)"
        return None

    def __init__(self) -> None:
        with GoRenderer._lock:
            if GoRenderer._binary is None or not GoRenderer._binary.exists():
                GoRenderer._binary = _build_renderer()
            self.binary = GoRenderer._binary

    def render(self, template: str, messages: Messages, system: str | None = None) -> str:
        """The prompt Ollama renders for this /api/chat conversation with this TEMPLATE and SYSTEM."""
        request = {"template": template, "system": system,
                   "messages": [{"role": m["role"], "content": m.get("content") or ""} for m in messages]}
        try:
            proc = subprocess.run([str(self.binary)], input=json.dumps(request).encode("utf-8"),
                                  capture_output=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise Lora2ggufError(f"{self.binary}: cannot run Ollama's template renderer: {exc}") from exc
        if proc.returncode != 0:
            message = proc.stderr.decode("utf-8", errors="replace").strip()
            raise Lora2ggufError(f"Ollama TEMPLATE: Go's text/template refuses it: {message}")
        return proc.stdout.decode("utf-8")
