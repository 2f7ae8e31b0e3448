"""The one wrapper around llama.cpp (through llama-cpp-python), shared by the evaluation and deploy steps.

We feed token ids, never text, so llama.cpp sees exactly what PyTorch saw, and we read raw logits
and pick tokens ourselves (argmax), bypassing llama-cpp-python's sampler chain so greedy decoding
means the same thing on both sides.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from lora2gguf.errors import Lora2ggufError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Lines llama.cpp prints when it gives up, most telling first: a failed assertion, an uncaught C++
# exception, an error message.
_CRASH_LINES = (re.compile(r"GGML_ASSERT|GGML_ABORT|terminate called|what\(\)"), re.compile(r"error", re.IGNORECASE))
# Set in the child's environment: there llama.cpp's own log goes to stderr (captured by the parent,
# which needs its last words after a crash) instead of being silenced.
_CHILD_ENV = "LORA2GGUF_LLAMA_CHILD"


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise Lora2ggufError(
            "llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36); "
            f"it runs the GGUF files: {exc}"
        ) from None
    return llama_cpp


@dataclass
class Perf:
    """llama.cpp's own timers (llama_perf_context): compute time only, no Python overhead."""

    prompt_tokens: int
    prompt_ms: float
    generated_tokens: int
    generation_ms: float


@dataclass
class GreedyResult:
    tokens: list[int]
    prompt_seconds: float  # wall clock, evaluating the prompt
    generation_seconds: float  # wall clock, the single-token steps after the first token


class LlamaRuntime:
    """One GGUF file loaded in llama.cpp on the CPU.

    logits_all=True keeps every position's logits (needed for perplexity/KL) at the cost of an
    output-layer product per position; speed is therefore measured on a separate instance opened with
    logits_all=False.
    """

    def __init__(self, path: Path, *, n_ctx: int, n_threads: int, logits_all: bool, flash_attn: bool = False,
                 lora: Path | None = None, lora_scale: float = 1.0) -> None:
        llama_cpp = _llama_cpp()
        if not Path(path).is_file():
            raise Lora2ggufError(f"{path}: GGUF file not found")
        if lora is not None and not Path(lora).is_file():
            raise Lora2ggufError(f"{lora}: LoRA adapter GGUF file not found")
        self.path = Path(path)
        self.n_threads = n_threads
        self.logits_all = logits_all
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=min(n_ctx, 512),
                n_threads=n_threads,
                n_threads_batch=n_threads,
                n_gpu_layers=0,
                logits_all=logits_all,
                # llama-cpp-python's default (off); llama-server's default on CPU is on, and greedy
                # answers of a 4-bit model can part where two tokens nearly tie
                flash_attn=flash_attn,
                # a LoRA adapter GGUF applied on top at lora_scale (llama_set_adapters_lora)
                lora_path=None if lora is None else str(lora),
                lora_scale=lora_scale,
                no_perf=False,
                # In run_isolated's child llama.cpp may talk: its log is what explains a crash.
                verbose=os.environ.get(_CHILD_ENV) == "1",
            )
        except (ValueError, RuntimeError) as exc:
            raise Lora2ggufError(f"{path}: llama.cpp cannot load this file: {exc}") from exc
        self._lib = llama_cpp

    # -- facts about the loaded model ---------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return int(self.llm.n_vocab())

    @property
    def n_ctx(self) -> int:
        return int(self.llm.n_ctx())

    def model_size_bytes(self) -> int:
        """Bytes of all tensors as llama.cpp counts them (llama_model_size)."""
        return int(self._lib.llama_model_size(self.llm.model))

    def n_params(self) -> int:
        return int(self._lib.llama_model_n_params(self.llm.model))

    def system_info(self) -> str:
        return self._lib.llama_print_system_info().decode("utf-8", "replace").strip()

    # -- evaluation -----------------------------------------------------------------------------
    def _check_ids(self, ids: list[int]) -> None:
        if len(ids) > self.n_ctx:
            raise Lora2ggufError(f"{self.path}: {len(ids)} tokens exceed the context of {self.n_ctx}")
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise Lora2ggufError(
                f"{self.path}: token id {bad[0]} is outside the GGUF vocabulary of {self.n_vocab} "
                "(tokenizer and GGUF disagree)"
            )

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits at every position of ``ids`` (fresh context), float32 (positions, vocabulary)."""
        if not self.logits_all:
            raise RuntimeError("logits() needs an instance opened with logits_all=True")
        self._check_ids(ids)
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32, copy=True)

    def _last_logits(self) -> np.ndarray:
        pointer = self._lib.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def greedy(self, ids: list[int], max_new_tokens: int, stop_ids: list[int]) -> GreedyResult:
        """Argmax decoding from a fresh context; a stop token ends it and is kept."""
        self._check_ids(ids)
        if len(ids) + max_new_tokens > self.n_ctx:
            raise Lora2ggufError(
                f"{self.path}: prompt {len(ids)} + {max_new_tokens} new tokens exceed the context {self.n_ctx}"
            )
        stop = set(stop_ids)
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(ids)
        token = int(np.argmax(self._last_logits()))
        prompt_seconds = time.perf_counter() - start
        out = [token]
        start = time.perf_counter()
        while token not in stop and len(out) < max_new_tokens:
            self.llm.eval([token])
            token = int(np.argmax(self._last_logits()))
            out.append(token)
        return GreedyResult(out, prompt_seconds, time.perf_counter() - start)

    def time_prompt(self, ids: list[int]) -> float:
        """Wall-clock seconds to evaluate ``ids`` as one prompt from a fresh context."""
        self._check_ids(ids)
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(ids)
        self._last_logits()  # reading logits synchronises the backend
        return time.perf_counter() - start

    # -- llama.cpp's timers -----------------------------------------------------------------------
    def perf_reset(self) -> None:
        self._lib.llama_perf_context_reset(self.llm.ctx)

    def perf(self) -> Perf:
        data = self._lib.llama_perf_context(self.llm.ctx)
        return Perf(int(data.n_p_eval), float(data.t_p_eval_ms), int(data.n_eval), float(data.t_eval_ms))

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> LlamaRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- isolation: llama.cpp in a child process ----------------------------------------------------
class LlamaCrash(Lora2ggufError):
    """llama.cpp killed the child process that had a GGUF file loaded (SIGSEGV, SIGABRT, ...)."""


def _last_words(stderr: str) -> str | None:
    """The line of llama.cpp's output that says why it gave up (a failed assertion, an error), without
    the build path; None when it printed no such line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    found = (line for pattern in _CRASH_LINES for line in reversed(lines) if pattern.search(line))
    line = next(found, None)
    return None if line is None else " ".join(re.sub(r"^\S*/", "", line).split())[:300]


def _signal_name(status: int) -> str:
    try:
        return signal.Signals(-status).name
    except ValueError:
        return f"signal {-status}"


def _exchange(request: Any, stderr: Any) -> tuple[bytes, int]:
    """Start the child, stream the pickled request to it, read its reply; (reply, exit status)."""
    env = dict(os.environ, GGML_NO_BACKTRACE="1", **{_CHILD_ENV: "1"})  # GGML_NO_BACKTRACE: no gdb attaching
    cmd = [sys.executable, "-m", "lora2gguf.llamacpp"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        try:
            pickle.dump(request, proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            proc.stdin.close()
        except BrokenPipeError:
            pass  # the child died while reading: its exit status says how
        reply = proc.stdout.read()
        return reply, proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_isolated(path: Path, func: Callable[..., T], *args: Any) -> T:
    """``func(*args)`` in a child Python process that is the only one to load ``path`` in llama.cpp.

    A file llama.cpp cannot cope with may kill its process (a failed GGML_ASSERT aborts, a bad
    pointer segfaults) rather than raise; in the child that costs only that file: it becomes a
    LlamaCrash naming the file, the signal and llama.cpp's last words. A Lora2ggufError in the
    child is raised again here; any other exception is a bug and comes back as RuntimeError.
    ``func`` and ``args`` must pickle (a module-level function, plain data and numpy arrays).
    """
    # An anonymous temporary file: nothing to clean up even if this process is killed.
    with tempfile.TemporaryFile() as stderr:
        reply, status = _exchange((func, args), stderr)
        stderr.seek(0)
        said = stderr.read().decode("utf-8", "replace")
    if status == -signal.SIGINT:
        raise KeyboardInterrupt
    if status < 0:
        logger.debug("%s: the llama.cpp child process said:\n%s", path, said)
        why = _last_words(said) or "llama.cpp printed no reason"
        raise LlamaCrash(f"{path}: llama.cpp crashed ({_signal_name(status)}) with this file: {why}")
    if status != 0 or not reply:
        raise RuntimeError(f"the llama.cpp child process for {path} exited with status {status}:\n{said[-3000:]}")
    kind, value = pickle.loads(reply)
    logger.debug("%s: the llama.cpp child process said:\n%s", path, said)
    if kind == "error":
        why = _last_words(said)  # llama-cpp-python's "Failed to load model" does not say why; llama.cpp did
        raise Lora2ggufError(f"{value} ({why})" if why and why not in value else value)
    if kind == "bug":
        raise RuntimeError(f"in the llama.cpp child process for {path}:\n{value}")
    return value


def _child_main() -> int:
    """The child's side of run_isolated: read (func, args) on stdin, answer on the original stdout."""
    reply = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever llama.cpp prints to stdout must not mix with the reply
    sys.stdout = sys.stderr
    func, args = pickle.load(sys.stdin.buffer)
    try:
        answer: tuple[str, Any] = ("ok", func(*args))
    except Lora2ggufError as exc:
        answer = ("error", str(exc))
    except Exception:  # noqa: BLE001 - handed to the parent, which reports it as a bug
        answer = ("bug", traceback.format_exc())
    with reply:
        pickle.dump(answer, reply, protocol=pickle.HIGHEST_PROTOCOL)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
