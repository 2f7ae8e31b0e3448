"""Writing artifacts safely (temporary path, then rename) and hashing them."""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import math
import mmap
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora2gguf.errors import Lora2ggufError

_HASH_CHUNK = 1 << 22
_HASH_MAP_CHUNK = 1 << 24
# Bytes per file name on the file systems the workflow runs on (ext4, xfs, Lustre, GPFS, NFS); used
# where the folder does not exist yet and cannot be asked.
_NAME_MAX = 255


def _sibling(path: Path, tag: str) -> Path:
    """A hidden name next to ``path`` (same folder, so os.replace stays an atomic rename on one file
    system), shortened when ``path``'s own name is near the limit so the sibling can still be created."""
    suffix = f".{tag}-{os.getpid()}"
    name = os.fsencode(path.name)[: _NAME_MAX - 1 - len(suffix)]
    return path.with_name(f".{os.fsdecode(name)}{suffix}")


def _temp_sibling(path: Path) -> Path:
    return _sibling(path, "tmp")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _disk_full_error(exc: BaseException, final: Path) -> Lora2ggufError | None:
    """A one-line error naming ``final`` when ``exc`` means its filesystem ran out of space.

    Writers report a full disk in several ways: ENOSPC/EDQUOT from Python, numpy's tofile says only
    "N requested and M written" (no errno), safetensors' Rust writer says "os error 28". A short write
    without errno counts as disk full only when the folder really has (almost) no space left.
    """
    text = str(exc)
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    full = full or "No space left on device" in text or "os error 28" in text or "os error 122" in text
    if not full and isinstance(exc, OSError) and exc.errno is None and "written" in text:
        with contextlib.suppress(OSError):
            full = shutil.disk_usage(final.parent).free < (1 << 20)
    if not full:
        return None
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(final.parent).free
        return Lora2ggufError(f"{final}: no space left on device while writing it ({free} bytes free in {final.parent}); nothing was written")
    return Lora2ggufError(f"{final}: no space left on device while writing it; nothing was written")


def _names_output(exc: OSError, final: Path, temp: Path) -> bool:
    """Whether ``exc`` is about the output itself (its temporary path, a file in it, or the final
    path), not about an input the writer was reading."""
    final, temp = Path(os.path.abspath(final)), Path(os.path.abspath(temp))
    for name in (exc.filename, exc.filename2):
        if not isinstance(name, (str, bytes, os.PathLike)):
            continue
        path = Path(os.path.abspath(os.fsdecode(name)))
        if path == final or path.is_relative_to(temp):
            return True
    return False


def _output_error(exc: OSError, final: Path) -> Lora2ggufError:
    """One line naming the output and why the file system refused it (read-only, name too long, ...)."""
    reasons = {
        errno.ENAMETOOLONG: "file name too long for the file system",
        errno.EISDIR: "it is an existing folder; a file is expected there",
        errno.ENOTDIR: "a part of its path is a file, not a folder",
        errno.ENOENT: f"the folder {final.parent} does not accept new files",
        errno.EROFS: f"the folder {final.parent} is on a read-only file system",
        errno.EACCES: f"the folder {final.parent} is not writable (permission denied)",
        errno.EPERM: f"the folder {final.parent} is not writable (operation not permitted)",
    }
    reason = reasons.get(exc.errno if exc.errno is not None else -1, exc.strerror or str(exc))
    return Lora2ggufError(f"{final}: cannot write it: {reason}; nothing was written")


def _write_error(exc: BaseException, final: Path, temp: Path) -> BaseException:
    """What to raise for a failed write: a full disk or an OSError on the output's own paths becomes
    one line naming ``final``; anything else (a bad input, a bug, Ctrl-C) passes through unchanged."""
    full = _disk_full_error(exc, final)
    if full is not None:
        return full
    if isinstance(exc, OSError) and _names_output(exc, final, temp):
        return _output_error(exc, final)
    return exc


def _make_parents(final: Path) -> list[Path]:
    """Create the missing folders above ``final``; returns the ones created here, deepest first,
    so that a failed write can take away what it added and nothing else."""
    missing = []
    folder = final.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    created: list[Path] = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue  # made by a parallel job meanwhile: theirs, not ours to remove
        except OSError as exc:
            _remove_empty(created[::-1])
            raise _output_error(exc, final) from exc
        created.append(folder)
    return created[::-1]


def _remove_empty(folders: list[Path]) -> None:
    """Remove folders (deepest first) that a failed write created, as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (another writer is using it) or already gone: leave it and those above


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces ``path``, on failure it is removed together
    with any folder created for it."""
    final = Path(path)
    created = _make_parents(final)
    temp = _temp_sibling(final)
    try:
        temp.unlink(missing_ok=True)
        yield temp
        if not temp.exists():
            raise Lora2ggufError(f"{final}: the writer produced no file")
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, final)
        _fsync_dir(final.parent)
    except BaseException as exc:
        error = _write_error(exc, final, temp)  # before the cleanup frees the space it looks at
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
        _remove_empty(created)
        if error is not exc:
            raise error from exc
        raise


def _swap_in(temp: Path, final: Path) -> None:
    """Put the finished folder ``temp`` at ``final``, replacing a previous one."""
    if not os.path.lexists(final):
        os.replace(temp, final)
        return
    # Move the old folder aside first so that no moment exists where a mix is visible.
    old = _sibling(final, "old")
    os.replace(final, old)
    try:
        os.replace(temp, final)
    except OSError:
        os.replace(old, final)  # put the previous output back rather than leave nothing there
        raise
    if old.is_symlink():
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it takes the place of ``path`` (a previous folder
    there is replaced), on failure it is removed together with any folder created for it."""
    final = Path(path)
    if os.path.lexists(final) and not final.is_dir():
        raise Lora2ggufError(f"{final}: it is an existing file; a folder is expected there; nothing was written")
    created = _make_parents(final)
    temp = _temp_sibling(final)
    try:
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir()
        yield temp
        for item in temp.rglob("*"):
            if item.is_file():
                with open(item, "rb+") as handle:
                    os.fsync(handle.fileno())
        _swap_in(temp, final)
        _fsync_dir(final.parent)
    except BaseException as exc:
        error = _write_error(exc, final, temp)  # before the cleanup frees the space it looks at
        shutil.rmtree(temp, ignore_errors=True)
        _remove_empty(created)
        if error is not exc:
            raise error from exc
        raise


# Checking a command's paths before it does any work --------------------------------------------

_PATH_MAX = 4096  # bytes in a whole path (Linux PATH_MAX, counting the terminating NUL)

# Snakemake's own marker inside directory() outputs: a previous output may hold it.
_BOOKKEEPING = (".snakemake_timestamp",)

# What a tokenizer's save_pretrained writes (any of them), and what a model's save_pretrained adds
# to make a Hugging Face model folder (safetensors weights, one file or shards and their index).
HF_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
HF_MODEL_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", *HF_TOKENIZER_FILES,
)  # fmt: skip


@dataclass(frozen=True)
class FolderShape:
    """A folder output that is replaced whole, and the names (fnmatch patterns) of the files a
    previous output of the same command holds. Only a folder of that shape may be replaced: anything
    else in it (an input, a subfolder, a user's file) would be deleted with it."""

    command: str
    names: tuple[str, ...]


@dataclass(frozen=True)
class Output:
    """One path a command writes, named as the user gave it (``label``: "--out", "--report", ...)."""

    label: str
    path: str | os.PathLike[str] | None  # None: an optional output that was not asked for
    folder: FolderShape | None = None  # set for a folder output; None for a file


def check_paths(inputs: Iterable[tuple[str, str | os.PathLike[str] | None]], outputs: Iterable[Output]) -> None:
    """Refuse, before any work, outputs that would overwrite or delete an input or one another, or
    that the file system cannot take; raises Lora2ggufError naming the path and the problem.

    ``inputs`` are (label, path) pairs; None paths (options not given) are skipped. Paths are compared
    with symlinks resolved, so a link to an input counts as that input.
    """
    ins = [(label, Path(path)) for label, path in inputs if path is not None]
    outs = [out for out in outputs if out.path is not None]
    for label, path in ins:
        _check_length(path, label)
    for index, out in enumerate(outs):
        given = Path(out.path)  # None paths were filtered out above
        _check_length(given, out.label)
        real = _real(given)
        for label, path in ins:
            _check_against_input(out, given, real, label, path)
        for other in outs[:index]:
            _check_two_outputs(out, given, real, other)
        _check_existing(out, given, real)
        _check_location(out, given, real)


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _check_length(path: Path, label: str) -> None:
    # Checked first: Python's own exists()/is_dir() raise on a name the kernel refuses to look up.
    absolute = os.fsencode(os.path.abspath(path))
    if len(absolute) >= _PATH_MAX:
        raise Lora2ggufError(f"{path}: {label}: path too long ({len(absolute)} bytes; Linux allows {_PATH_MAX - 1})")
    for part in Path(os.fsdecode(absolute)).parts:
        size = len(os.fsencode(part))
        if size > _NAME_MAX:
            raise Lora2ggufError(
                f"{path}: {label}: file name too long ({size} bytes in one name; the file system allows {_NAME_MAX})"
            )


def _check_against_input(out: Output, given: Path, real: Path, label: str, path: Path) -> None:
    source = _real(path)
    kind = "folder" if source.is_dir() else "file"
    if real == source:
        raise Lora2ggufError(f"{given}: {out.label} is the same {kind} as the input {label} ({path})")
    if source.is_relative_to(real):
        raise Lora2ggufError(
            f"{given}: {out.label} holds the input {label} ({path}); writing {out.label} would replace it"
        )
    if real.is_relative_to(source):
        raise Lora2ggufError(
            f"{given}: {out.label} lies inside the input {kind} {label} ({path}); writing it would change that input"
        )


def _check_two_outputs(out: Output, given: Path, real: Path, other: Output) -> None:
    other_given = Path(other.path)
    other_real = _real(other_given)
    if real == other_real:
        raise Lora2ggufError(
            f"{given}: {out.label} is the same path as {other.label} ({other_given}); one would overwrite the other"
        )
    if real.is_relative_to(other_real):
        raise Lora2ggufError(f"{given}: {out.label} lies inside {other.label} ({other_given}); give it its own path")
    if other_real.is_relative_to(real):
        raise Lora2ggufError(f"{given}: {out.label} holds {other.label} ({other_given}); give it its own path")


def _check_existing(out: Output, given: Path, real: Path) -> None:
    """A file output must not be a folder; a folder output may only replace a previous output."""
    if out.folder is None:
        if real.is_dir():
            raise Lora2ggufError(f"{given}: {out.label} is an existing folder; a file is expected there")
        return
    if os.path.lexists(real) and not real.is_dir():
        raise Lora2ggufError(f"{given}: {out.label} is an existing file; a folder is expected there")
    if not real.is_dir():
        return
    foreign = _foreign_entries(real, out.folder)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise Lora2ggufError(
            f"{given}: {out.label} is an existing folder that is not a previous {out.folder.command} output "
            f"(it holds {foreign[0]!r}{more}) and would be replaced whole; remove it or choose another folder"
        )


def _foreign_entries(folder: Path, shape: FolderShape) -> list[str]:
    """What ``folder`` holds beyond the files a previous output of ``shape`` has (subfolders count)."""
    patterns = (*shape.names, *_BOOKKEEPING)
    return [
        entry.name + ("/" if entry.is_dir() else "")
        for entry in sorted(folder.iterdir())
        if entry.is_dir() or not any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in patterns)
    ]


def _check_location(out: Output, given: Path, real: Path) -> None:
    """The output's folder exists or can be made, and takes new files.

    Tried with an empty file rather than os.access: root passes access checks on folders that still
    refuse files (/proc, immutable folders), and a report refused only after the main artifact was
    written would leave that artifact behind.
    """
    folder = real.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise Lora2ggufError(f"{given}: {out.label} cannot be created: {folder} is a file, not a folder")
    probe = _sibling(folder / f"lora2gguf-{real.name}", "probe")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EEXIST):
            return  # a full disk gets its own message from the write itself; EEXIST: a stale probe
        raise Lora2ggufError(
            f"{given}: {out.label} cannot be written: the folder {folder} does not accept new files "
            f"({exc.strerror or exc})"
        ) from None
    probe.unlink(missing_ok=True)


def _reject_non_finite(obj: Any, where: str = "") -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"non-finite number at {where or '<root>'}; write null with a reason instead")
    if isinstance(obj, dict):
        for key, value in obj.items():
            _reject_non_finite(value, f"{where}.{key}" if where else str(key))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            _reject_non_finite(value, f"{where}[{index}]")


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON, atomically; NaN and Inf are refused."""
    _reject_non_finite(obj)
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    with atomic_file(path) as temp:
        temp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def paired_report(path: str | os.PathLike[str] | None) -> Iterator[Callable[[Any], None]]:
    """Keep an artifact and its JSON report all or nothing.

    Open it outside the artifact's ``atomic_file``/``atomic_dir`` block and call the yielded
    ``write(report)`` inside it: the report is written before the artifact is renamed into place, so a
    failed report write leaves neither, and a failure after it (the artifact's flush or rename) removes
    the report again. With ``path`` None, ``write`` does nothing.
    """
    written = False

    def write(report: Any) -> None:
        nonlocal written
        if path is not None:
            write_json(path, report)
            written = True

    try:
        yield write
    except BaseException:
        if written and path is not None:
            Path(path).unlink(missing_ok=True)
        raise


def read_text(path: str | os.PathLike[str], what: str = "") -> str:
    """A UTF-8 text file; a missing or unreadable one raises an error naming it (and ``what`` it is)."""
    path = Path(path)
    label = f" the {what}" if what else ""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Lora2ggufError(f"{path}: file not found" + (f" ({what})" if what else "")) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise Lora2ggufError(f"{path}: cannot read{label}: {exc}") from None


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file; a missing or malformed file raises an error naming it."""
    path = Path(path)
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise Lora2ggufError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        try:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # empty file, pipe, a file system without mmap
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
            return digest.hexdigest()
        with mapped:
            _hash_mapped(mapped, digest)
    return digest.hexdigest()


def _hash_mapped(mapped: mmap.mmap, digest: Any) -> None:
    """Hash straight from the page cache (no copy into a read buffer: a sixth less CPU on a 1 GB
    model); each chunk's pages are unmapped behind the hash, so the resident set stays small."""
    view = memoryview(mapped)
    try:
        for start in range(0, len(mapped), _HASH_MAP_CHUNK):
            size = min(_HASH_MAP_CHUNK, len(mapped) - start)
            digest.update(view[start : start + size])
            mapped.madvise(mmap.MADV_DONTNEED, start, size)
    finally:
        view.release()


def sha256_tree(folder: str | os.PathLike[str]) -> dict[str, str]:
    """Hash every file below ``folder``, keyed by its path relative to it (sorted)."""
    root = Path(folder)
    return {
        item.relative_to(root).as_posix(): sha256_file(item)
        for item in sorted(root.rglob("*"))
        if item.is_file()
    }


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_links_inside(folder: Path, paths: Iterable[Path] | None = None) -> None:
    """Refuse files of ``folder`` (``paths``, or every file at its top level) that resolve outside it.

    A link in a model or run folder to a file elsewhere (a private key, say) would be read as a
    weight, config or tokenizer file, and tokenizer files are copied into the merged model, the
    folder people publish. A link to the whole folder is fine (it is resolved first), and so is the
    Hugging Face cache's layout: snapshots/<revision>/<file> -> ../../blobs/<hash>.
    """
    try:
        root = folder.resolve()
        candidates = [p for p in folder.iterdir() if not p.is_dir()] if paths is None else list(paths)
    except OSError as exc:
        raise Lora2ggufError(f"{folder}: cannot read the folder: {exc}") from None
    hf_blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
    for path in candidates:
        try:
            target = path.resolve()
        except (OSError, RuntimeError) as exc:  # a link loop
            raise Lora2ggufError(f"{path}: cannot resolve the link: {exc}") from None
        if _inside(target, root) or (hf_blobs is not None and _inside(target, hf_blobs)):
            continue
        what = f"a symbolic link to {target}" if path.is_symlink() else f"resolves to {target}"
        raise Lora2ggufError(
            f"{path}: {what}, outside {folder}; refused (copy the file into the folder, or link the whole folder)"
        )
