"""Hostile output paths through the `lora2gguf` command: outputs never touch inputs, and a failed
command leaves nothing behind (issue 15, items 1 and 5).

Every refusal is checked the same way: exit status 2, exactly one `error:` line naming the path and
the problem, and the whole test folder (inputs, would-be outputs, temporary siblings, parent folders)
identical before and after, file by file and hash by hash.

The tests run as root, which ignores file permissions: a read-only folder is made as a read-only
tmpfs mount (or, where mounting is refused, an immutable folder via chattr +i), and /proc stands for a
folder that refuses new files whatever the permissions say.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import copy_with_bad_value, refused, tree_state

from lora2gguf import artifacts
from lora2gguf.artifacts import atomic_dir, atomic_file
from lora2gguf.cli import main
from lora2gguf.demo.dataset import render_text
from lora2gguf.errors import Lora2ggufError


@pytest.fixture
def work(tmp_path: Path, tiny_base: Path, tiny_run: Path, f16_gguf: Path) -> Path:
    """A folder holding copies of every input, so that the tree check covers them."""
    shutil.copytree(tiny_base, tmp_path / "base")
    shutil.copytree(tiny_run, tmp_path / "run")
    shutil.copyfile(f16_gguf, tmp_path / "model.gguf")
    (tmp_path / "eval.txt").write_text(render_text("eval"), encoding="utf-8")
    (tmp_path / "analysis.json").write_text(json.dumps({"ranking": []}), encoding="utf-8")
    return tmp_path


def merge_argv(work: Path, out: Path, *extra: str | Path) -> list[str | Path]:
    return ["merge", "--base", work / "base", "--adapter", work / "run", "--out", out,
            "--eval-text", work / "eval.txt", "--device", "cpu", *extra]  # fmt: skip


# --- 1. outputs never touch inputs ------------------------------------------------------------------


def test_merge_into_the_folder_holding_its_inputs(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The probe that found the bug: --out DIR, DIR holding base and adapter, used to delete all of DIR."""
    line = refused(capsys, work, *merge_argv(work, work))
    assert line.startswith(f"{work}: --out holds the input --base ({work / 'base'})"), line


def test_merge_into_a_folder_that_is_not_a_previous_merge(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = work / "models" / "m-merged"
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")  # merge-shaped so far ...
    (out / "notes.txt").write_text("mine")  # ... but this would be deleted with the folder
    line = refused(capsys, work, *merge_argv(work, out))
    assert line.startswith(f"{out}: --out is an existing folder that is not a previous merge output"), line
    assert "'notes.txt'" in line, line


@pytest.mark.parametrize("where", ["base", "out"])
def test_merge_report_inside_an_input_or_the_output(
    work: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    out = work / "models" / "m-merged"
    report = (work / "base" if where == "base" else out) / "merge_report.json"
    line = refused(capsys, work, *merge_argv(work, out, "--report", report))
    expected = "lies inside the input folder --base" if where == "base" else f"--report lies inside --out ({out})"
    assert line.startswith(f"{report}: ") and expected in line, line


def _argv_for(case: str, work: Path) -> tuple[list[str | Path], str]:
    """(argv, the start of the expected message) for a report / sidecar / output that is an input."""
    gguf, base, run = work / "model.gguf", work / "base", work / "run"
    cases: dict[str, tuple[list[str | Path], str]] = {
        "quantize --sidecar IN": (
            ["quantize", gguf, work / "q.gguf", "Q8_0", "--sidecar", gguf],
            f"{gguf}: --sidecar is the same file as the input IN.gguf ({gguf})",
        ),
        "quantize OUT.json": (
            ["quantize", gguf, work / "q.json", "Q8_0"],
            f"{work / 'q.json'}: the sidecar (OUT with .json suffix) is the same path as OUT.gguf",
        ),
        "convert --report OUT": (
            ["convert", base, work / "f16.gguf", "--report", work / "f16.gguf"],
            f"{work / 'f16.gguf'}: --report is the same path as OUT.gguf",
        ),
        "convert OUT in IN_DIR": (
            ["convert", base, base / "model.gguf"],
            f"{base / 'model.gguf'}: OUT.gguf lies inside the input folder IN_DIR ({base})",
        ),
        "imatrix --report in --model": (
            ["imatrix", "--model", base, "--text", work / "eval.txt", "--out", work / "imatrix.gguf",
             "--report", base / "config.json"],
            f"{base / 'config.json'}: --report lies inside the input folder --model",
        ),
        "rank --out in a run": (
            ["rank", "--candidate", "a", run, base, "--out", run / "trainer_state.json"],
            f"{run / 'trainer_state.json'}: --out lies inside the input folder RUN_DIR of a",
        ),
        "test --out = --model": (
            ["test", "--model", base, "--out", base, "--device", "cpu"],
            f"{base}: --out is the same folder as the input --model",
        ),
        "compare --out = --gguf": (
            ["compare", "--reference", base, "--gguf", gguf, "--eval-text", work / "eval.txt", "--out", gguf],
            f"{gguf}: --out is the same file as the input --gguf",
        ),
        "manifest --out = --output": (
            ["manifest", "--model", "m", "--input", f"base={base}", "--output", gguf, "--out", gguf],
            f"{gguf}: --out is the same file as the input --output",
        ),
        "verify --json = MANIFEST": (
            ["verify", work / "analysis.json", "--json", work / "analysis.json"],
            f"{work / 'analysis.json'}: --json is the same file as the input MANIFEST",
        ),
        "plot --out = --analysis": (
            ["plot", "candidates", "--analysis", work / "analysis.json", "--out", work / "analysis.json"],
            f"{work / 'analysis.json'}: --out is the same file as the input --analysis",
        ),
        "demo train --out holds --base": (
            ["demo", "train", "--base", base, "--out", work],
            f"{work}: --out holds the input --base ({base})",
        ),
    }
    return cases[case]


@pytest.mark.parametrize(
    "case",
    [
        "quantize --sidecar IN", "quantize OUT.json", "convert --report OUT", "convert OUT in IN_DIR",
        "imatrix --report in --model", "rank --out in a run", "test --out = --model", "compare --out = --gguf",
        "manifest --out = --output", "verify --json = MANIFEST", "plot --out = --analysis",
        "demo train --out holds --base",
    ],
)  # fmt: skip
def test_an_output_equal_to_or_inside_an_input(work: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    argv, expected = _argv_for(case, work)
    line = refused(capsys, work, *argv)
    assert line.startswith(expected), line


def test_quantize_input_named_like_the_default_sidecar(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """OUT.gguf's default sidecar is OUT.json: an input of that name used to be overwritten with JSON."""
    src = work / "model-q8_0.json"
    shutil.copyfile(work / "model.gguf", src)
    line = refused(capsys, work, "quantize", src, work / "model-q8_0.gguf", "Q8_0")
    assert line.startswith(f"{src}: the sidecar (OUT with .json suffix) is the same file as the input IN.gguf"), line


def test_an_output_through_a_symlink_to_an_input(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    link = work / "link.json"
    link.symlink_to(work / "model.gguf")
    line = refused(capsys, work, "quantize", work / "model.gguf", work / "q.gguf", "Q8_0", "--sidecar", link)
    assert line.startswith(f"{link}: --sidecar is the same file as the input IN.gguf"), line


def test_verify_json_onto_a_file_the_manifest_lists(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = work / "results" / "manifest.json"
    argv = ["manifest", "--model", "m", "--input", f"base={work / 'base'}", "--output", str(work / "model.gguf"),
            "--out", str(manifest)]  # fmt: skip
    assert main(argv) == 0
    line = refused(capsys, work, "verify", manifest, "--json", work / "base" / "config.json")
    assert line.startswith(f"{work / 'base' / 'config.json'}: --json is the same file as the input listed in"), line


# --- outputs the file system cannot take ----------------------------------------------------------------


@pytest.mark.parametrize("command", ["convert", "quantize", "plot"])
def test_output_is_an_existing_folder(work: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    folder = work / "out.gguf"
    (folder / "keep").mkdir(parents=True)
    argv = {
        "convert": ["convert", work / "base", folder, "--no-progress"],
        "quantize": ["quantize", work / "model.gguf", folder, "Q8_0", "--sidecar", work / "q.json"],
        "plot": ["plot", "candidates", "--analysis", work / "analysis.json", "--out", folder],
    }[command]
    line = refused(capsys, work, *argv)
    assert line.startswith(f"{folder}: ") and "is an existing folder; a file is expected there" in line, line


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder even root cannot write to: a read-only tmpfs, else an immutable folder (chattr +i)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                             capture_output=True, check=False).returncode == 0  # fmt: skip
    if not mounted and subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False).returncode:
        pytest.skip("neither a read-only tmpfs nor chattr +i is allowed here")
    try:
        yield folder
    finally:
        cmd = ["umount", "-l", str(folder)] if mounted else ["chattr", "-i", str(folder)]
        subprocess.run(cmd, check=False)


def test_output_in_a_read_only_folder(work: Path, read_only_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = read_only_folder / "sub" / "model-q8_0.gguf"
    line = refused(capsys, work, "quantize", work / "model.gguf", out, "Q8_0", "--sidecar", work / "q.json")
    assert line.startswith(f"{out}: OUT.gguf cannot be written: the folder {read_only_folder} does not accept"), line


def test_report_in_a_folder_that_takes_no_files(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """/proc passes access checks for root but refuses new files: found before the GGUF is written."""
    sidecar = Path("/proc") / f"lora2gguf-test-{os.getpid()}.json"
    line = refused(capsys, work, "quantize", work / "model.gguf", work / "new" / "q.gguf", "Q8_0", "--sidecar", sidecar)
    assert line.startswith(f"{sidecar}: --sidecar cannot be written: the folder /proc does not accept new files"), line


def test_a_parent_of_the_output_is_a_file(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = work / "eval.txt" / "gguf" / "model.gguf"
    line = refused(capsys, work, "convert", work / "base", out, "--no-progress")
    assert line == f"{out}: OUT.gguf cannot be created: {work / 'eval.txt'} is a file, not a folder", line


@pytest.mark.parametrize("which", ["output", "input"])
def test_name_too_long(work: Path, capsys: pytest.CaptureFixture[str], which: str) -> None:
    long_name = work / ("x" * 300 + ".gguf")
    argv = (
        ["convert", work / "base", long_name, "--no-progress"]
        if which == "output"
        else ["quantize", long_name, work / "q.gguf", "Q8_0"]
    )
    line = refused(capsys, work, *argv)
    assert line.startswith(f"{long_name}: ") and "file name too long (305 bytes in one name" in line, line


# --- 5. no leftovers -------------------------------------------------------------------------------


def test_failed_write_removes_the_folders_it_created(
    work: Path, tiny_base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """convert finds an Inf while streaming: the GGUF's temporary file and the folders made for it go."""
    model, name = copy_with_bad_value(tiny_base, work / "bad", "layers.0.self_attn.q_proj.weight", (0, 0), float("inf"))
    line = refused(capsys, work, "convert", model, work / "new" / "deeper" / "model.gguf", "--no-progress")
    assert name in line and "NaN/Inf" in line, line
    assert not (work / "new").exists()


def test_atomic_helpers_name_the_output(tmp_path: Path) -> None:
    """What the up-front checks cannot see is still one message naming the output, and leaves nothing."""
    (tmp_path / "file").write_text("keep")
    (tmp_path / "folder").mkdir()
    before = tree_state(tmp_path)
    proc_file = Path("/proc") / f"lora2gguf-test-{os.getpid()}.json"
    expected = rf"^{re.escape(str(proc_file))}: cannot write it: the folder /proc does not accept new files"
    with pytest.raises(Lora2ggufError, match=expected):
        with atomic_file(proc_file) as temp:
            temp.write_text("{}")
    too_long = tmp_path / "a" / "b" / ("x" * 300)  # a and b are created, then taken away again
    with pytest.raises(Lora2ggufError, match=rf"^{re.escape(str(too_long))}: cannot write it: file name too long"):
        with atomic_dir(too_long) as temp:
            (temp / "f").write_text("x")
    with pytest.raises(Lora2ggufError, match="it is an existing file; a folder is expected there"):
        with atomic_dir(tmp_path / "file"):
            pass
    with pytest.raises(Lora2ggufError, match="it is an existing folder; a file is expected there"):
        with atomic_file(tmp_path / "folder") as temp:
            temp.write_text("x")
    assert tree_state(tmp_path) == before


def test_short_temporary_names_for_long_output_names(tmp_path: Path) -> None:
    """A 250-byte name is legal, its hidden `.NAME.tmp-PID` sibling would not be: the sibling is shortened."""
    out = tmp_path / ("y" * 250)
    with atomic_file(out) as temp:
        assert len(temp.name.encode()) <= 255
        temp.write_text("ok")
    assert out.read_text() == "ok" and sorted(p.name for p in tmp_path.iterdir()) == [out.name]


# --- reruns still replace a previous output ----------------------------------------------------------


def test_rerun_replaces_a_previous_output(work: Path) -> None:
    """Snakemake reruns a rule into the same paths: the previous merge folder, GGUF and sidecar are replaced."""
    out, report = work / "models" / "m-merged", work / "results" / "merge_report.json"
    argv = [str(a) for a in merge_argv(work, out, "--report", report)]
    assert main(argv) == 0
    first = sorted(p.name for p in out.iterdir())
    (out / ".snakemake_timestamp").touch()  # Snakemake's marker in directory() outputs
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == first  # the old folder (and its marker) replaced
    q = work / "gguf" / "model-q8_0.gguf"
    for _ in range(2):
        assert main(["quantize", str(work / "model.gguf"), str(q), "Q8_0", "--threads", "1"]) == 0
    data = work / "demo-data"
    for _ in range(2):
        assert main(["demo", "data", str(data)]) == 0
    assert sorted(p.name for p in (work / "gguf").iterdir()) == ["model-q8_0.gguf", "model-q8_0.json"]


def test_demo_output_folder_that_is_not_a_previous_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    line = refused(capsys, tmp_path, "demo", "data", out)
    assert line.startswith(f"{out}: OUT_DIR is an existing folder that is not a previous demo data output"), line


# --- 6. a report is part of its artifact's all-or-nothing step -------------------------------------


def _report_argv(command: str, work: Path) -> tuple[list[str | Path], Path, Path]:
    """(argv, artifact, report) of `merge`, `imatrix` or `quantize` on the tiny model, outputs in new folders."""
    if command == "quantize":
        out = work / "gguf" / "model-q8_0.gguf"
        return ["quantize", work / "model.gguf", out, "Q8_0"], out, out.with_suffix(".json")
    if command == "merge":
        out, report = work / "models" / "m-merged", work / "results" / "merge_report.json"
        return merge_argv(work, out, "--report", report), out, report
    out = work / "gguf" / "imatrix.gguf"
    argv = ["imatrix", "--model", work / "base", "--text", work / "eval.txt", "--out", out, "--device", "cpu"]
    return argv, out, out.with_suffix(".json")


def _disk_full_writing(report: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up halfway through the report, the last thing the step writes (every step writes
    its report through artifacts.paired_report, which calls artifacts.write_json)."""
    real = artifacts.write_json

    def write_json(path: str | os.PathLike[str], obj: Any) -> None:
        if Path(path) != report:
            real(path, obj)
            return
        with atomic_file(path) as temp:
            temp.write_text('{"half', encoding="utf-8")
            raise OSError(errno.ENOSPC, "No space left on device", str(temp))

    monkeypatch.setattr(artifacts, "write_json", write_json)


@pytest.mark.parametrize("previous", [False, True], ids=["first-run", "rerun"])
@pytest.mark.parametrize("command", ["merge", "imatrix", "quantize"])
def test_failed_report_write_leaves_no_artifact(
    work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: str, previous: bool
) -> None:
    """The report fails after the artifact was written in full: neither is left (a rerun keeps the
    previous pair untouched), nor a temporary sibling or a folder made for them; inputs unchanged."""
    argv, out, report = _report_argv(command, work)
    if previous:
        assert main([str(a) for a in argv]) == 0 and out.exists() and report.exists()
        # Mark the previous artifact, so that replacing it by identical bytes shows too.
        with open(out / "config.json" if out.is_dir() else out, "ab") as handle:
            handle.write(b"\n")
    _disk_full_writing(report, monkeypatch)
    line = refused(capsys, work, *argv)  # the whole tree, inputs and a previous pair included, unchanged
    assert line.startswith(f"{report}: no space left on device while writing it"), line
    assert previous or not (out.exists() or report.exists() or out.parent.exists() or report.parent.exists())


@pytest.mark.parametrize("command", ["merge", "imatrix", "quantize"])
def test_artifact_failing_after_its_report_takes_the_report_along(
    work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """The report is written, then the artifact's own rename fails: the report goes too (its folder
    exists already: an empty folder made for the report alone is not taken away)."""
    argv, out, report = _report_argv(command, work)
    out.parent.mkdir()
    report.parent.mkdir(exist_ok=True)
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if Path(dst) == out:
            raise OSError(errno.EIO, "Input/output error", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    line = refused(capsys, work, *argv)
    assert line.startswith(f"{out}: cannot write it: Input/output error"), line
    assert not out.exists() and not report.exists()
