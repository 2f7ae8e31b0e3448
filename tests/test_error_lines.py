"""One error line everywhere: every expected failure ends in one ``error: <file>: <problem>`` line and
exit status 2, a bug in a traceback plus one line saying so and exit status 1.

Each case goes through the `lora2gguf` command with a really damaged input and checks the exit status,
the one error line naming the file, that every input is byte-identical afterwards and that nothing is
left (no output, no temporary sibling, no folder the command created). `compare` is also checked to
survive a GGUF file that makes llama.cpp abort: the other files are still scored.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import assert_nothing_at, one_error_message, refused, run_cli

from lora2gguf.artifacts import sha256_file
from lora2gguf.cli import main

PROMPTS = json.dumps([{"id": "hello", "text": "I feel lonely at university. What can I do?"}])
GENERATION = json.dumps({"max_new_tokens": 2})


# -- GGUF files damaged in place --------------------------------------------------------------------
def patch_gguf(src: Path, dst: Path, edit: Callable[[Any, bytearray], None]) -> Path:
    """Copy ``src`` to ``dst`` with ``edit(reader, bytes)`` applied (same length, so every offset holds)."""
    import gguf

    data = bytearray(src.read_bytes())
    edit(gguf.GGUFReader(src), data)
    dst.write_bytes(bytes(data))
    return dst


def _value_offset(reader: Any, key: str, part: int) -> int:
    field = reader.fields[key]
    return field.offset + sum(p.nbytes for p in field.parts[:part])


def set_uint32(key: str, value: int) -> Callable[[Any, bytearray], None]:
    def edit(reader: Any, data: bytearray) -> None:
        offset = _value_offset(reader, key, -1)
        data[offset : offset + 4] = struct.pack("<I", value)

    return edit


def huge_count(which: str) -> Callable[[Any, bytearray], None]:
    """2**60 tensors, metadata keys or elements of the token type (or token string) array, in a file
    of a few MiB."""

    def edit(reader: Any, data: bytearray) -> None:
        if which in ("array", "strings"):
            key = "tokenizer.ggml.token_type" if which == "array" else "tokenizer.ggml.tokens"
            offset = _value_offset(reader, key, 4)  # key len, key, type, item type
        else:
            offset = {"tensors": 8, "keys": 16}[which]
        data[offset : offset + 8] = struct.pack("<Q", 2**60)

    return edit


def crashes_llama_cpp(path: Path) -> int:
    """The exit status of a bare process that loads ``path`` in llama.cpp (negative: killed by a signal)."""
    code = (
        "import sys, llama_cpp\n"
        "llama_cpp.Llama(model_path=sys.argv[1], n_ctx=32, n_threads=1, verbose=False).eval([1, 2])\n"
    )
    env = dict(os.environ, GGML_NO_BACKTRACE="1")
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, env=env, timeout=120).returncode


def compare_argv(reference: Path, ggufs: list[Path], eval_text: Path, out: Path) -> list[str]:
    return ["compare", "--reference", str(reference), *[a for g in ggufs for a in ("--gguf", str(g))],
            "--eval-text", str(eval_text), "--max-tokens", "32", "--context", "32", "--prompts", PROMPTS,
            "--max-new-tokens", "2", "--threads", "1", "--speed-repeats", "1", "--out", str(out)]  # fmt: skip


def test_compare_survives_a_gguf_that_crashes_llama_cpp(
    tmp_path: Path, tiny_base: Path, f16_gguf: Path, eval_text: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """block_count 0: llama.cpp's GGML_ASSERT(n_layer > 0) aborts the whole process while loading.
    Next to it a file llama.cpp refuses cleanly (3 heads do not divide 256) and a good one."""
    import gguf
    import psutil

    arch = gguf.GGUFReader(f16_gguf).fields["general.architecture"].contents()
    good = Path(shutil.copy(f16_gguf, tmp_path / "inputs" / "good.gguf"))
    bad = patch_gguf(f16_gguf, tmp_path / "inputs" / "bad.gguf", set_uint32(f"{arch}.block_count", 0))
    declined = patch_gguf(f16_gguf, tmp_path / "inputs" / "refused.gguf", set_uint32(f"{arch}.attention.head_count", 3))
    assert crashes_llama_cpp(bad) < 0, "llama.cpp no longer crashes on this file: pick another"
    out = tmp_path / "results" / "compare_models.json"
    argv = compare_argv(tiny_base, [bad, good, declined], eval_text, out)
    line = refused(capsys, [tiny_base, good, bad, declined, eval_text], *argv)  # inputs unchanged
    assert line.startswith(f"{bad}: llama.cpp crashed (SIGABRT)") and "GGML_ASSERT" in line, line
    assert f"1 more file(s) not scored: {declined}" in line and str(out) in line, line
    # The report keeps the good file's scores and says which files failed and why.
    report = json.loads(out.read_text(encoding="utf-8"))
    assert [m["file"] for m in report["models"]] == [str(good)]
    assert report["models"][0]["kl_divergence"]["mean"] < 1e-3
    failed = {f["file"]: f for f in report["failed"]}
    assert list(failed) == [str(bad), str(declined)]
    assert failed[str(bad)]["llama_cpp_crashed"] and "SIGABRT" in failed[str(bad)]["error"]
    assert failed[str(bad)]["sha256"] == sha256_file(bad)
    assert not failed[str(declined)]["llama_cpp_crashed"]
    assert "cannot load this file" in failed[str(declined)]["error"] and "wrong shape" in failed[str(declined)]["error"]
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temporary sibling
    assert not psutil.Process().children(recursive=True), "a llama.cpp child process was left running"


def test_a_segfault_in_the_child_is_an_error_naming_the_file() -> None:
    """The other way llama.cpp dies: a bad pointer. No GGUF found that makes 0.3.36 segfault, so the
    child reads address 0 itself."""
    import ctypes

    from lora2gguf.llamacpp import LlamaCrash, run_isolated

    with pytest.raises(LlamaCrash, match=r"^/data/model\.gguf: llama\.cpp crashed \(SIGSEGV\)"):
        run_isolated(Path("/data/model.gguf"), ctypes.string_at, 0)
    assert run_isolated(Path("/data/model.gguf"), os.path.join, "a", "b") == os.path.join("a", "b")


@pytest.mark.parametrize("which", ["tensors", "keys", "array"])
def test_compare_refuses_huge_counts_in_a_gguf(
    tmp_path: Path, tiny_base: Path, f16_gguf: Path, eval_text: Path, capsys: pytest.CaptureFixture[str], which: str
) -> None:
    bad = patch_gguf(f16_gguf, tmp_path / "inputs" / "huge.gguf", huge_count(which))
    out = tmp_path / "results" / "compare_models.json"
    line = refused(capsys, [tiny_base, bad, eval_text], *compare_argv(tiny_base, [bad], eval_text, out))
    assert line.startswith(f"{bad}: "), line
    expected = {"tensors": "declares 1152921504606846976 tensors", "keys": "1152921504606846976 metadata keys",
                "array": "tokenizer.ggml.token_type"}[which]  # fmt: skip
    assert expected in line, line
    assert_nothing_at(out)
    assert not out.parent.exists()



@pytest.mark.parametrize("which", ["tensors", "keys", "array", "strings", "imatrix"])
def test_quantize_refuses_huge_counts_in_a_gguf(
    tmp_path: Path, f16_gguf: Path, capsys: pytest.CaptureFixture[str], which: str
) -> None:
    """The one GGUF reader bounds every declared count by the file size, for quantize's model and
    imatrix alike: one line saying what the header declares, nothing allocated, nothing written."""
    import numpy as np

    from lora2gguf.formats.imatrix import Imatrix, ImatrixEntry, write_imatrix

    (tmp_path / "inputs").mkdir()
    src, extra = f16_gguf, []
    if which == "imatrix":
        good = tmp_path / "inputs" / "good-imatrix.gguf"
        write_imatrix(good, Imatrix({"blk.0.attn_q.weight": ImatrixEntry(np.ones((1, 64), np.float32),
                                                                         np.ones(1, np.float32))}, ["t"], 1, 8))
        bad = patch_gguf(good, tmp_path / "inputs" / "imatrix.gguf", huge_count("tensors"))
        extra = ["--imatrix", str(bad)]
    else:
        bad = src = patch_gguf(f16_gguf, tmp_path / "inputs" / "huge.gguf", huge_count(which))
    out = tmp_path / "out" / "model-q8_0.gguf"
    line = refused(capsys, [src, bad], "quantize", src, out, "Q8_0", "--threads", "1", *extra)
    expected = {"tensors": "declares 1152921504606846976 tensors", "keys": "1152921504606846976 metadata keys",
                "array": "metadata key tokenizer.ggml.token_type declares 1152921504606846976 array elements",
                "strings": "metadata key tokenizer.ggml.tokens declares 1152921504606846976 array elements",
                "imatrix": "declares 1152921504606846976 tensors"}[which]  # fmt: skip
    assert line.startswith(f"{bad}: corrupt GGUF header: ") and expected in line, line
    assert "truncated" not in line, line
    assert_nothing_at(out, out.with_suffix(".json"))
    assert not out.parent.exists()

# -- corrupt safetensors given to test and imatrix ----------------------------------------------------
def damage_weights(src: Path, dst: Path, damage: str) -> Path:
    model = shutil.copytree(src, dst)
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncated":
        data = data[: len(data) * 2 // 3]
    else:  # a bit flip in transit: the JSON header turns to garbage
        data[8:72] = b"\xff" * 64
    weights.write_bytes(bytes(data))
    return model


def step_argv(command: str, model: Path, tmp_path: Path) -> tuple[list[str], list[Path], list[Path]]:
    """(argv, extra inputs, outputs) of `test` or `imatrix` on ``model``."""
    if command == "test":
        out = tmp_path / "results" / "merged_model_test.json"
        argv = ["test", "--model", str(model), "--prompts", PROMPTS, "--generation", GENERATION,
                "--device", "cpu", "--out", str(out)]  # fmt: skip
        return argv, [], [out]
    from lora2gguf.demo.dataset import render_text

    text = tmp_path / "inputs" / "calibration.txt"
    text.parent.mkdir(exist_ok=True)
    text.write_text(render_text("train"), encoding="utf-8")
    out = tmp_path / "gguf" / "imatrix.gguf"
    argv = ["imatrix", "--model", str(model), "--text", str(text), "--out", str(out), "--device", "cpu"]
    return argv, [text], [out, out.with_suffix(".json")]


@pytest.mark.parametrize("damage", ["truncated", "garbage-header"])
@pytest.mark.parametrize("command", ["test", "imatrix"])
def test_corrupt_safetensors_is_named(
    tmp_path: Path, tiny_base: Path, capsys: pytest.CaptureFixture[str], command: str, damage: str
) -> None:
    model = damage_weights(tiny_base, tmp_path / "inputs" / "model", damage)
    argv, extra, outputs = step_argv(command, model, tmp_path)
    line = refused(capsys, [model, *extra], *argv)
    expected = "truncated" if damage == "truncated" else "corrupt safetensors header"
    assert line.startswith(f"{model / 'model.safetensors'}: ") and expected in line, line
    assert_nothing_at(*outputs)
    assert not outputs[0].parent.exists()


# -- chat templates -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ raise_exception('no system turn allowed') }}", "TemplateError: no system turn allowed"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "stopped by jinja2's sandbox"),
        ("{% for message in messages %}{{ message.content }}", "TemplateSyntaxError"),  # no endfor
    ],
    ids=["raises", "sandbox", "syntax"],
)
def test_chat_template_that_fails_is_named(
    tmp_path: Path, tiny_base: Path, capsys: pytest.CaptureFixture[str], template: str, expected: str
) -> None:
    model = shutil.copytree(tiny_base, tmp_path / "inputs" / "model")
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] = template
    config_path.write_text(json.dumps(config), encoding="utf-8")
    argv, _, outputs = step_argv("test", model, tmp_path)
    line = refused(capsys, [model], *argv)
    assert line.startswith(f"{config_path}: ") and expected in line, line
    assert_nothing_at(*outputs)
    assert not outputs[0].parent.exists()


# -- manifest and reports -----------------------------------------------------------------------------
@pytest.mark.parametrize("value", [None, "abc123", 7])
def test_verify_refuses_a_manifest_without_a_usable_checksum(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: Any
) -> None:
    artifact = tmp_path / "results" / "report.json"
    artifact.parent.mkdir()
    artifact.write_text("{}\n", encoding="utf-8")
    manifest = tmp_path / "results" / "manifest.json"
    assert main(["manifest", "--model", "m", "--output", str(artifact), "--out", str(manifest)]) == 0
    data = json.loads(manifest.read_text(encoding="utf-8"))
    data["outputs"][0]["sha256"] = value
    manifest.write_text(json.dumps(data), encoding="utf-8")
    verdict = tmp_path / "verdict" / "verify.json"
    line = refused(capsys, [manifest, artifact], "verify", manifest, "--json", verdict)
    assert line.startswith(f"{manifest}: outputs[0].sha256 ({artifact.as_posix()})") and repr(value) in line, line
    assert_nothing_at(verdict)
    assert not verdict.parent.exists()


def _comparison(**changes: Any) -> str:
    """compare_models.json with one model that draws every plot, ``changes`` applied to that model
    (None removes a key)."""
    model = {"label": "Q8_0", "size_bytes": 2**20, "bits_per_weight": 8.5, "kl_divergence": {"mean": 0.01, "p99": 0.1},
             "perplexity": 10.1, "perplexity_ratio": 1.01,
             "speed": {"prompt_tokens_per_s": 100.0, "generation_tokens_per_s": 20.0, "threads": 2}}  # fmt: skip
    model.update(changes)
    model = {k: v for k, v in model.items() if v is not None}
    settings = {"positions_scored": 10, "tokens_scored": 10, "speed_prompt_tokens": 8}
    return json.dumps({"reference": {"perplexity": 10.0}, "settings": settings, "models": [model]})


_CANDIDATE = '{"metric": "eval_loss", "mode": "min", "best": "a", "ranking": ["a"], "candidates": {"a": %s}}'


@pytest.mark.parametrize(
    ("plot", "text", "problem"),
    [
        ("comparison", '{"models": [{"label": "F16"', "not valid JSON"),  # cut short: not JSON at all
        ("comparison", '{"models": "F16"}', "malformed report"),
        ("comparison", "[]", "not a JSON object (the top level is a list)"),
        ("comparison", '{"models": []}', "key 'models' is missing or empty"),
        ("comparison", _comparison().replace('{"perplexity": 10.0}', "[10.0]"), "malformed report"),
        ("comparison", _comparison(perplexity="10.1"), "malformed report"),  # a string where a number belongs
        ("comparison", _comparison(speed=None), "missing or malformed key 'speed'"),  # only the last plot fails
        ("candidates", '["eval_loss"]', "not a JSON object (the top level is a list)"),
        ("candidates", '{"metric": "eval_loss", "ranking": "ab"}', "missing or malformed key"),
        ("candidates", _CANDIDATE % '{"metrics": [1]}', "malformed report"),
        ("candidates", _CANDIDATE % '{"metrics": {"eval_loss": "1.2"}, "curves": {}}', "malformed report"),
    ],
    ids=["cut-short", "models-not-a-list", "top-level-list", "no-models", "reference-a-list", "string-for-number",
         "last-plot-fails", "candidates-top-level-list", "ranking-not-a-list", "metrics-not-a-mapping",
         "candidates-string-for-number"],  # fmt: skip
)
def test_plot_refuses_a_malformed_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], plot: str, text: str, problem: str
) -> None:
    report = tmp_path / "inputs" / "report.json"
    report.parent.mkdir()
    report.write_text(text, encoding="utf-8")
    plots = tmp_path / "plots"
    if plot == "comparison":
        argv = ["plot", "comparison", "--compare", report, "--model", "m", "--out-dir", plots]
    else:
        argv = ["plot", "candidates", "--analysis", report, "--out", plots / "c.png"]
    line = refused(capsys, [report], *argv)
    assert line.startswith(f"{report}: {problem}"), line
    assert not plots.exists()



def test_plot_comparison_write_failure_leaves_no_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The disk fills up while the last of the three plots is written: the two written before it go too."""
    import errno

    from matplotlib.figure import Figure

    report = tmp_path / "inputs" / "compare_models.json"
    report.parent.mkdir()
    report.write_text(_comparison(), encoding="utf-8")
    savefig, calls = Figure.savefig, []

    def full_on_the_third(fig: Any, path: Any, **kwargs: Any) -> None:
        calls.append(path)
        if len(calls) == 3:
            Path(path).write_bytes(b"\x89PNG half")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        savefig(fig, path, **kwargs)

    monkeypatch.setattr(Figure, "savefig", full_on_the_third)
    plots = tmp_path / "plots"
    argv = ["plot", "comparison", "--compare", str(report), "--model", "m", "--out-dir", str(plots)]
    line = refused(capsys, [report], *argv)
    assert len(calls) == 3
    assert "no space left on device" in line, line
    assert not plots.exists()

# -- the command line's own net -------------------------------------------------------------------------
def _raise(exc: BaseException) -> Callable[..., Any]:
    def step(*_: Any, **__: Any) -> Any:
        raise exc

    return step


def _verify_with_step_raising(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], exc: BaseException
) -> tuple[int, str]:
    """`lora2gguf verify` whose step raises ``exc``: what the command line makes of it."""
    import lora2gguf.commands.verify as command

    monkeypatch.setattr(command, "verify", _raise(exc))
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}", encoding="utf-8")
    return run_cli(capsys, "verify", str(manifest))


def test_unexpected_exception_is_reported_as_a_bug(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    status, log = _verify_with_step_raising(tmp_path, monkeypatch, capsys, RuntimeError("the step broke"))
    assert status == 1
    assert "Traceback (most recent call last)" in log and "RuntimeError: the step broke" in log, log
    assert "error: " not in log
    last = log.strip().splitlines()[-1]
    assert "this is a bug in lora2gguf" in last and "please report it" in last, last


def _foreign_errors() -> list[tuple[BaseException, str]]:
    import jinja2
    from safetensors import SafetensorError

    return [
        (PermissionError(13, "Permission denied", "/data/model.gguf"), "/data/model.gguf: Permission denied"),
        (FileNotFoundError(2, "No such file or directory", "/data/a", None, "/data/b"), "/data/a -> /data/b: No such"),
        (SafetensorError("header too small"), "a safetensors file cannot be read: SafetensorError: header too small"),
        (jinja2.exceptions.SecurityError("unsafe"), "a chat template cannot be rendered: SecurityError: unsafe"),
        (json.JSONDecodeError("Expecting value", "{", 1), "not valid JSON (line 1, column 2: Expecting value)"),
    ]


@pytest.mark.parametrize("case", range(5), ids=["oserror", "oserror-two-files", "safetensors", "jinja2", "json"])
def test_expected_errors_that_slip_through_still_get_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], case: int
) -> None:
    """The steps convert these where they happen; the command line is the net for the rest."""
    exc, expected = _foreign_errors()[case]
    status, log = _verify_with_step_raising(tmp_path, monkeypatch, capsys, exc)
    assert status == 2
    assert one_error_message(log).startswith(expected), log


def test_interrupt_exits_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    status, log = _verify_with_step_raising(tmp_path, monkeypatch, capsys, KeyboardInterrupt())
    assert status == 130 and "interrupted" in log and "Traceback" not in log
