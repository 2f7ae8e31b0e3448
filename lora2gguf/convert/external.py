"""The ``llama.cpp`` convert backend: llama.cpp's own ``convert_hf_to_gguf.py`` for the architectures
lora2gguf has no table for.

The converter is the one of the pinned llama.cpp, from the sources of the installed llama-cpp-python
(the sdist ``make llama-tools`` downloads to ``~/.cache/lora2gguf/sdist``; ``$LORA2GGUF_SDIST_CACHE``
moves it), so the file it writes is what that llama.cpp expects. ``--llama-cpp DIR`` or
``$LORA2GGUF_LLAMA_CPP`` names another llama.cpp checkout instead. Nothing is downloaded here.

It runs as a child process (:mod:`lora2gguf.convert._llama_cpp_child`: no checkpoint code, its own
gguf-py) writing into a temporary folder beside the output; the file is read back as llama.cpp's
loader would read it and renamed into place only then. The same input checks as the native path
come first: outputs may not overwrite inputs, links must stay inside the folder, pickle-only
weights are refused (the converter would ``torch.load`` them).
"""

from __future__ import annotations

import collections
import hashlib
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora2gguf import archs
from lora2gguf.artifacts import atomic_dir, atomic_file, check_links_inside, sha256_file, sha256_tree, write_json
from lora2gguf.convert import vocab
from lora2gguf.convert.tensors import OUTTYPES
from lora2gguf.errors import Lora2ggufError
from lora2gguf.formats.gguf import read_gguf, string_array
from lora2gguf.formats.safetensors import find_weight_files
from lora2gguf.provenance import Timer, build_report

if TYPE_CHECKING:
    from lora2gguf.convert.convert import ConvertOptions

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "native", "llama.cpp")
ENV_LLAMA_CPP = "LORA2GGUF_LLAMA_CPP"
ENV_SDIST_CACHE = "LORA2GGUF_SDIST_CACHE"
_CHILD = Path(__file__).with_name("_llama_cpp_child.py")
_CHILD_MARK = "LORA2GGUF_CHILD "
# What the converter needs from a llama.cpp source tree.
_NEEDED = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
_TAIL_LINES = 40


@dataclass(frozen=True)
class Backend:
    """Which converter runs on a folder, and why (logged and reported)."""

    name: str  # "native" or "llama.cpp"
    hf_architecture: str
    reason: str


def choose_backend(in_dir: Path, requested: str) -> Backend:
    """``native`` where lora2gguf has the architecture's table, else llama.cpp's converter (``auto``)."""
    if requested not in BACKENDS:
        raise Lora2ggufError(f"--backend {requested!r} is not one of {', '.join(BACKENDS)}")
    if not in_dir.is_dir():
        raise Lora2ggufError(f"{in_dir}: input folder not found")
    config_path = in_dir / "config.json"
    config = archs.load_config(in_dir)
    spec = archs.find_spec(config, config_path)  # a config without a usable 'architectures' key fails here
    hf_arch = config["architectures"][0]
    if requested == "llama.cpp":
        return Backend("llama.cpp", hf_arch, "asked for (--backend llama.cpp)")
    if spec is not None:
        return Backend("native", hf_arch, f"lora2gguf's converter ({spec.name})")
    if requested == "native":
        try:
            archs.spec_for(config, config_path)
        except Lora2ggufError as exc:
            raise Lora2ggufError(
                f"{exc} [--backend native; --backend auto or llama.cpp converts it with llama.cpp's convert_hf_to_gguf.py]"
            ) from None
    return Backend("llama.cpp", hf_arch, f"lora2gguf has no native converter for {hf_arch}")


# ---------------------------------------------------------------------------------------------
# finding the converter


@dataclass(frozen=True)
class Converter:
    """A llama.cpp source folder holding convert_hf_to_gguf.py, conversion/ and gguf-py/."""

    folder: Path
    origin: str
    llama_cpp_python: str | None  # the version whose sources these are; None for a user's checkout

    @property
    def script(self) -> Path:
        return self.folder / "convert_hf_to_gguf.py"


def _missing(folder: Path) -> list[str]:
    return [name for name in _NEEDED if not (folder / name).exists()]


def _extract(tarball: Path, version: str, cache: Path) -> None:
    """Unpack the converter's files from the cached sdist (local, no download), all or nothing."""
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    wanted = tuple(prefix + name for name in _NEEDED)
    target = cache / f"llama_cpp_python-{version}"
    try:
        with tarfile.open(tarball) as tar, atomic_dir(target) as temp:
            members = [m for m in tar.getmembers() if m.name.startswith(wanted)]
            for member in members:
                member.name = member.name[len(f"llama_cpp_python-{version}/") :]
            tar.extractall(temp, members=members, filter="data")
    except (OSError, tarfile.TarError) as exc:
        raise Lora2ggufError(f"{tarball}: cannot unpack llama.cpp's converter from it: {exc}") from None


def find_converter(override: Path | None = None) -> Converter:
    """The pinned converter (or the checkout named by ``override`` / $LORA2GGUF_LLAMA_CPP)."""
    given = override or (Path(os.environ[ENV_LLAMA_CPP]) if os.environ.get(ENV_LLAMA_CPP) else None)
    if given is not None:
        label = "--llama-cpp" if override is not None else f"${ENV_LLAMA_CPP}"
        missing = _missing(given)
        if missing:
            raise Lora2ggufError(f"{given}: not a llama.cpp source folder ({label}): {', '.join(missing)} missing")
        return Converter(given.resolve(), f"{label} {given}", None)
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        raise Lora2ggufError(
            "llama-cpp-python is not installed: the llama.cpp backend runs the converter of the installed "
            f"llama.cpp (pip install -e '.[llama]'), or set ${ENV_LLAMA_CPP} to a llama.cpp checkout"
        ) from None
    cache = Path(os.environ.get(ENV_SDIST_CACHE) or Path.home() / ".cache" / "lora2gguf" / "sdist")
    folder = cache / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    tarball = cache / f"llama_cpp_python-{version}.tar.gz"
    if _missing(folder) and tarball.is_file():
        _extract(tarball, version, cache)
    missing = _missing(folder)
    if missing:
        raise Lora2ggufError(
            f"{folder / missing[0]}: llama.cpp's converter (llama-cpp-python {version} sources) not found, nor "
            f"{tarball}; run `make llama-tools` to download the sources, or set ${ENV_LLAMA_CPP} to a llama.cpp checkout"
        )
    return Converter(folder, f"llama-cpp-python {version} sources ({tarball.name})", version)


def _digest(folder: Path, pattern: str = "*.py") -> str:
    """One sha256 over the files of a folder (names and contents, sorted): a fingerprint of a package."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob(pattern)):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + bytes.fromhex(sha256_file(path)))
    return digest.hexdigest()


def _gguf_py_version(gguf_py: Path) -> str | None:
    try:
        text = (gguf_py / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return None
    line = next((line for line in text.splitlines() if line.startswith("version")), None)
    return line.split("=", 1)[1].strip().strip('"') if line else None


def describe_converter(converter: Converter, gguf_py_used: str | None) -> dict[str, Any]:
    """What the report records about the converter: where, which version, and fingerprints."""
    gguf_py = converter.folder / "gguf-py"
    try:
        venv_gguf = importlib.metadata.version("gguf")
    except importlib.metadata.PackageNotFoundError:
        venv_gguf = None
    return {
        "origin": converter.origin,
        "path": str(converter.script),
        "sha256": sha256_file(converter.script),
        "llama_cpp_python": converter.llama_cpp_python,
        "conversion_sha256": _digest(converter.folder / "conversion"),
        "gguf_py": {
            "path": gguf_py_used,
            "version": _gguf_py_version(gguf_py),
            "sha256": _digest(gguf_py / "gguf"),
            # lora2gguf's own steps use the installed gguf; the converter uses the one beside it
            "installed_gguf": venv_gguf,
        },
    }


# ---------------------------------------------------------------------------------------------
# running it


@dataclass
class ChildResult:
    """What the converter's process reported and cost."""

    seconds: float
    peak_rss_mb: float | None
    state: dict[str, Any]


def _pre_tokenizer_hint(in_dir: Path) -> str | None:
    """lora2gguf's reading of a byte-level BPE pre-tokenizer, offered to the converter for vocabularies
    its hash table does not know (the same recognition as the native path); None when not one."""
    tok_path = in_dir / "tokenizer.json"
    if not tok_path.is_file():
        return None
    try:
        tokenizer = json.loads(tok_path.read_text(encoding="utf-8"))
        cfg_path = in_dir / "tokenizer_config.json"
        config = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # the converter reports unreadable tokenizer files in its own words
    if not isinstance(tokenizer, dict) or (tokenizer.get("model") or {}).get("type") != "BPE":
        return None
    try:
        return vocab.identify_pre_tokenizer(tokenizer, config if isinstance(config, dict) else {}, tok_path)
    except Lora2ggufError:
        return None


def _child_env(progress: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)
    # Local files only: the converter must not fetch a config, tokenizer or code from a hub.
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1")
    if not progress:
        env["TQDM_DISABLE"] = "1"
    return env


def _relay(stream: Any, tail: collections.deque[str]) -> dict[str, Any]:
    """Log the converter's lines as they come (a traceback only at debug level: its last line goes
    into the error message); returns the child's closing JSON report."""
    state: dict[str, Any] = {}
    in_traceback = False
    for raw in stream:
        line = raw.rstrip("\r\n")
        if line.startswith(_CHILD_MARK):
            state = json.loads(line[len(_CHILD_MARK) :])
            continue
        if not line.strip():
            continue
        tail.append(line)
        in_traceback = in_traceback or line.startswith("Traceback (most recent call last)")
        logger.log(logging.DEBUG if in_traceback else logging.INFO, "llama.cpp| %s", line)
    return state


def _failure(in_dir: Path, status: int, tail: collections.deque[str]) -> Lora2ggufError:
    lines = [line.strip() for line in tail if line.strip() and not line.startswith(" ")]
    last = lines[-1] if lines else "(no output)"
    return Lora2ggufError(
        f"{in_dir}: llama.cpp's convert_hf_to_gguf.py failed (exit status {status}): {last}"
    )


def run_child(converter: Converter, in_dir: Path, argv: list[str], job: dict[str, Any], progress: bool) -> ChildResult:
    """Run the converter on ``in_dir`` with ``argv``; its peak RSS comes from the kernel's rusage of that child."""
    payload = json.dumps({"llama_dir": str(converter.folder), "argv": argv, **job})
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    with Timer() as timer:
        proc = subprocess.Popen(
            [sys.executable, str(_CHILD), payload], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace", env=_child_env(progress),
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            state = _relay(proc.stdout, tail)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
    if proc.returncode != 0:
        raise _failure(in_dir, proc.returncode, tail)
    # ru_maxrss is in KiB on Linux (bytes on macOS)
    scale = 1 if sys.platform == "darwin" else 1024
    return ChildResult(timer.seconds, round(usage.ru_maxrss * scale / 2**20, 1), state)


@dataclass
class LlamaCppSummary:
    """What a conversion by llama.cpp's converter did and cost: the native summary's fields that can be
    read back from the file, plus where the converter came from."""

    input_dir: str
    output: str
    backend: str
    backend_reason: str
    hf_architecture: str
    architecture: str
    outtype: str
    n_tensors: int
    tensor_types: dict[str, int]
    n_parameters: int
    file_bytes: int
    input_bytes: int
    largest_tensor_bytes: int
    seconds: float
    peak_rss_mb: float | None
    tokenizer_pre: str | None
    pre_tokenizer_source: str
    n_tokens: int | None
    tied_embeddings: bool
    converter: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_inputs(options: ConvertOptions) -> list[Path]:
    """The native path's refusals, before the converter runs: returns the weight files."""
    if options.outtype not in OUTTYPES:
        raise Lora2ggufError(f"--outtype {options.outtype!r} is not one of {', '.join(OUTTYPES)}")
    # Config, tokenizer and model card end up in the GGUF: none may come from outside the folder.
    check_links_inside(options.in_dir)
    # Refuses pickle-only folders (the converter would torch.load them) and checks an index's parts.
    return find_weight_files(options.in_dir)


def _converter_argv(options: ConvertOptions, produced: Path, work: Path) -> list[str]:
    argv = ["--outtype", options.outtype, "--outfile", str(produced)]
    if options.name:
        argv += ["--model-name", options.name]
    override: dict[str, Any] = {}
    if options.base_model:
        override.update({"general.basename": options.base_model, "general.base_models": [{"name": options.base_model}]})
    if options.adapter:
        override["general.finetune"] = options.adapter
    if override:
        meta = work / "metadata.json"
        meta.write_text(json.dumps(override), encoding="utf-8")
        argv += ["--metadata", str(meta)]
    return [*argv, str(options.in_dir)]


def _pre_source(state: dict[str, Any], tokenizer_model: Any) -> str:
    if state.get("pre_tokenizer_supplied"):
        return "lora2gguf, from tokenizer.json's pre_tokenizer (the vocabulary's hash is not in llama.cpp's table)"
    if tokenizer_model == "gpt2":
        return "llama.cpp's converter (vocabulary hash)"
    return f"llama.cpp's converter ({tokenizer_model} tokenizer)"


def _summary(
    options: ConvertOptions, backend: Backend, produced: Path, weights: list[Path], child: ChildResult,
    converter: Converter,
) -> LlamaCppSummary:  # fmt: skip
    """Read the converter's file back (as llama.cpp's loader checks it) into the report's fields."""
    gguf_file = read_gguf(produced)
    meta = gguf_file.metadata
    types: dict[str, int] = {}
    for tensor in gguf_file.tensors:
        types[tensor.type_name] = types.get(tensor.type_name, 0) + 1
    tokens = string_array(gguf_file, "tokenizer.ggml.tokens")
    names = {t.name for t in gguf_file.tensors}
    return LlamaCppSummary(
        input_dir=str(options.in_dir),
        output=str(options.out),
        backend="llama.cpp",
        backend_reason=backend.reason,
        hf_architecture=backend.hf_architecture,
        architecture=str(meta.get("general.architecture")),
        outtype=options.outtype,
        n_tensors=len(gguf_file.tensors),
        tensor_types=dict(sorted(types.items())),
        n_parameters=sum(t.n_elements for t in gguf_file.tensors),
        file_bytes=produced.stat().st_size,
        input_bytes=sum(path.stat().st_size for path in weights),
        largest_tensor_bytes=max((t.n_bytes for t in gguf_file.tensors), default=0),
        seconds=round(child.seconds, 3),
        peak_rss_mb=child.peak_rss_mb,
        tokenizer_pre=meta.get("tokenizer.ggml.pre"),
        pre_tokenizer_source=_pre_source(child.state, meta.get("tokenizer.ggml.model")),
        n_tokens=None if tokens is None else len(tokens),
        tied_embeddings="output.weight" not in names and "token_embd.weight" in names,
        converter=describe_converter(converter, child.state.get("gguf_py")),
    )


def run_llama_cpp(options: ConvertOptions, backend: Backend, chat_template: str | None) -> LlamaCppSummary:
    """``lora2gguf convert --backend llama.cpp`` (or ``auto`` on an architecture without a native table)."""
    weights = _check_inputs(options)
    converter = find_converter(options.llama_cpp)
    logger.info(
        "converting %s (%s) with llama.cpp's convert_hf_to_gguf.py from %s: %s",
        options.in_dir, backend.hf_architecture, converter.origin, backend.reason,
    )  # fmt: skip
    job = {"pre_tokenizer": _pre_tokenizer_hint(options.in_dir), "chat_template": chat_template}
    with atomic_file(options.out) as temp:
        # The converter writes into a folder of its own beside the output (same file system, so the
        # rename stays atomic); a name of ours never passes through its {ftype} file-name templating.
        with tempfile.TemporaryDirectory(prefix=".lora2gguf-convert-", dir=options.out.parent) as folder:
            work = Path(folder)
            produced = work / "model.gguf"
            try:
                child = run_child(converter, options.in_dir, _converter_argv(options, produced, work), job, options.progress)
            except Lora2ggufError as exc:
                raise Lora2ggufError(f"{exc} [backend llama.cpp: {backend.reason}]") from None
            if not produced.is_file():
                raise Lora2ggufError(f"{options.in_dir}: llama.cpp's convert_hf_to_gguf.py exited without writing a file")
            summary = _summary(options, backend, produced, weights, child, converter)
            os.replace(produced, temp)
    _log_summary(summary)
    if options.report is not None:
        write_report(options.report, summary)
    return summary


def _log_summary(s: LlamaCppSummary) -> None:
    logger.info(
        "wrote %s with llama.cpp's converter: %s, %d tensors (%s), %.1f MiB, %d parameters, in %.2f s; "
        "peak RSS of the converter %s MiB; pre-tokenizer %s from %s",
        s.output, s.architecture, s.n_tensors, ", ".join(f"{k} x{v}" for k, v in s.tensor_types.items()),
        s.file_bytes / 2**20, s.n_parameters, s.seconds, s.peak_rss_mb, s.tokenizer_pre, s.pre_tokenizer_source,
    )  # fmt: skip


def write_report(path: str | Path, summary: LlamaCppSummary) -> None:
    """JSON record of a conversion by llama.cpp's converter, in the native report's shape."""
    body = {
        "step": "convert",
        **summary.as_dict(),
        "input_sha256": sha256_tree(summary.input_dir),
        "output_sha256": sha256_file(summary.output),
        "measured": {
            "seconds": "wall time of the converter's process (interpreter start, conversion, writing)",
            "peak_rss_mb": "peak resident memory of the converter's process (the kernel's ru_maxrss of that child)",
        },
    }
    write_json(path, build_report("convert", body, device="cpu"))
