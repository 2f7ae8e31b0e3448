"""Stream a merged HF model folder (safetensors) into one GGUF file.

GGUF puts every tensor's name, shape, type and offset before the data. All of those follow from the
safetensors headers and the chosen output type, so the header is written first from the headers
alone, then each tensor is mapped, converted and appended, one at a time (large ones in row blocks
of about 16 MiB). Peak memory is therefore a few times the block size plus a fixed overhead
(tokenizer, libraries), whatever the model size. The file is written under a temporary name and
renamed into place only when complete.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import gguf
import numpy as np
from tqdm import tqdm

from lora2gguf.artifacts import (
    Output, atomic_file, check_links_inside, check_paths, read_text, sha256_file, sha256_tree, write_json,
)
from lora2gguf import archs
from lora2gguf.convert import external, hparams, vocab
from lora2gguf.convert.tensors import OUTTYPES, TensorPlan, convert_data, plan_tensors
from lora2gguf.errors import Lora2ggufError
from lora2gguf.formats.safetensors import TensorEntry, index_tensors, open_tensor
from lora2gguf.provenance import PeakMemory, Timer, build_report

logger = logging.getLogger(__name__)

_CHUNK_ROWS = 4096
# Tensors larger than this are converted in blocks of rows of about this size, so memory does not
# follow the largest tensor either (a 7B model's bf16 embedding widened to f32 is over 2 GB).
_CHUNK_BYTES = 16 * 2**20


def _pad(handle: BinaryIO, n: int, alignment: int) -> None:
    handle.write(bytes(-n % alignment))


def _write_tensor(handle: BinaryIO, plan: TensorPlan) -> None:
    """Convert and append one tensor, whole or in row blocks (identical bytes either way)."""
    entry = plan.entry
    if entry is None:  # generated from the config (small: one value per rotary frequency)
        convert_data(plan, plan.generated).tofile(handle)
        return
    rows = plan.shape[0] if plan.shape else 0
    if plan.permute_heads is not None or entry.nbytes <= _CHUNK_BYTES or rows < 2:
        # q/k permutation mixes rows within a head, so those (small) tensors go whole.
        with open_tensor(entry) as data:
            convert_data(plan, data).tofile(handle)
        return
    step = max(1, _CHUNK_BYTES // (entry.nbytes // rows))
    for start in range(0, rows, step):
        with open_tensor(entry, rows=(start, min(rows, start + step))) as data:
            convert_data(plan, data).tofile(handle)


@dataclass
class ConvertSummary:
    """What one conversion did and what it cost (logged; returned for tests and reports)."""

    input_dir: str
    output: str
    architecture: str
    outtype: str
    n_tensors: int
    tensor_types: dict[str, int]
    skipped_tensors: list[str]
    n_parameters: int
    file_bytes: int
    input_bytes: int
    largest_tensor_bytes: int
    seconds: float
    peak_rss_mb: float
    rss_at_start_mb: float
    tokenizer_pre: str
    n_tokens: int
    tied_embeddings: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_tied_copy(head: TensorEntry, embed: TensorEntry) -> None:
    """A tied model's saved lm_head must equal the embeddings (compared in row chunks, not loaded whole)."""
    if head.shape != embed.shape or head.dtype != embed.dtype:
        raise Lora2ggufError(
            f"{head.path}: config.json has tie_word_embeddings=true but 'lm_head.weight' ({head.dtype} "
            f"{list(head.shape)}) is not a copy of 'model.embed_tokens.weight' ({embed.dtype} {list(embed.shape)})"
        )
    with open_tensor(head) as a, open_tensor(embed) as b:
        for start in range(0, a.shape[0], _CHUNK_ROWS):
            if not np.array_equal(a[start : start + _CHUNK_ROWS], b[start : start + _CHUNK_ROWS]):
                raise Lora2ggufError(
                    f"{head.path}: config.json has tie_word_embeddings=true but 'lm_head.weight' differs from "
                    "'model.embed_tokens.weight' (a LoRA or modules_to_save on a tied lm_head?); llama.cpp would "
                    "use the embeddings as the head and lose that change. Set tie_word_embeddings=false in "
                    "config.json to keep a separate head, or merge without touching lm_head."
                )


def _metadata(
    writer: gguf.GGUFWriter,
    model_dir: Path,
    name: str | None,
    base_model: str | None,
    adapter: str | None,
) -> gguf.Metadata:
    """general.* keys: gguf-py's heuristics (model card, generation config, folder name), then our provenance."""
    total, shared, expert, expert_count = writer.get_total_parameter_count()
    meta = gguf.Metadata.load(None, model_dir, name, total)
    if meta.name is None:
        meta.name = model_dir.name
    if base_model:
        meta.basename = base_model
        meta.base_models = [{"name": base_model}]
    if adapter:
        meta.finetune = adapter
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, expert_count)
    return meta


@dataclass(frozen=True)
class ConvertOptions:
    """What ``lora2gguf convert`` was asked to do."""

    in_dir: Path
    out: Path
    outtype: str = "f16"
    base_model: str | None = None
    adapter: str | None = None
    name: str | None = None
    progress: bool = True
    report: Path | None = None  # also write the JSON report here
    chat_template: Path | None = None  # a Jinja file carried instead of the folder's own template
    backend: str = "auto"  # auto | native | llama.cpp (llama.cpp's convert_hf_to_gguf.py: convert/external.py)
    llama_cpp: Path | None = None  # a llama.cpp checkout whose converter runs instead of the pinned one


@dataclass
class _Source:
    """The input model as the writer needs it: architecture, hyperparameters, tensors and vocabulary."""

    spec: archs.ArchSpec
    hp: archs.HParams
    entries: list[TensorEntry]
    plans: list[TensorPlan]
    skipped: list[str]
    voc: vocab.VocabInfo


def _check_inputs(model_dir: Path, outtype: str) -> None:
    if outtype not in OUTTYPES:
        raise Lora2ggufError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    if not model_dir.is_dir():
        raise Lora2ggufError(f"{model_dir}: input folder not found")


def _check_paths(options: ConvertOptions) -> None:
    """The GGUF and the report must not overwrite the input folder, each other, or a folder."""
    check_paths(
        [("IN_DIR", options.in_dir), ("--chat-template", options.chat_template), ("--llama-cpp", options.llama_cpp)],
        [Output("OUT.gguf", options.out), Output("--report", options.report)],
    )


def _read_source(model_dir: Path, outtype: str) -> _Source:
    """Everything the header needs, from config.json, the safetensors headers and the tokenizer."""
    # Tokenizer files, config and model card end up in the GGUF: none may come from outside the folder.
    check_links_inside(model_dir)
    config_path = model_dir / "config.json"
    config = archs.load_config(model_dir)
    spec = archs.spec_for(config, config_path)
    hp = archs.read_hparams(config, config_path)
    logger.info("%s: %s, converted natively as %s", config_path, config["architectures"][0], spec.name)
    entries = index_tensors(model_dir)
    plans, skipped = plan_tensors(entries, spec, hp, outtype, str(model_dir))
    by_name = {e.name: e for e in entries}
    if "lm_head.weight" in skipped:
        _check_tied_copy(by_name["lm_head.weight"], by_name["model.embed_tokens.weight"])
    for skipped_name in skipped:
        logger.info("skipping %s (%s)", skipped_name, "tied to the embeddings" if skipped_name == "lm_head.weight" else "not a weight")
    voc = vocab.build_vocab(model_dir, spec, hp.vocab_size)
    for plan in plans:
        if plan.entry is None:
            logger.info("generating %s from %s (as llama.cpp's converter does)", plan.gguf_name, config_path)
    return _Source(spec, hp, entries, plans, skipped, voc)


def _header_writer(
    source: _Source, model_dir: Path, outtype: str, name: str | None, base_model: str | None, adapter: str | None
) -> gguf.GGUFWriter:
    """A gguf-py writer holding the tensor table and every metadata key, nothing written yet."""
    writer = gguf.GGUFWriter(path=None, arch=source.spec.name)
    if source.spec.write_first is not None:
        source.spec.write_first(writer, source.hp)
    for plan in source.plans:
        writer.add_tensor_info(plan.gguf_name, plan.shape, np.dtype(np.float32), plan.nbytes, raw_dtype=plan.qtype)
    # Key order follows llama.cpp's converter: type, general.*, hyperparameters, file type,
    # architecture extras, quantization version, tokenizer.
    writer.add_type(gguf.GGUFType.MODEL)
    meta = _metadata(writer, model_dir, name, base_model, adapter)
    meta.set_gguf_meta_model(writer)
    hparams.write_hparams(writer, source.spec, source.hp)
    writer.add_file_type(OUTTYPES[outtype][0])
    hparams.write_arch_extras(writer, source.spec, source.hp)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.write_vocab(writer, source.voc)
    return writer


def _write_file(writer: gguf.GGUFWriter, plans: list[TensorPlan], out_path: Path, progress: bool) -> None:
    with atomic_file(out_path) as temp:
        # gguf-py writes the header, metadata and tensor table; the data section is streamed
        # below in the layout that table promises (aligned start, each tensor padded).
        try:
            writer.write_header_to_file(path=temp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
        finally:
            writer.close()
        with open(temp, "ab") as handle:
            _pad(handle, handle.tell(), writer.data_alignment)
            with tqdm(plans, desc="convert", unit="tensor", disable=not progress, mininterval=0.5) as bar:
                for plan in bar:
                    bar.set_postfix_str(plan.gguf_name, refresh=False)
                    _write_tensor(handle, plan)
                    _pad(handle, plan.nbytes, writer.data_alignment)


def _summary(
    source: _Source, model_dir: Path, out_path: Path, outtype: str, file_bytes: int, timer: Timer, memory: PeakMemory
) -> ConvertSummary:
    plans = source.plans
    types: dict[str, int] = {}
    for plan in plans:
        types[plan.qtype.name] = types.get(plan.qtype.name, 0) + 1
    return ConvertSummary(
        input_dir=str(model_dir),
        output=str(out_path),
        architecture=source.spec.name,
        outtype=outtype,
        n_tensors=len(plans),
        tensor_types=dict(sorted(types.items())),
        skipped_tensors=source.skipped,
        n_parameters=sum(p.n_elements for p in plans),
        file_bytes=file_bytes,
        input_bytes=sum(e.nbytes for e in source.entries),
        largest_tensor_bytes=max(p.entry.nbytes for p in plans if p.entry is not None),
        seconds=round(timer.seconds, 3),
        peak_rss_mb=round(memory.peak_rss_mb, 1),
        rss_at_start_mb=round(memory.start_rss_mb, 1),
        tokenizer_pre=source.voc.pre,
        n_tokens=len(source.voc.tokens),
        tied_embeddings=not any(p.gguf_name == "output.weight" for p in plans),
    )


def convert(
    model_dir: str | Path,
    out_path: str | Path,
    outtype: str = "f16",
    *,
    base_model: str | None = None,
    adapter: str | None = None,
    name: str | None = None,
    progress: bool = True,
    chat_template: str | None = None,
) -> ConvertSummary:
    """Convert ``model_dir`` (HF folder with config.json, tokenizer.json, *.safetensors) to ``out_path``.

    ``chat_template`` replaces the folder's template in tokenizer.chat_template (e.g. the template the
    run was really trained with, when the run folder saved another)."""
    model_dir = Path(model_dir)
    out_path = Path(out_path)
    _check_inputs(model_dir, outtype)
    with PeakMemory() as memory, Timer() as timer:
        source = _read_source(model_dir, outtype)
        if chat_template is not None:
            source.voc.special.chat_template = chat_template
        writer = _header_writer(source, model_dir, outtype, name, base_model, adapter)
        logger.info(
            "converting %s (%s, %d tensors, %d layers) to %s as %s",
            model_dir, source.spec.name, len(source.plans), source.hp.block_count, out_path, outtype.upper(),
        )
        _write_file(writer, source.plans, out_path, progress)
        file_bytes = out_path.stat().st_size
    summary = _summary(source, model_dir, out_path, outtype, file_bytes, timer, memory)
    _log_summary(summary)
    return summary


def run_convert(options: ConvertOptions) -> ConvertSummary | external.LlamaCppSummary:
    """``lora2gguf convert``: the conversion, then the JSON report when one was asked for."""
    _check_paths(options)
    backend = external.choose_backend(options.in_dir, options.backend)
    if backend.name == "llama.cpp":
        template = None if options.chat_template is None else read_text(options.chat_template, "chat template")
        return external.run_llama_cpp(options, backend, template)
    summary = convert(
        options.in_dir,
        options.out,
        options.outtype,
        base_model=options.base_model,
        adapter=options.adapter,
        name=options.name,
        progress=options.progress,
        chat_template=None if options.chat_template is None else read_text(options.chat_template, "chat template"),
    )
    if options.report is not None:
        write_report(options.report, summary)
    return summary


def _log_summary(s: ConvertSummary) -> None:
    mib = 2**20
    speed = s.input_bytes / mib / s.seconds if s.seconds > 0 else float("nan")
    logger.info(
        "wrote %s: %d tensors (%s), %.1f MiB, %d parameters, in %.2f s (%.1f MiB/s of input); "
        "peak RSS %.1f MiB (%.1f MiB at start, largest tensor %.1f MiB)",
        s.output,
        s.n_tensors,
        ", ".join(f"{k} x{v}" for k, v in s.tensor_types.items()),
        s.file_bytes / mib,
        s.n_parameters,
        s.seconds,
        speed,
        s.peak_rss_mb,
        s.rss_at_start_mb,
        s.largest_tensor_bytes / mib,
    )


def write_report(path: str | Path, summary: ConvertSummary) -> None:
    """JSON record of a conversion: what was measured, with versions, host and file hashes."""
    body = {
        "step": "convert",
        "backend": "native",
        **summary.as_dict(),
        "input_sha256": sha256_tree(summary.input_dir),
        "output_sha256": sha256_file(summary.output),
        "measured": {
            "seconds": "wall time of the whole conversion (reading, converting, writing, renaming)",
            "peak_rss_mb": "peak resident memory of the process during the conversion, sampled every 10 ms",
        },
    }
    write_json(path, build_report("convert", body, device="cpu"))
