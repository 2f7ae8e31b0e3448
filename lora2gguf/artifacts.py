"""Writing artifacts safely (temporary path, then rename) and hashing them."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lora2gguf.errors import Lora2ggufError

_HASH_CHUNK = 1 << 22


def _temp_sibling(path: Path) -> Path:
    # Same directory as the target, so the final os.replace is an atomic rename on one filesystem.
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


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


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces ``path``, on failure it is removed."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_sibling(final)
    temp.unlink(missing_ok=True)
    try:
        yield temp
        if not temp.exists():
            raise Lora2ggufError(f"{final}: the writer produced no file")
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, final)
        _fsync_dir(final.parent)
    except BaseException as exc:
        full = _disk_full_error(exc, final)
        temp.unlink(missing_ok=True)
        if full is not None:
            raise full from exc
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it takes the place of ``path``."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_sibling(final)
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        yield temp
        for item in temp.rglob("*"):
            if item.is_file():
                with open(item, "rb+") as handle:
                    os.fsync(handle.fileno())
        if final.exists():
            # Move the old folder aside first so that no moment exists where a mix is visible.
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(temp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, final)
        _fsync_dir(final.parent)
    except BaseException as exc:
        full = _disk_full_error(exc, final)
        shutil.rmtree(temp, ignore_errors=True)
        if full is not None:
            raise full from exc
        raise


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


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file; a missing or malformed file raises an error naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Lora2ggufError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise Lora2ggufError(f"{path}: cannot read: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise Lora2ggufError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(folder: str | os.PathLike[str]) -> dict[str, str]:
    """Hash every file below ``folder``, keyed by its path relative to it (sorted)."""
    root = Path(folder)
    return {
        item.relative_to(root).as_posix(): sha256_file(item)
        for item in sorted(root.rglob("*"))
        if item.is_file()
    }
