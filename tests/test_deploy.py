"""lora2gguf deploy and chat-parity on the tiny Qwen2 model: the Modelfile, the deploy notes, and
the chat parity report with real renderers (llama-cpp-python, llama-server, Go) and a served round trip."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import assert_nothing_at, run_cli, tree_state
from lora2gguf.deploy.chat_facts import read_chat_facts
from lora2gguf.deploy.modelfile import read_modelfile

LLAMA_BIN = os.environ.get("LORA2GGUF_LLAMA_BIN")
HAS_SERVER = bool(LLAMA_BIN) and (Path(LLAMA_BIN) / "llama-server").is_file()
HAS_GO = shutil.which("go") is not None
needs_server = pytest.mark.skipif(not HAS_SERVER, reason="set LORA2GGUF_LLAMA_BIN to a folder with llama-server (make llama-tools)")
needs_go = pytest.mark.skipif(not HAS_GO, reason="Go is not installed (Debian: apt-get install golang-go)")

PROMPTS = json.dumps([
    {"id": "exam", "text": "我下周就要期末考试了，每天晚上都紧张得睡不着，该怎么办？"},
    {"id": "english", "text": "I have three deadlines this week. How can I cope?"},
], ensure_ascii=False)

# The tiny model's template with one character changed in the default system prompt: what a
# LLaMA-Factory run trained with its own registry template looks like next to its saved template.
TRAINING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Trims every message: Ollama's Go template has no trim, so no exact translation exists.
TRIMMING_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture
def deployed(tmp_path: Path, f16_gguf: Path, tiny_base: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    folder = tmp_path / "gguf"
    folder.mkdir()
    gguf = folder / "model.gguf"
    shutil.copy(f16_gguf, gguf)
    code, log = run_cli(capsys, "deploy", gguf, "--merged", tiny_base, "--notes", tmp_path / "deploy.md",
                        "--report", tmp_path / "deploy.json", "--name", "tiny")
    assert code == 0, log
    return gguf


def test_modelfile_carries_template_system_stops_and_context(deployed: Path, tmp_path: Path) -> None:
    text = (deployed.parent / "Modelfile").read_text(encoding="utf-8")
    assert "FROM ./model.gguf\n" in text
    content = read_modelfile(deployed.parent / "Modelfile")
    assert content.template is not None and "{{" in content.template
    assert content.system == "You are a helpful assistant."
    assert "<|im_end|>" in content.stops
    assert "PARAMETER num_ctx 2048" in text
    report = json.loads((tmp_path / "deploy.json").read_text(encoding="utf-8"))
    assert report["schema"] == "lora2gguf/deploy/1"
    assert report["template"]["translated"] is True
    assert report["template"]["conversations_checked"] > 5
    sources = {stop["text"]: stop["sources"] for stop in report["stop"]}
    assert "chat template end of turn" in sources["<|im_end|>"]
    notes = (tmp_path / "deploy.md").read_text(encoding="utf-8")
    for command in ("llama-server -m", "llama-cli -m", "ollama create tiny -f", "lms import", "vllm serve"):
        assert command in notes
    assert "--host 127.0.0.1" in notes


def test_untranslatable_template_writes_no_template(tmp_path: Path, f16_gguf: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    template = tmp_path / "trimming.jinja"
    template.write_text(TRIMMING_TEMPLATE, encoding="utf-8")
    modelfile = tmp_path / "Modelfile"
    code, log = run_cli(capsys, "deploy", f16_gguf, "--modelfile", modelfile, "--chat-template", template,
                        "--report", tmp_path / "deploy.json")
    assert code == 0, log
    assert "not translated" in log
    content = read_modelfile(modelfile)
    assert content.template is None and content.system is None
    assert "# no TEMPLATE:" in modelfile.read_text(encoding="utf-8")
    report = json.loads((tmp_path / "deploy.json").read_text(encoding="utf-8"))
    assert report["template"]["translated"] is False and report["template"]["reason"]


def test_deploy_refuses_a_file_that_is_not_gguf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 not a gguf")
    before = tree_state(tmp_path)
    code, log = run_cli(capsys, "deploy", bogus)
    assert code == 2
    assert f"error: {bogus}: not a GGUF file" in log
    assert tree_state(tmp_path) == before
    assert_nothing_at(tmp_path / "Modelfile")


@needs_server
@needs_go
def test_chat_parity_every_renderer_and_the_served_round_trip(deployed: Path, tiny_base: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "chat_parity.json"
    code, log = run_cli(capsys, "chat-parity", "--merged", tiny_base, "--gguf", deployed, "--modelfile",
                        deployed.parent / "Modelfile", "--prompts", PROMPTS, "--max-new-tokens", "8", "--out", out)
    assert code == 0, log
    report = json.loads(out.read_text(encoding="utf-8"))
    assert [c["name"] for c in report["conversations"]] == ["prompt:exam", "prompt:english", "multi-turn", "with-system"]
    for name in ("llama-cpp-python", "llama-server", "ollama"):
        renderer = report["renderers"][name]
        assert renderer["measured"], renderer
        assert renderer["identical"] == renderer["of"] == 4, renderer
    served = report["served"]
    assert served["backend"] == "llama-server"
    assert served["all_prompt_tokens_match"] and served["all_answers_match"], served
    assert served["forced_stop"]["finish_reason"] == "stop"


def test_chat_parity_shows_where_the_training_template_differs(deployed: Path, tiny_base: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    training = tmp_path / "training.jinja"
    training.write_text(TRAINING_TEMPLATE, encoding="utf-8")
    out = tmp_path / "chat_parity.json"
    code, log = run_cli(capsys, "chat-parity", "--merged", tiny_base, "--gguf", deployed, "--modelfile",
                        deployed.parent / "Modelfile", "--prompts", PROMPTS, "--training-template", training,
                        "--no-serve", "--out", out)
    assert code == 0, log
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["reference"]["renderer"] == "training-template"
    saved = report["renderers"]["hf"]
    # every conversation without its own system prompt gets the default one, one token apart
    assert saved["identical"] == 1 and saved["of"] == 4
    difference = saved["conversations"][0]["first_difference"]
    assert difference["reference_length"] + 1 == difference["renderer_length"]
    assert "renders 3 of 4 conversations differently" in log
    assert report["served"] == {"measured": False, "reason": "--no-serve"}


def test_chat_parity_refuses_a_missing_modelfile(deployed: Path, tiny_base: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "chat_parity.json"
    code, log = run_cli(capsys, "chat-parity", "--merged", tiny_base, "--gguf", deployed, "--modelfile",
                        tmp_path / "nope" / "Modelfile", "--prompts", PROMPTS, "--no-serve", "--out", out)
    assert code == 2
    assert f"error: {tmp_path / 'nope' / 'Modelfile'}:" in log
    assert_nothing_at(out)


def test_convert_carries_a_training_template(tmp_path: Path, tiny_base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    template = tmp_path / "training.jinja"
    template.write_text(TRAINING_TEMPLATE, encoding="utf-8")
    out = tmp_path / "model.gguf"
    code, log = run_cli(capsys, "convert", tiny_base, out, "--chat-template", template, "--no-progress")
    assert code == 0, log
    assert read_chat_facts(out).template == TRAINING_TEMPLATE
