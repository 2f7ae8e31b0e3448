"""Serve a GGUF over an OpenAI-compatible HTTP API with the file's own chat template.

Two backends, both running llama.cpp on the file:

- ``llama-server --jinja`` (llama.cpp's own server, built by ``make llama-tools``): renders the GGUF's
  ``tokenizer.chat_template`` with its Jinja engine and stops at every end-of-generation token of the
  vocabulary (EOS, EOT and the ``<|im_end|>``/``<|endoftext|>``/... tokens llama.cpp's vocabulary
  marks as such);
- ``python -m llama_cpp.server`` (llama-cpp-python's server, the ``server`` extra) when there is no
  llama-server: its chat formatter is built from the same GGUF metadata (template, BOS/EOS strings).

``serve`` checks the inputs and then *replaces* this process with the server (``os.execvpe``), so
SIGINT/SIGTERM reach the server itself and no orphan can be left behind. ``RunningServer`` starts
``lora2gguf serve`` in a child process on a free port for the chat parity step and the tests.

Determinism (measured, tests/test_serve.py): llama-server decodes the requests of all busy slots in one
batch, so with several slots an answer's logits depend in their last bits on which other requests share
the batch; and with its prompt cache a request reuses the KV cache of the previous prompt's common
prefix, computed in a batch of another shape, so its logits depend on the request before it. Either
can turn a greedy answer at a close call. Our defaults, one slot (``parallel=1``: concurrent requests
queue) and no prompt cache (every prompt evaluated whole, as a fresh llama.cpp context does), give every
request the same logits bit for bit whatever else the server is doing. ``parallel`` and ``cache_prompt``
trade that for throughput. (llama-cpp-python's server serves one request at a time and always reuses
the common prefix of the previous prompt.)
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import importlib.util
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

from lora2gguf.deploy.chat_facts import read_chat_facts
from lora2gguf.errors import Lora2ggufError
from lora2gguf.formats.gguf import read_gguf

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "llama-server", "llama-cpp-python")
LLAMA_BIN_ENV = "LORA2GGUF_LLAMA_BIN"  # a folder holding llama-server (as for llama-quantize)
API_KEY_ENV = "LORA2GGUF_API_KEY"
DEFAULT_CTX = 4096  # capped at the model's training context
# The environment variable each backend reads its API key from (argv would show it in `ps`).
_BACKEND_KEY_ENV = {"llama-server": "LLAMA_API_KEY", "llama-cpp-python": "API_KEY"}
# llama-cpp-python's `server` extra (pyproject: lora2gguf[server]); found without importing them.
_PYTHON_SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")


@dataclass
class ServeOptions:
    model: Path  # the GGUF to serve
    host: str = "127.0.0.1"
    port: int = 8080
    threads: int | None = None  # None: the backend's default (all cores for llama-server)
    ctx_size: int | None = None  # None: DEFAULT_CTX capped at the model's context_length
    api_key: str | None = None  # None: $LORA2GGUF_API_KEY, else no key
    loras: list[Path] = field(default_factory=list)  # LoRA adapter GGUFs, applied at scale 1
    backend: str = "auto"
    parallel: int = 1  # llama-server slots; 1 keeps every answer equal to the sequential one
    cache_prompt: bool = False  # llama-server's prompt cache: faster multi-turn chats, history-dependent logits


@dataclass
class ServerCommand:
    argv: list[str]
    env: dict[str, str]  # the whole environment of the server (carries the API key)
    backend: str
    url: str  # http://HOST:PORT; the OpenAI base URL is url + "/v1"
    shown: str  # the equivalent plain command, API key masked


def find_llama_server() -> Path | None:
    """llama.cpp's llama-server: in $LORA2GGUF_LLAMA_BIN (a folder) first, then on PATH."""
    folder = os.environ.get(LLAMA_BIN_ENV)
    if folder:
        candidate = Path(folder) / "llama-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("llama-server")
    return Path(found) if found else None


def _python_server_missing() -> list[str]:
    return [name for name in _PYTHON_SERVER_MODULES if importlib.util.find_spec(name) is None]


def resolve_backend(backend: str) -> tuple[str, Path | None]:
    """The backend to run and llama-server's path (None for llama-cpp-python)."""
    if backend not in BACKENDS:
        raise Lora2ggufError(f"--backend {backend!r}: not one of {', '.join(BACKENDS)}")
    binary = find_llama_server() if backend != "llama-cpp-python" else None
    if binary is not None:
        return "llama-server", binary
    where = f"${LLAMA_BIN_ENV} ({os.environ.get(LLAMA_BIN_ENV) or 'not set'}) or PATH"
    if backend == "llama-server":
        raise Lora2ggufError(f"llama-server: not found in {where}; `make llama-tools` builds it")
    missing = _python_server_missing()
    if missing:
        raise Lora2ggufError(
            f"no server to run: llama-server is not in {where} and llama-cpp-python's server is not "
            f"installed (missing {', '.join(missing)}: pip install 'lora2gguf[server]')"
        )
    return "llama-cpp-python", None


def _api_key(options: ServeOptions) -> str | None:
    key = options.api_key if options.api_key is not None else os.environ.get(API_KEY_ENV)
    return key or None


def _context_size(options: ServeOptions, context_length: int | None) -> int:
    if options.ctx_size is not None:
        if context_length and options.ctx_size > context_length:
            logger.warning(
                "%s: --ctx-size %d exceeds the model's training context %d", options.model, options.ctx_size,
                context_length,
            )
        return options.ctx_size
    return min(DEFAULT_CTX, context_length) if context_length else DEFAULT_CTX


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _csv_field(value: str) -> str:
    """llama.cpp splits --lora and the API key at commas (common/arg.cpp parse_csv_row) and honours
    double quotes: quote a value that would otherwise be split or unquoted."""
    if "," in value or value.startswith('"'):
        return '"' + value.replace('"', '""') + '"'
    return value


def _llama_server_argv(binary: Path, options: ServeOptions, ctx: int) -> list[str]:
    argv = [str(binary), "--model", str(options.model), "--host", options.host, "--port", str(options.port)]
    # --jinja: the GGUF's own chat template through llama.cpp's Jinja engine (no built-in guess)
    argv += ["--jinja", "--ctx-size", str(ctx), "--parallel", str(options.parallel)]
    argv += [] if options.cache_prompt else ["--no-cache-prompt"]
    if options.threads is not None:
        argv += ["--threads", str(options.threads)]
    for lora in options.loras:
        argv += ["--lora", _csv_field(str(lora))]
    return argv


def _python_server_argv(options: ServeOptions, ctx: int) -> list[str]:
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(options.model)]
    argv += ["--host", options.host, "--port", str(options.port), "--n_ctx", str(ctx)]
    # a new streaming request would otherwise cut a running one short (app.py interrupt_requests)
    argv += ["--interrupt_requests", "false"]
    if options.threads is not None:
        argv += ["--n_threads", str(options.threads), "--n_threads_batch", str(options.threads)]
    if options.loras:
        argv += ["--lora_path", str(options.loras[0])]
    return argv


def server_command(options: ServeOptions, context_length: int | None = None) -> ServerCommand:
    """The server's command line and environment (no checks of the files: see ``serve``)."""
    backend, binary = resolve_backend(options.backend)
    ctx = _context_size(options, context_length)
    if binary is not None:
        argv = _llama_server_argv(binary, options, ctx)
    else:
        argv = _python_server_argv(options, ctx)
    env = {k: v for k, v in os.environ.items() if k not in (API_KEY_ENV, *_BACKEND_KEY_ENV.values())}
    if backend == "llama-cpp-python":
        # llama_cpp.server's __main__ lets $HOST and $PORT override its own arguments
        env.update(HOST=options.host, PORT=str(options.port))
    key = _api_key(options)
    key_env = _BACKEND_KEY_ENV[backend]
    shown = shlex.join(argv)
    if key is not None:
        env[key_env] = _csv_field(key) if backend == "llama-server" else key
        shown = f"{key_env}=**** {shown}"
    return ServerCommand(argv, env, backend, _url(options.host, options.port), shown)


def _check_adapter(path: Path) -> None:
    if not path.is_file():
        raise Lora2ggufError(f"{path}: LoRA adapter file not found" if not path.exists() else f"{path}: not a file")
    kind = read_gguf(path).metadata.get("general.type")  # names the file when it is no GGUF
    if kind != "adapter":
        raise Lora2ggufError(f"{path}: general.type is {kind!r}, not 'adapter': not a LoRA adapter GGUF")


def _check_numbers(options: ServeOptions) -> None:
    if not 0 < options.port < 65536:
        raise Lora2ggufError(f"--port {options.port}: not a TCP port (1-65535)")
    counts = (("--threads", options.threads), ("--ctx-size", options.ctx_size), ("--parallel", options.parallel))
    for flag, value in counts:
        if value is not None and value < 1:
            raise Lora2ggufError(f"{flag} must be at least 1, got {value}")
    if options.api_key is not None and not options.api_key.strip():
        raise Lora2ggufError("--api-key: empty (leave it out to serve without a key)")


def check_port(options: ServeOptions) -> None:
    """Refuse a host:port another process listens on, before the server loads the model.

    SO_REUSEADDR as both servers set it: only a listening socket, not a closing connection, blocks."""
    try:
        infos = socket.getaddrinfo(options.host, options.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise Lora2ggufError(f"--host {options.host}: cannot resolve it: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise Lora2ggufError(
                    f"{options.model}: cannot serve it on {options.host}:{options.port}: the port is already in "
                    "use (stop the other server or choose another --port)"
                ) from None
            where = f"--host {options.host} --port {options.port}"
            raise Lora2ggufError(f"{where}: cannot listen there: {exc.strerror}") from None


def prepare(options: ServeOptions) -> ServerCommand:
    """Check everything a user can get wrong, then build the command; nothing is started."""
    _check_numbers(options)
    facts = read_chat_facts(Path(options.model))  # names the file: missing, not a GGUF, no vocabulary
    if facts.template is None:
        logger.warning(
            "%s: no tokenizer.chat_template: the server falls back to a built-in chat format that training "
            "may not have used", options.model,
        )
    for lora in options.loras:
        _check_adapter(Path(lora))
    check_port(options)
    command = server_command(options, facts.context_length)
    if command.backend == "llama-cpp-python" and len(options.loras) > 1:
        raise Lora2ggufError(
            f"{options.loras[1]}: llama-cpp-python's server applies one LoRA adapter, not {len(options.loras)}"
        )
    return command


def serve(options: ServeOptions) -> NoReturn:
    """Check the inputs, print the URL and the equivalent command, then become the server."""
    command = prepare(options)
    print(f"serving {options.model} with {command.backend} at {command.url}/v1 (OpenAI-compatible)", flush=True)
    print(f"equivalent command: {command.shown}", flush=True)
    for handler in logging.getLogger().handlers:
        handler.flush()
    try:
        os.execvpe(command.argv[0], command.argv, command.env)
    except OSError as exc:
        raise Lora2ggufError(f"{command.argv[0]}: cannot run it: {exc.strerror}") from None


# -- a server in a child process: the chat parity step and the tests --------------------------------
class ServerHTTPError(Lora2ggufError):
    """The server answered a request with an HTTP error."""

    def __init__(self, where: str, status: int, body: Any) -> None:
        message = body.get("error", body) if isinstance(body, dict) else body
        if isinstance(message, dict):
            message = message.get("message", message)
        super().__init__(f"{where}: HTTP {status}: {message}")
        self.status = status
        self.body = body


@dataclass
class Reply:
    status: int
    body: Any  # the decoded JSON, or the text when the server did not answer JSON


_KEEP = object()  # RunningServer.request: send the server's own API key


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the kernel's choice)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class RunningServer:
    """``lora2gguf serve`` in a child process on a free port, stopped on leaving the ``with`` block.

    The child execs the server, so its pid is the server's; its output goes to ``log_path``, whose
    tail is shown when it fails to start.
    """

    def __init__(self, options: ServeOptions, *, startup_timeout: float = 180.0, request_timeout: float = 600.0,
                 log_path: Path | None = None) -> None:
        # a wildcard bind is reached through loopback
        client_host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(options.host, options.host)
        self.options = replace(options, port=free_port(client_host))
        self.backend, _ = resolve_backend(options.backend)
        self.api_key = _api_key(options)
        self.url = _url(client_host, self.options.port)
        self.startup_timeout = startup_timeout
        self.request_timeout = request_timeout
        self._own_log = log_path is None
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="lora2gguf-serve-", suffix=".log")[1])
        self.process: subprocess.Popen[bytes] | None = None

    def _argv(self) -> list[str]:
        o = self.options
        argv = [sys.executable, "-m", "lora2gguf.cli", "serve", str(o.model), "--host", o.host, "--port", str(o.port)]
        argv += ["--backend", self.backend, "--parallel", str(o.parallel)]
        argv += ["--cache-prompt"] if o.cache_prompt else []
        argv += ["--threads", str(o.threads)] if o.threads is not None else []
        argv += ["--ctx-size", str(o.ctx_size)] if o.ctx_size is not None else []
        for lora in o.loras:
            argv += ["--lora", str(lora)]
        return argv

    def start(self) -> RunningServer:
        env = dict(os.environ)
        env.pop(API_KEY_ENV, None)
        if self.api_key is not None:
            env[API_KEY_ENV] = self.api_key  # never on the command line
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self._argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        atexit.register(self.stop)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        logger.info("%s serves %s at %s (pid %d)", self.backend, self.options.model, self.url, self.process.pid)
        return self

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _wait_ready(self) -> None:
        """Until /v1/models answers 200 (llama-server answers 503 while loading; uvicorn listens only
        once the model is loaded)."""
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise Lora2ggufError(
                    f"{self.options.model}: the server exited with status {self.process.returncode} before it was "
                    f"ready; its log ({self.log_path}) ends:\n{self.log_tail()}"
                )
            with contextlib.suppress(OSError):
                if self.request("GET", "/v1/models", timeout=5).status == 200:
                    return
            time.sleep(0.1)
        raise Lora2ggufError(
            f"{self.options.model}: the server was not ready after {self.startup_timeout:.0f} s; its log "
            f"({self.log_path}) ends:\n{self.log_tail()}"
        )

    def request(self, method: str, path: str, body: dict[str, Any] | bytes | None = None, *, api_key: Any = _KEEP,
                timeout: float | None = None) -> Reply:
        """One HTTP request; any status comes back (no exception for 4xx/5xx). ``body``: a dict sent as
        JSON, or raw bytes (malformed JSON on purpose). ``api_key``: None sends none, a string that key."""
        key = self.api_key if api_key is _KEEP else api_key
        data = json.dumps(body).encode("utf-8") if isinstance(body, dict) else body
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.request_timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        text = raw.decode("utf-8", errors="replace")
        try:
            return Reply(status, json.loads(text))
        except json.JSONDecodeError:
            return Reply(status, text)

    def post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST JSON and return the JSON answer; an HTTP error raises ServerHTTPError."""
        reply = self.request("POST", path, payload)
        if reply.status >= 400:
            raise ServerHTTPError(f"{self.url}{path}", reply.status, reply.body)
        return reply.body

    def chat(self, messages: list[dict[str, Any]], **params: Any) -> dict[str, Any]:
        """POST /v1/chat/completions with ``messages`` and the sampling ``params`` (max_tokens, ...)."""
        return self.post("/v1/chat/completions", {"messages": messages, **params})

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def stop(self, timeout: float = 10.0) -> float:
        """SIGTERM, wait up to ``timeout`` s, SIGKILL as a last resort; the seconds it took to end."""
        atexit.unregister(self.stop)
        if self.process is None or self.process.poll() is not None:
            return 0.0
        start = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning(
                "%s did not end within %.0f s of SIGTERM: killed; its log: %s", self.backend, timeout, self.log_path
            )
            self.process.kill()
            self.process.wait()
            return time.monotonic() - start
        if self._own_log:
            self.log_path.unlink(missing_ok=True)
        return time.monotonic() - start

    def __enter__(self) -> RunningServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
