"""Chat template translation for Ollama (lora2gguf.deploy.template).

The family templates below are written here for the test: each renders its family's prompt format
(ChatML with and without a default system prompt, Llama 3, Phi-3, Gemma, Mistral [INST] with the
system folded into the first or the final user turn). For every translatable one the TEMPLATE must
render, through real Go with Ollama's data, exactly what the Jinja template renders (minus the BOS
that Ollama's runner adds itself); render_jinja must equal transformers' apply_chat_template; and
templates that no shape reproduces must be refused with a reason that says where.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from lora2gguf.demo.tiny import CHAT_TEMPLATE as TINY_TEMPLATE
from lora2gguf.deploy.template import BATTERY, GoRenderer, Translation, render_jinja, translate
from lora2gguf.errors import Lora2ggufError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# ChatML whose default system prompt is written as a separate branch (Qwen2.5 style), unlike the
# tiny model's loop.first test: same format, different template text.
CHATML_DEFAULT = (
    "{% if messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{% set turns = messages[1:] %}"
    "{% else %}"
    "{{ '<|im_start|>system\\nYou are a careful assistant. Answer briefly.<|im_end|>\\n' }}{% set turns = messages %}"
    "{% endif %}"
    "{% for message in turns %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLAMA3 = (
    "{% for message in messages %}"
    "{% set turn = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] + '<|eot_id|>' %}"
    "{% if loop.first %}{% set turn = bos_token + turn %}{% endif %}"
    "{{ turn }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

PHI3 = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_prefix = messages[0]['content'] + '\\n\\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set first_prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_prefix if loop.first else '')"
    " + message['content'] + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

_MISTRAL_HEAD = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant after an optional system message') }}{% endif %}"
)

# Mistral [INST] with the system prompt folded into the first user turn (v0.1 style spacing).
MISTRAL_FIRST = _MISTRAL_HEAD + (
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system is defined %}{{ '[INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Mistral [INST] with the system prompt in the final user turn (v0.3 style: dropped when the
# conversation ends with the assistant).
MISTRAL_FINAL = _MISTRAL_HEAD + (
    "{% if message['role'] == 'user' %}"
    "{% if loop.last and system is defined %}{{ '[INST] ' + system + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + '[/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles after an optional first system message') }}"
    "{% endif %}"
    "{% endfor %}"
)

# Llama 2 style: the system prompt folded into the first user turn inside <<SYS>> markers.
LLAMA2 = _MISTRAL_HEAD + (
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system is defined %}"
    "{{ '[INST] <<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Literal text that Go's template syntax and Ollama's Modelfile parser would not take raw: "{{",
# a zero-width space (non-printable: Ollama's parser drops it) and a triple quote.
AWKWARD = (
    "{% for message in messages %}"
    "{{ '{{' + message['role'] + '}}\u200b: ' + message['content'] + '\\n\"\"\"\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '{{assistant}}\u200b: ' }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    template: str
    bos: str | None
    eos: str
    add_bos: bool
    placement: str
    default_system: str | None
    end_of_turn: str


FAMILIES = {
    "chatml-tiny-default": Family(TINY_TEMPLATE, None, "<|im_end|>", False, "turn", "You are a helpful assistant.",
                                  "<|im_end|>"),
    "chatml-default": Family(CHATML_DEFAULT, None, "<|im_end|>", False, "turn",
                             "You are a careful assistant. Answer briefly.", "<|im_end|>"),
    "chatml": Family(CHATML, None, "<|im_end|>", False, "turn", None, "<|im_end|>"),
    # SmolLM2's vocabulary names <|im_start|> as its BOS: the text every turn opens with is no start
    "chatml-bos-is-im-start": Family(TINY_TEMPLATE, "<|im_start|>", "<|im_end|>", False, "turn",
                                     "You are a helpful assistant.", "<|im_end|>"),
    "llama3": Family(LLAMA3, "<|begin_of_text|>", "<|eot_id|>", True, "turn", None, "<|eot_id|>"),
    "llama3-bos-in-template": Family(LLAMA3, "<|begin_of_text|>", "<|eot_id|>", False, "turn", None, "<|eot_id|>"),
    "phi3": Family(PHI3, None, "<|endoftext|>", False, "turn", None, "<|end|>"),
    "gemma": Family(GEMMA, "<bos>", "<eos>", True, "first_user", None, "<end_of_turn>"),
    "mistral-first": Family(MISTRAL_FIRST, "<s>", "</s>", True, "first_user", None, "</s>"),
    "mistral-final": Family(MISTRAL_FINAL, "<s>", "</s>", True, "final_user", None, "</s>"),
    "llama2": Family(LLAMA2, "<s>", "</s>", True, "first_user", None, "</s>"),
    "awkward-literals": Family(AWKWARD, None, "</s>", False, "turn", None, '"""'),
}

# Conversations beyond the module's own battery: longer, tabs, a reply that looks like a turn marker.
EXTRA_CONVERSATIONS = [
    ("four turns", [{"role": r, "content": f"{r} says {i}\t!"} for i, r in
                    enumerate(["system", "user", "assistant", "user", "assistant", "user", "assistant", "user"])],
     "generate", False),
    ("marker-like reply", [{"role": "user", "content": "<|im_end|> [/INST] <end_of_turn>"},
                           {"role": "assistant", "content": "<|eot_id|>"}, {"role": "user", "content": "ok"}],
     "generate", False),
]


def _translated(family: Family) -> Translation:
    return translate(family.template, bos_token=family.bos, eos_token=family.eos, add_bos=family.add_bos,
                     source="tests family template")


def _expected_prompt(family: Family, messages: list[dict], mode: str) -> str:
    """What Ollama must render: the Jinja prompt without the BOS the runner adds when the GGUF asks."""
    text = render_jinja(family.template, messages, add_generation_prompt=mode == "generate",
                        continue_final_message=mode == "continue", bos_token=family.bos, eos_token=family.eos)
    if family.add_bos and family.bos:
        assert text.startswith(family.bos)
        text = text[len(family.bos):]
    return text


@pytest.fixture(scope="session")
def go_renderer() -> GoRenderer:
    missing = GoRenderer.available()
    if missing is not None:
        pytest.skip(missing)
    return GoRenderer()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_is_recognised_and_translated_exactly(name: str) -> None:
    family = FAMILIES[name]
    translation = _translated(family)
    assert translation.exact, translation.reason
    # every conversation but the optional ones the template refuses
    assert translation.conversations_checked >= len([c for c in BATTERY if not c.optional])
    shape = translation.shape
    assert shape is not None and translation.go_template is not None
    assert shape.system_placement == family.placement
    assert shape.default_system == family.default_system
    assert shape.end_of_turn == family.end_of_turn
    assert shape.runner_bos == (family.bos if family.add_bos else "")
    # Ollama's Modelfile parser keeps only printable runes and ends a value at a triple quote
    assert '"""' not in translation.go_template
    assert all(c.isprintable() or c in "\n\t" for c in translation.go_template)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_go_rendering_with_ollama_data_equals_jinja(name: str, go_renderer: GoRenderer) -> None:
    family = FAMILIES[name]
    translation = _translated(family)
    assert translation.exact and translation.shape is not None and translation.go_template is not None
    conversations = [(c.name, list(c.messages), c.mode, c.optional) for c in BATTERY] + EXTRA_CONVERSATIONS
    compared = 0
    for conversation, messages, mode, optional in conversations:
        try:
            want = _expected_prompt(family, messages, mode)
        except Lora2ggufError:
            if optional:  # the template refuses it: nothing to compare with
                continue
            raise
        compared += 1
        got = go_renderer.render(translation.go_template, messages, translation.shape.default_system)
        assert got == want, f"{name}, {conversation}:\nGo:    {got!r}\nJinja: {want!r}"
    assert compared >= len(conversations) - 1


def test_same_format_written_differently_gives_the_same_shape() -> None:
    """Recognition comes from what the template renders, not from how it is written."""
    a = translate(TINY_TEMPLATE, bos_token=None, eos_token="<|im_end|>", add_bos=False)
    b = translate(TINY_TEMPLATE.replace("You are a helpful assistant.", "You are a careful assistant. Answer briefly."),
                  bos_token=None, eos_token="<|im_end|>", add_bos=False)
    c = _translated(FAMILIES["chatml-default"])
    assert a.exact and b.exact and c.exact
    assert b.shape == c.shape and b.go_template == c.go_template
    assert a.go_template == c.go_template and a.shape is not None and c.shape is not None
    assert a.shape.default_system != c.shape.default_system


# --- render_jinja is transformers' rendering ------------------------------------------------------------

FEATURES = (
    "{% set ns = namespace(count=0) %}"
    "{% for message in messages %}{% set ns.count = ns.count + 1 %}"
    "{% if message.role == 'assistant' %}{% generation %}{{ message.content }}{% endgeneration %}"
    "{% else %}{{ message | tojson }}{% endif %}"
    "{% if ns.count > 6 %}{% break %}{% endif %}\n"
    "  {% if loop.last %}\n  last\n  {% endif %}\n"
    "{% endfor %}"
    "{{ dict(n=ns.count) | tojson }} bos={{ bos_token is defined }} eos={{ eos_token }} "
    "tools={{ tools is none }} {{ 'open' if add_generation_prompt else 'closed' }}"
)


def _outcome(render) -> str:
    """The rendered text, or the kind of failure (the tiny tokenizer has no BOS: a template adding
    bos_token to a string must fail in both)."""
    try:
        return render()
    except Lora2ggufError as exc:
        return f"failed: {type(exc.__cause__).__name__}"
    except Exception as exc:  # transformers lets the Jinja error through
        return f"failed: {type(exc).__name__}"


@pytest.mark.parametrize("template", [TINY_TEMPLATE, CHATML_DEFAULT, LLAMA3, GEMMA, MISTRAL_FINAL, FEATURES],
                         ids=["tiny", "chatml-default", "llama3", "gemma", "mistral-final", "features"])
def test_render_jinja_equals_transformers_apply_chat_template(template: str, tiny_base) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    assert tokenizer.bos_token is None and tokenizer.eos_token == "<|im_end|>"
    # the tokenizer's own special tokens, then BOS/EOS given as apply_chat_template keyword arguments
    for specials in ({}, {"bos_token": "<s>", "eos_token": "</s>"}):
        bos, eos = specials.get("bos_token", tokenizer.bos_token), specials.get("eos_token", tokenizer.eos_token)
        for case in BATTERY:
            name, messages = case.name, case.messages
            for generate in ((True, False) if case.mode == "generate" else (False,)):
                options = dict(add_generation_prompt=generate, continue_final_message=case.mode == "continue")
                want = _outcome(lambda: tokenizer.apply_chat_template(
                    list(messages), chat_template=template, tokenize=False, **options, **specials))
                got = _outcome(lambda: render_jinja(template, messages, bos_token=bos, eos_token=eos, **options))
                assert got == want, f"{name} {options} {specials}"
    assert not _outcome(lambda: render_jinja(template, BATTERY[0].messages, add_generation_prompt=True, bos_token="<s>",
                                             eos_token="</s>")).startswith("failed")
    own = tokenizer.apply_chat_template(list(BATTERY[1].messages), tokenize=False, add_generation_prompt=True)
    assert own == render_jinja(tokenizer.chat_template, BATTERY[1].messages, add_generation_prompt=True,
                               bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)


# --- what cannot be translated, and why ---------------------------------------------------------------


def test_trimming_template_is_not_translated() -> None:
    translation = translate(LLAMA3.replace("message['content']", "(message['content'] | trim)"),
                            bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", add_bos=True)
    assert not translation.exact and translation.go_template is None and translation.shape is None
    assert "conversation 'surrounding whitespace'" in translation.reason
    assert "differ at character" in translation.reason and "trimmed" in translation.reason
    assert translation.family == "llama3-like"


def test_per_index_rendering_is_not_translated() -> None:
    numbered = TINY_TEMPLATE.replace(
        "'<|im_start|>' + message['role'] + '\\n'",
        "'<|im_start|>' + message['role'] + (' #' ~ loop.index if message['role'] == 'assistant' else '') + '\\n'")
    assert numbered != TINY_TEMPLATE
    translation = translate(numbered, bos_token=None, eos_token="<|im_end|>", add_bos=False)
    assert not translation.exact and translation.go_template is None
    assert "conversation 'system and two turns'" in translation.reason
    assert "#3" in translation.reason or "#2" in translation.reason


def test_turn_count_in_generation_prompt_is_not_translated() -> None:
    counting = CHATML.replace("{{ '<|im_start|>assistant\\n' }}",
                              "{{ '<|im_start|>assistant ' ~ (messages | length) ~ '\\n' }}")
    translation = translate(counting, bos_token=None, eos_token="<|im_end|>", add_bos=False)
    assert not translation.exact
    assert "'user, assistant, user'" in translation.reason


def test_template_raising_on_system_message_is_not_translated() -> None:
    no_system = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                 "{% endif %}") + GEMMA
    translation = translate(no_system, bos_token="<bos>", eos_token="<eos>", add_bos=True, source="gemma.jinja")
    assert not translation.exact and translation.go_template is None
    assert "conversation 'system, user'" in translation.reason
    assert "System role not supported" in translation.reason and "gemma.jinja" in translation.reason


def test_bos_added_by_the_runner_but_not_rendered_is_not_translated() -> None:
    translation = translate(CHATML, bos_token="<s>", eos_token="<|im_end|>", add_bos=True)
    assert not translation.exact
    assert "add_bos_token" in translation.reason and "'<s>'" in translation.reason


def test_template_that_does_not_parse_names_its_source() -> None:
    broken = "{% for message in messages %}{{ message['content'] }"
    with pytest.raises(Lora2ggufError, match=r"^models/x/chat_template\.jinja: .*does not parse"):
        translate(broken, bos_token=None, eos_token="</s>", add_bos=False, source="models/x/chat_template.jinja")


def test_template_that_fails_on_a_user_turn_names_its_source() -> None:
    with pytest.raises(Lora2ggufError, match=r"^run/tokenizer_config\.json: .*fails.*no chat here"):
        translate("{{ raise_exception('no chat here') }}", bos_token=None, eos_token="</s>", add_bos=False,
                  source="run/tokenizer_config.json")
    with pytest.raises(Lora2ggufError, match=r"^t\.jinja: .*UndefinedError"):
        render_jinja("{{ messages[0].content.missing.deeper }}", [{"role": "user", "content": "x"}],
                     add_generation_prompt=True, bos_token=None, eos_token=None, source="t.jinja")


# --- the Go renderer mirrors Ollama's chat data -----------------------------------------------------------

DUMP = ("{{ .System }}|{{ range .Messages }}[{{ .Role }}:{{ .Content }}]{{ end }}"
        "|{{ .Response }}|{{ .Tools }}|{{ if .Think }}think{{ end }}")


def test_go_renderer_mirrors_ollama_system_and_collation(go_renderer: GoRenderer) -> None:
    user_first = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                  {"role": "assistant", "content": "c"}]
    assert go_renderer.render(DUMP, user_first, "S") == "S|[system:S][user:a\n\nb][assistant:c]||null|"
    assert go_renderer.render(DUMP, user_first, "") == "|[user:a\n\nb][assistant:c]||null|"
    assert go_renderer.render(DUMP, user_first, None) == "|[user:a\n\nb][assistant:c]||null|"
    system_first = [{"role": "system", "content": "mine"}, {"role": "user", "content": "x"},
                    {"role": "system", "content": "later"}]
    assert go_renderer.render(DUMP, system_first, "S") == "mine\n\nlater|[system:mine][user:x][system:later]||null|"


def test_go_renderer_refuses_what_it_does_not_mirror(go_renderer: GoRenderer) -> None:
    with pytest.raises(Lora2ggufError, match="legacy"):
        go_renderer.render("{{ .Prompt }}", [{"role": "user", "content": "x"}])
    with pytest.raises(Lora2ggufError, match="Ollama TEMPLATE"):
        go_renderer.render("{{ range .Messages }}", [{"role": "user", "content": "x"}])
