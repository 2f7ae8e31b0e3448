"""`lora2gguf serve`: the served model answers as llama.cpp does on the reference prompt, under load and
bad requests, and stops cleanly.

Real peers only: llama.cpp's own llama-server from LORA2GGUF_LLAMA_BIN (`make llama-tools`), llama-cpp-
python's server for the fallback, the tiny Qwen2 base's Hugging Face tokenizer for the reference prompt
ids and llama.cpp (through llama-cpp-python) for the reference greedy answer.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import refused

from lora2gguf.deploy.chat_facts import generation_eos_ids
from lora2gguf.deploy.server import RunningServer, ServeOptions, free_port
from lora2gguf.llamacpp import LlamaRuntime


LLAMA_BIN = os.environ.get("LORA2GGUF_LLAMA_BIN")
LLAMA_SERVER = Path(LLAMA_BIN) / "llama-server" if LLAMA_BIN else None
needs_llama_server = pytest.mark.skipif(
    LLAMA_SERVER is None or not LLAMA_SERVER.is_file(),
    reason="set LORA2GGUF_LLAMA_BIN to a folder with llama.cpp's llama-server (make llama-tools)",
)

CTX = 256
MAX_TOKENS = 8
KEY = "s3cret-key"
CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "What is the capital of France?"}],
    "system prompt": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Name a colour."},
    ],
    "multi-turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "Tell me a joke about cats."},
    ],
}
# what llama-server needs to show every generated token id (server-context.cpp process_token keeps them
# when return_tokens is set; the request's verbose flag adds them to the reply as __verbose.tokens)
GREEDY = {"temperature": 0.0, "max_tokens": MAX_TOKENS, "verbose": True, "return_tokens": True}


@pytest.fixture(scope="module")
def tokenizer(tiny_base: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base, local_files_only=True)


@pytest.fixture(scope="module")
def stop_ids(tiny_base: Path, tokenizer: Any) -> list[int]:
    return sorted({tokenizer.eos_token_id, *generation_eos_ids(tiny_base)})


def reference_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """What training saw: the Hugging Face tokenizer's chat template, the assistant turn opened."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return [int(i) for i in ids]


@pytest.fixture(scope="module")
def expected(f16_gguf: Path, tokenizer: Any, stop_ids: list[int]) -> dict[str, list[int]]:
    """llama.cpp's own greedy continuation of each reference prompt (a stop token ends it, kept)."""
    with LlamaRuntime(f16_gguf, n_ctx=CTX, n_threads=1, logits_all=False) as runtime:
        return {
            name: runtime.greedy(reference_ids(tokenizer, messages), MAX_TOKENS, stop_ids).tokens
            for name, messages in CONVERSATIONS.items()
        }


@pytest.fixture(scope="module")
def server(f16_gguf: Path) -> Iterator[RunningServer]:
    """One llama-server for the module, with an API key (RunningServer sends it on every request)."""
    if LLAMA_SERVER is None or not LLAMA_SERVER.is_file():
        pytest.skip("set LORA2GGUF_LLAMA_BIN to a folder with llama.cpp's llama-server (make llama-tools)")
    options = ServeOptions(model=f16_gguf, ctx_size=CTX, threads=1, api_key=KEY, backend="llama-server")
    with RunningServer(options, startup_timeout=60, request_timeout=60) as running:
        yield running


def served_ids(server: RunningServer, messages: list[dict[str, str]], **params: Any) -> list[int]:
    reply = server.chat(messages, **{**GREEDY, **params})
    return [int(t) for t in reply["__verbose"]["tokens"]]


# --- the served round trip ------------------------------------------------------------------------------
@needs_llama_server
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_served_answer_is_llama_cpp_greedy_on_the_reference_prompt(
    server: RunningServer, tokenizer: Any, expected: dict[str, list[int]], stop_ids: list[int], name: str
) -> None:
    messages = CONVERSATIONS[name]
    ref = reference_ids(tokenizer, messages)
    reply = server.chat(messages, **GREEDY)
    assert reply["usage"]["prompt_tokens"] == len(ref)
    # the prompt llama-server rendered (--jinja, the GGUF's template), tokenized as it tokenizes it
    prompt = reply["__verbose"]["prompt"]
    assert server.post("/tokenize", {"content": prompt, "add_special": True, "parse_special": True})["tokens"] == ref
    answer = [int(t) for t in reply["__verbose"]["tokens"]]
    assert answer == expected[name]
    stopped = answer[-1] in stop_ids
    choice = reply["choices"][0]
    assert choice["finish_reason"] == ("stop" if stopped else "length")
    text_ids = answer[:-1] if stopped else answer
    assert choice["message"]["content"] == tokenizer.decode(text_ids, skip_special_tokens=False)


@needs_llama_server
def test_a_reply_that_reaches_the_end_of_turn_token_ends_there(server: RunningServer, tokenizer: Any) -> None:
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    messages = CONVERSATIONS["one user turn"]
    reply = server.chat(messages, **GREEDY, logit_bias={str(end_of_turn): 100.0})
    assert reply["__verbose"]["tokens"] == [end_of_turn]
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert reply["choices"][0]["message"]["content"] == ""
    assert reply["usage"]["completion_tokens"] == 1


# --- under load ------------------------------------------------------------------------------------------
@needs_llama_server
def test_eight_concurrent_clients_get_the_sequential_answers(server: RunningServer) -> None:
    """Each of 8 clients sends 4 conversations; every answer is the one the same request got alone, its
    token ids and their log-probabilities bit for bit (the defaults: one slot, no prompt cache; with 4
    slots or the prompt cache on, the log-probabilities of this very test differ by up to 3e-4). The
    newline the tiny model prefers is banned so that the answers differ between conversations."""
    prompts = [f"Question {i}: {topic}?" for i, topic in enumerate(
        ("why is the sky blue", "what is 2+2", "name three fruits", "tell me a story about a dragon",
         "translate cat to French", "write a haiku", "explain gravity", "who wrote Hamlet"))]
    params = {**GREEDY, "max_tokens": 12, "logit_bias": {"198": False}, "logprobs": True, "top_logprobs": 1}

    def ask(prompt: str) -> tuple[list[int], list[float]]:
        reply = server.chat([{"role": "user", "content": prompt}], **params)
        logprobs = [entry["logprob"] for entry in (reply["choices"][0].get("logprobs") or {}).get("content", [])]
        return [int(t) for t in reply["__verbose"]["tokens"]], logprobs

    sequential = {prompt: ask(prompt) for prompt in prompts}
    assert len({tuple(ids) for ids, _ in sequential.values()}) > 1, "all answers alike: the test would prove nothing"

    def client(index: int) -> list[tuple[str, tuple[list[int], list[float]]]]:
        mine = [prompts[(index + k) % len(prompts)] for k in range(4)]
        return [(prompt, ask(prompt)) for prompt in mine]

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = [item for batch in pool.map(client, range(8)) for item in batch]
    assert len(answers) == 32
    different = [prompt for prompt, answer in answers if answer != sequential[prompt]]
    assert not different, f"{len(different)}/32 answers differ from the sequential ones: {different[:3]}"


# --- bad requests: refused with a message, and the server keeps serving ----------------------------------
def assert_still_serving(server: RunningServer, expected: dict[str, list[int]]) -> None:
    assert served_ids(server, CONVERSATIONS["one user turn"]) == expected["one user turn"]


def error_message(body: Any) -> str:
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    return str(body["error"]["message"])


@needs_llama_server
def test_malformed_json_gets_an_error_with_a_message_and_the_server_keeps_serving(
    server: RunningServer, expected: dict[str, list[int]]
) -> None:
    reply = server.request("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"')
    assert 400 <= reply.status < 600
    assert "parse error" in error_message(reply.body)
    assert_still_serving(server, expected)


@needs_llama_server
@pytest.mark.xfail(
    strict=True,
    reason="llama-server answers 500 server_error for a body that is not JSON: json::parse throws inside "
    "the route and ex_wrapper maps any non-invalid_argument exception to 500 (tools/server/server.cpp "
    "ex_wrapper; llama.cpp PR #5961 shows it as designed)",
)
def test_malformed_json_is_a_client_error(server: RunningServer) -> None:
    reply = server.request("POST", "/v1/chat/completions", b"{not json")
    assert 400 <= reply.status < 500, reply


@needs_llama_server
def test_a_prompt_longer_than_the_context_gets_400_and_the_server_keeps_serving(
    server: RunningServer, expected: dict[str, list[int]]
) -> None:
    messages = [{"role": "user", "content": "hello " * (2 * CTX)}]
    reply = server.request("POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 2})
    assert reply.status == 400, reply
    message = error_message(reply.body)
    assert "exceeds the available context size" in message and f"({CTX} tokens)" in message
    assert_still_serving(server, expected)


@needs_llama_server
def test_api_key_missing_or_wrong_is_refused(server: RunningServer, expected: dict[str, list[int]]) -> None:
    body = {"messages": CONVERSATIONS["one user turn"], "max_tokens": 1}
    for key in (None, "wrong-key", KEY[:-1]):
        reply = server.request("POST", "/v1/chat/completions", body, api_key=key)
        assert reply.status == 401, (key, reply)
        assert "Invalid API Key" in error_message(reply.body)
    assert_still_serving(server, expected)  # with the right key
    # the key travels in the environment, never on a command line (`ps` shows those to every user)
    assert KEY not in Path(f"/proc/{server.pid}/cmdline").read_bytes().decode("utf-8", "replace")
    assert f"LLAMA_API_KEY={KEY}".encode() in Path(f"/proc/{server.pid}/environ").read_bytes().split(b"\0")


# --- the process: default bind address, SIGTERM, no orphan --------------------------------------------------
def listening_addresses(port: int) -> set[str]:
    """The local addresses (hex, as the kernel writes them) of TCP sockets listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table, encoding="ascii") as handle:
            for line in handle.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: TCP_LISTEN
                    found.add(address)
    return found


def processes_naming(text: str) -> list[int]:
    """Pids of the live processes whose command line contains ``text``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            except OSError:
                continue
            if text in cmdline:
                pids.append(int(entry.name))
    return pids


def wait_healthy(url: str, process: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0][-3000:]
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if json.load(response).get("status") == "ok":
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} not healthy after {timeout} s")


@needs_llama_server
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_binds_loopback_by_default_and_a_signal_ends_it_without_orphans(
    f16_gguf: Path, tmp_path: Path, stop_signal: signal.Signals
) -> None:
    model = tmp_path / "served-model.gguf"  # a name no other process carries on its command line
    model.write_bytes(f16_gguf.read_bytes())
    port = free_port()
    argv = [sys.executable, "-m", "lora2gguf.cli", "serve", str(model), "--port", str(port), "--ctx-size", str(CTX),
            "--threads", "1", "--backend", "llama-server"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process)
        # lora2gguf became the server (exec): SIGTERM to this pid reaches llama-server itself
        assert Path(f"/proc/{process.pid}/exe").resolve() == LLAMA_SERVER.resolve()
        assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1 only
        assert processes_naming(str(model)) == [process.pid]
        start = time.monotonic()
        process.send_signal(stop_signal)
        output, _ = process.communicate(timeout=10)
        seconds = time.monotonic() - start
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert seconds < 10
    assert process.returncode == 0, output[-3000:]
    assert processes_naming(str(model)) == [], f"a server process outlived {stop_signal.name}"
    assert listening_addresses(port) == set()
    assert f"at http://127.0.0.1:{port}/v1 " in output
    assert f"equivalent command: {LLAMA_SERVER} --model {model} --host 127.0.0.1 --port {port} --jinja" in output


# --- bad inputs through the CLI: refused before anything starts ----------------------------------------------
@pytest.fixture
def no_exec(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal that does not happen must fail the test, not turn pytest into a server."""

    def refuse(*args: Any) -> None:
        raise AssertionError(f"serve went on to exec {args[0]}")

    monkeypatch.setattr(os, "execvpe", refuse)


@pytest.mark.usefixtures("no_exec")
def test_serve_refuses_a_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "absent.gguf"
    message = refused(capsys, tmp_path, "serve", missing)
    assert message.startswith(f"{missing}: ") and "not found" in message


@pytest.mark.usefixtures("no_exec")
def test_serve_refuses_a_file_that_is_not_gguf(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = tmp_path / "model.gguf"
    text.write_text("not a model\n", encoding="utf-8")
    message = refused(capsys, tmp_path, "serve", text)
    assert message.startswith(f"{text}: not a GGUF file")


@pytest.mark.usefixtures("no_exec")
def test_serve_refuses_a_port_in_use(capsys: pytest.CaptureFixture[str], f16_gguf: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        message = refused(capsys, f16_gguf.parent, "serve", f16_gguf, "--port", str(port))
    assert message.startswith(f"{f16_gguf}: cannot serve it on 127.0.0.1:{port}: the port is already in use")


@pytest.mark.usefixtures("no_exec")
def test_serve_refuses_a_missing_or_wrong_lora(
    capsys: pytest.CaptureFixture[str], f16_gguf: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "adapter.gguf"
    message = refused(capsys, [tmp_path, f16_gguf.parent], "serve", f16_gguf, "--lora", missing)
    assert message == f"{missing}: LoRA adapter file not found"
    # a whole model is no adapter (llama.cpp wants general.type = adapter)
    message = refused(capsys, f16_gguf.parent, "serve", f16_gguf, "--lora", f16_gguf)
    assert message.startswith(f"{f16_gguf}: general.type is 'model', not 'adapter'")


# --- the fallback: llama-cpp-python's server ----------------------------------------------------------------
def test_llama_cpp_python_server_round_trip(
    f16_gguf: Path, tokenizer: Any, expected: dict[str, list[int]], stop_ids: list[int]
) -> None:
    """Its replies carry no token ids: the answer is compared as text, the prompt by its length."""
    pytest.importorskip("uvicorn", reason="llama-cpp-python's server extra (lora2gguf[server]) is not installed")
    name = "system prompt"
    messages = CONVERSATIONS[name]
    options = ServeOptions(model=f16_gguf, ctx_size=CTX, threads=1, backend="llama-cpp-python")
    with RunningServer(options, startup_timeout=60, request_timeout=60) as running:
        assert running.backend == "llama-cpp-python"
        reply = running.chat(messages, temperature=0.0, max_tokens=MAX_TOKENS)
        end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
        forced = running.chat(messages, temperature=0.0, max_tokens=MAX_TOKENS, logit_bias={str(end_of_turn): 100.0})
        seconds = running.stop()
    assert seconds < 10
    assert reply["usage"]["prompt_tokens"] == len(reference_ids(tokenizer, messages))
    answer = expected[name]
    stopped = answer[-1] in stop_ids
    assert reply["choices"][0]["message"]["content"] == tokenizer.decode(answer[:-1] if stopped else answer)
    assert reply["choices"][0]["finish_reason"] == ("stop" if stopped else "length")
    assert forced["choices"][0]["finish_reason"] == "stop" and forced["choices"][0]["message"]["content"] == ""
