"""The merge step: merge a LoRA adapter into its base model with peft, verify it, write an HF folder.

Flow: check the inputs from file headers (merge.inputs) -> load base (+ resize a vocabulary the
adapter extended) -> PeftModel -> reference logits on a small fixed batch -> merge_and_unload(safe_merge)
-> reject NaN/Inf -> write weights, config, generation config and tokenizer into a temporary folder
-> verify what was written: its config is the base's, its weights loaded into the merged model give the
reference's logits (merge.verify), and every written tensor is the base plus the adapter's update
computed from the files (merge.algebra) -> write the report -> rename the folder into place. Any failure
leaves no output folder and no report. The base is held in memory once: no second copy for the check.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora2gguf import hf, qlora
from lora2gguf.artifacts import (
    HF_MODEL_FILES,
    FolderShape,
    Output,
    atomic_dir,
    paired_report,
    check_links_inside,
    check_paths,
    read_json,
    sha256_file,
    sha256_tree,
)
from lora2gguf.errors import Lora2ggufError
from lora2gguf.formats.safetensors import read_metadata
from lora2gguf.merge import algebra as ma
from lora2gguf.merge import inputs as mi
from lora2gguf.merge import targets as mt
from lora2gguf.merge import verify as mv
from lora2gguf.merge.inputs import TOKENIZER_FILES
from lora2gguf.provenance import PeakMemory, Timer, build_report, device_info

logger = logging.getLogger(__name__)

DTYPES = hf.DTYPES
DEVICES = ("auto", "cpu", "cuda")
QLORA_TARGETS = mt.TARGETS
TRAINED_ON = qlora.TRAINED_ON

# What a previous merge output holds (all a merge writes): only such a folder is replaced by a rerun.
# No marker file is added: the folder's bytes are compared across versions.
OUTPUT_SHAPE = FolderShape("merge", (*HF_MODEL_FILES, *TOKENIZER_FILES))

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}  # fmt: skip


@dataclass
class MergeOptions:
    """What to merge and how: the `lora2gguf merge` flags (the workflow's merge settings)."""

    base: Path
    adapter: Path
    out: Path
    dtype: str = "auto"
    device: str = "auto"
    shard_size: str | int = "2GB"
    report: Path | None = None
    eval_text: Path | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    # Size of the verification batch; None keeps merge.verify's defaults (tests use smaller ones).
    verify_sequences: int | None = None
    verify_seq_len: int | None = None
    # How the run was trained (the config's candidates.<name>.trained_on); None reads the run folder.
    trained_on: str | None = None
    # A QLoRA run's merge target: auto (the one closer to the trained model), float or dequantized.
    qlora_target: str = "auto"

    def __post_init__(self) -> None:
        self.base, self.adapter, self.out = Path(self.base), Path(self.adapter), Path(self.out)


@dataclass
class _Trace:
    """What the run notices on its way, for the report: warnings, notes and seconds per phase."""

    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Inputs:
    """What the checks on file headers found, before anything is loaded."""

    adapter_cfg: dict[str, Any]
    base_w: mi.WeightSource
    adapter_w: mi.WeightSource
    name_check: dict[str, Any]
    fit: dict[str, Any]
    tok_src: Path
    dtype_name: str
    shard_bytes: int
    trained: qlora.TrainedOn


@dataclass
class _Reference:
    """The fixed verification batch and the unmerged model's logits on it."""

    batch: Any
    info: dict[str, Any]
    logits: Any


@dataclass
class _Written:
    tokenizer_files: list[str]
    weights: dict[str, Any]


@dataclass
class _Verified:
    """What the written output folder showed."""

    metrics: dict[str, Any]
    vocab_rows: int
    tokenizer_len: int
    chat_template: bool
    sha256: dict[str, str]
    config_changes: list[str]
    # Against the trained reference, when the run was QLoRA and the written target is the float one.
    vs_trained: dict[str, Any] | None = None
    # The per-tensor check (merge.algebra); None until it ran, or where it cannot (a dequantized target).
    tensors: dict[str, Any] | None = None


@dataclass
class _QLoRA:
    """A QLoRA run's merge: the trained reference (dequantized base + adapter), the error of the
    quantization against the adapter's update, each target built and its distance, the choice."""

    trained_ref: _Reference
    errors: dict[str, Any]
    measured: dict[str, dict[str, Any]] = field(default_factory=dict)
    target: str = ""
    reason: str = ""


def merge_adapter(options: MergeOptions) -> dict[str, Any]:
    """Merge, verify and write; returns the report (also written to ``options.report`` when given)."""
    trace = _Trace()
    inputs = _check_inputs(options, trace)
    dev, load_kwargs = _torch_setup(options, inputs)
    with paired_report(options.report) as write_report, atomic_dir(options.out) as tmp:
        with Timer() as total, PeakMemory(cuda=dev.startswith("cuda")) as mem:
            if inputs.trained.kind in qlora.QUANT_KINDS or (inputs.trained.kind == "int8" and _has_bitsandbytes()):
                ref, tying, written, verified, qlora_run = _merge_qlora_into(tmp, options, inputs, dev, load_kwargs, trace)
            else:
                if inputs.trained.kind == "int8":
                    trace.warnings.append("trained on an 8-bit base but bitsandbytes is not installed: merged into "
                                          "the float base without measuring it against the trained model")  # fmt: skip
                ref, tying, written, verified = _merge_into(tmp, options, inputs, dev, load_kwargs, trace)
                qlora_run = None
        _log_merged(options, inputs, dev, verified, total.seconds)
        report = _report(
            options, inputs, dev=dev, ref=ref, tying=tying, written=written, verified=verified, trace=trace,
            total_s=total.seconds, memory=mem.as_dict(), qlora_run=qlora_run,
        )  # fmt: skip
        write_report(report)
    return report


def _log_merged(options: MergeOptions, inputs: _Inputs, dev: str, verified: _Verified, seconds: float) -> None:
    metrics = verified.metrics
    logger.info(
        "merged %s: max|Δlogit| %.3g, mean KL %.3g, top-1 %.4f (%s, %s) in %.1f s",
        options.out, metrics["max_abs_logit_delta"], metrics["mean_kl"], metrics["top1_agreement"],
        inputs.dtype_name, dev, seconds,
    )  # fmt: skip


def _merge_into(
    tmp: Path, options: MergeOptions, inputs: _Inputs, dev: str, load_kwargs: dict[str, Any], trace: _Trace
) -> tuple[_Reference, dict[str, Any], _Written, _Verified]:
    """Load, merge, write the merged model into ``tmp`` and verify it there."""
    with Timer() as t:
        tokenizer, base_model = _load_base(options, inputs, load_kwargs, dev, trace)
        peft_model = _load_adapter(base_model, options, inputs, trace)
        del base_model
    trace.timings["load_s"] = t.seconds
    ref = _reference_logits(peft_model, tokenizer, options, inputs, dev, trace)
    merged, tying = _merge(peft_model, inputs, trace)
    del peft_model
    written = _write_folder(merged, tokenizer, tmp, options, inputs, trace)
    verified = _verify_written(tmp, merged, ref, dev, options, inputs, tying, trace)
    # `merged` is the base module itself: the tensor check below reads the files, not the model.
    del merged
    _release_memory()
    verified.tensors = _check_tensors(tmp, options, inputs, verified, trace)
    return ref, tying, written, verified


def _merge_qlora_into(
    tmp: Path, options: MergeOptions, inputs: _Inputs, dev: str, load_kwargs: dict[str, Any], trace: _Trace
) -> tuple[_Reference, dict[str, Any], _Written, _Verified, _QLoRA]:
    """A QLoRA run: the float and the trained reference, the target(s), then write and verify the chosen
    one against its own unmerged model (and, for the float target, against the trained reference too)."""
    with Timer() as t:
        tokenizer, base_model = _load_base(options, inputs, load_kwargs, dev, trace)
        layers = qlora.quantized_layers(base_model)
        peft_model = _load_adapter(base_model, options, inputs, trace)
        del base_model
    trace.timings["load_s"] = t.seconds
    ref = _reference_logits(peft_model, tokenizer, options, inputs, dev, trace)
    with Timer() as t:
        if inputs.trained.kind == "int8":
            int8_logits, weights = _int8_reference(ref, options, inputs, load_kwargs, dev)
            trained_weight = mt.int8_lookup(weights)
        else:
            trained_weight = mt.four_bit_weights(inputs.trained)
        errors = mt.load_trained_base(layers, trained_weight, peft_model).as_dict()
        del layers, trained_weight
        # The dequantized base + adapter: the 4-bit run's trained model itself; for an 8-bit run the
        # trained model also quantizes activations (bitsandbytes' own forward pass is the reference).
        deq_ref = _Reference(ref.batch, ref.info, mv.logits_on(peft_model, ref.batch, dev))
        trained_ref = deq_ref if inputs.trained.kind != "int8" else _Reference(ref.batch, ref.info, int8_logits)
    trace.timings["trained_reference_s"] = t.seconds
    run = _QLoRA(trained_ref, errors)
    logger.info("QLoRA (%s): quantization error %.3g x the LoRA update (Frobenius, all quantized layers)",
                inputs.trained.kind, errors["error_to_delta"] or float("nan"))  # fmt: skip
    built: dict[str, tuple[Any, dict[str, Any]]] = {}
    if options.qlora_target != "float":
        built["dequantized"] = _merge(peft_model, inputs, trace)
    del peft_model
    if options.qlora_target != "dequantized":
        built["float"] = _float_target(options, inputs, load_kwargs, dev, trace)
    _choose_target(built, run, options, dev, trace)
    merged, tying = built.pop(run.target)
    written = _write_folder(merged, tokenizer, tmp, options, inputs, trace)
    own_ref = deq_ref if run.target == "dequantized" else ref
    also = None if own_ref is trained_ref else trained_ref.logits
    verified = _verify_written(tmp, merged, own_ref, dev, options, inputs, tying, trace, also=also)
    del merged
    _release_memory()
    if run.target == "float":
        verified.tensors = _check_tensors(tmp, options, inputs, verified, trace)
    else:
        trace.notes.append("the dequantized target's base weights are bitsandbytes' round trip, which no file holds: "
                           "its tensors were not checked one by one, only through the logits")  # fmt: skip
    return own_ref, tying, written, verified, run


def _int8_reference(
    ref: _Reference, options: MergeOptions, inputs: _Inputs, load_kwargs: dict[str, Any], dev: str
) -> tuple[Any, dict[str, Any]]:
    """An LLM.int8 run's trained model: the base loaded by transformers with bitsandbytes' 8-bit layers
    (in the run's compute dtype) + the adapter; its logits on the batch and its dequantized weights."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = getattr(torch, inputs.trained.compute_dtype or inputs.dtype_name)
    kwargs = {**load_kwargs, **hf.dtype_kwarg(dtype), "device_map": dev,
              "quantization_config": BitsAndBytesConfig(load_in_8bit=True)}  # fmt: skip
    try:
        model8 = AutoModelForCausalLM.from_pretrained(options.base, **kwargs)
    except Exception as exc:  # noqa: BLE001 - transformers / bitsandbytes raise many types
        raise Lora2ggufError(f"{options.base}: cannot load the base in 8 bits with bitsandbytes: {exc}") from None
    resized = inputs.fit["resized_vocab_rows"]
    if resized is not None and resized != model8.get_input_embeddings().weight.shape[0]:
        model8.resize_token_embeddings(resized, mean_resizing=False)
    weights = mt.int8_weights(model8)
    peft8 = _load_adapter(model8, options, inputs, _Trace())
    logits = mv.logits_on(peft8, ref.batch, dev)
    if not bool(torch.isfinite(logits).all()):
        raise Lora2ggufError(f"{inputs.adapter_w.files[0]}: the 8-bit base + adapter produce NaN/Inf logits")
    return logits, weights


def _choose_target(
    built: dict[str, tuple[Any, dict[str, Any]]], run: _QLoRA, options: MergeOptions, dev: str, trace: _Trace
) -> None:
    """Measure each merged target against the trained reference and pick one: the requested target, or
    under auto the closer one. Sets run.measured, run.target and run.reason; the other target is dropped."""
    with Timer() as t:
        for name, (model, _) in built.items():
            logits = mv.logits_on(model, run.trained_ref.batch, dev)
            run.measured[name] = mv.compare_logits(run.trained_ref.logits, logits)
    trace.timings["targets_measured_s"] = t.seconds
    if options.qlora_target == "auto":
        run.target, run.reason = mt.choose(run.measured)
    else:
        run.target, run.reason = options.qlora_target, f"merge.qlora_target: {options.qlora_target}"
    for name in [n for n in built if n != run.target]:
        del built[name]
    logger.info("QLoRA merge target: %s (%s)", run.target, run.reason)


def _float_target(
    options: MergeOptions, inputs: _Inputs, load_kwargs: dict[str, Any], dev: str, trace: _Trace
) -> tuple[Any, dict[str, Any]]:
    """A fresh float base with the adapter, merged (the reference model's base holds the trained weights)."""
    _, base_model = _load_base(options, inputs, load_kwargs, dev, trace)
    return _merge(_load_adapter(base_model, options, inputs, trace), inputs, trace)


def _check_options(options: MergeOptions) -> int:
    """Settings argparse cannot check (the workflow passes them from its config); returns the shard size."""
    if options.dtype not in DTYPES:
        raise Lora2ggufError(f"dtype {options.dtype!r} (merge.dtype) is not one of {', '.join(DTYPES)}")
    if options.device not in DEVICES:
        raise Lora2ggufError(f"device {options.device!r} (merge.device) is not one of {', '.join(DEVICES)}")
    if options.qlora_target not in QLORA_TARGETS:
        raise Lora2ggufError(
            f"QLoRA target {options.qlora_target!r} (merge.qlora_target) is not one of {', '.join(QLORA_TARGETS)}"
        )
    shard_bytes = parse_size(options.shard_size)
    if options.out.resolve() in (options.base.resolve(), options.adapter.resolve()):
        raise Lora2ggufError(f"{options.out}: the output folder must differ from the base and adapter folders")
    check_paths(
        [("--base", options.base), ("--adapter", options.adapter), ("--eval-text", options.eval_text)],
        [Output("--out", options.out, OUTPUT_SHAPE), Output("--report", options.report)],
    )
    if options.eval_text is not None and not Path(options.eval_text).is_file():
        raise Lora2ggufError(f"{options.eval_text}: evaluation text not found (--eval-text / evaluation.text)")
    return shard_bytes


def _check_inputs(options: MergeOptions, trace: _Trace) -> _Inputs:
    """Everything that can be checked from headers, before spending time on loading."""
    shard_bytes = _check_options(options)
    base, adapter = options.base, options.adapter
    adapter_cfg = mi.read_adapter_config(adapter)
    base_w = mi.find_base_weights(base, options.allow_pickle)
    adapter_w = mi.find_adapter_weights(adapter, options.allow_pickle)
    base_config = read_json(base / "config.json")
    name_check = mi.base_name_check(adapter_cfg, base, base_config)
    if name_check["name_matches"] is False:
        trace.warnings.append(
            f"adapter records base {name_check['recorded']!r}, configured base is {str(base)!r} (shapes match)"
        )
    fit = mi.check_adapter_fits_base(adapter_w, base_w, adapter_cfg, base_config)
    tok_src = _tokenizer_source(adapter, base)
    dtype_name = hf.checkpoint_dtype(base_config) if options.dtype == "auto" else options.dtype
    trained = _trained_on(options)
    logger.info("inputs: base %s, adapter %s (%d LoRA tensors), tokenizer from %s; trained on %s (%s)", base,
                adapter, fit["lora_tensors"], tok_src, trained.kind, trained.source)  # fmt: skip
    return _Inputs(adapter_cfg, base_w, adapter_w, name_check, fit, tok_src, dtype_name, shard_bytes, trained)


def _has_bitsandbytes() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def _trained_on(options: MergeOptions) -> qlora.TrainedOn:
    """How the run was trained; an LLM.int8 run needs bitsandbytes for its trained reference."""
    trained = qlora.read_trained_on(options.adapter, options.trained_on, options.base,
                                    "--trained-on (candidates.<name>.trained_on)")  # fmt: skip
    if trained.kind == "int8" and options.qlora_target != "float" and not _has_bitsandbytes():
        raise Lora2ggufError(
            f"{options.adapter}: the run was trained on an 8-bit (LLM.int8) base ({trained.source}); its trained "
            "model is bitsandbytes' own 8-bit forward pass (it quantizes activations too), so bitsandbytes is needed "
            "to measure the merge targets against it: pip install 'lora2gguf[qlora]', or set merge.qlora_target: "
            "float (--qlora-target float) to merge into the float base without that measurement"
        )
    return trained


def _torch_setup(options: MergeOptions, inputs: _Inputs) -> tuple[str, dict[str, Any]]:
    """The device and the from_pretrained arguments shared by the base load and the reload."""
    # Belt and braces on top of local_files_only: nothing in a merge may reach the Hugging Face hub
    # (read by huggingface_hub when transformers/peft are first imported).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    # Imported before the timers start, so that load_s and the total time measure work, not imports.
    from peft import PeftModel  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    dev = hf.select_device(options.device, "merge.device")
    # Seeded so that anything transformers initialises (new rows of a resized embedding) is the same each run.
    torch.manual_seed(0)
    load_kwargs: dict[str, Any] = {
        **hf.dtype_kwarg(getattr(torch, inputs.dtype_name)),
        "local_files_only": True,
        "trust_remote_code": options.trust_remote_code,
        "use_safetensors": inputs.base_w.kind == "safetensors",
    }
    if dev.startswith("cuda"):
        load_kwargs["device_map"] = dev  # straight onto the GPU, without a full copy in host memory first
    return dev, load_kwargs


def _non_finite(tensors: Iterable[tuple[str, Any]]) -> tuple[str, int] | None:
    """The first floating-point tensor holding NaN/Inf, and how many such values it holds."""
    import torch

    for name, tensor in tensors:
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        # min and max propagate NaN and are Inf where any value is: one cheap pass (torch.isfinite on
        # bf16 runs about 20x slower on a CPU), and the exact count only for a tensor that fails it.
        low, high = torch.aminmax(tensor)
        if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
            return name, int((~torch.isfinite(tensor)).sum())
    return None


def _load_base(
    options: MergeOptions, inputs: _Inputs, load_kwargs: dict[str, Any], dev: str, trace: _Trace
) -> tuple[Any, Any]:
    """The tokenizer and the base model on ``dev``, resized to the vocabulary the adapter's copies imply."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            inputs.tok_src, local_files_only=True, trust_remote_code=options.trust_remote_code
        )
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for bad files
        raise Lora2ggufError(f"{inputs.tok_src}: cannot load the tokenizer: {exc}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(options.base, **load_kwargs)
    except Exception as exc:  # noqa: BLE001
        raise Lora2ggufError(f"{options.base}: cannot load the base model: {exc}") from None
    # A NaN/Inf in the base would otherwise surface later as "base+adapter produce NaN logits",
    # blaming the adapter; name the base tensor instead.
    bad = _non_finite(model.named_parameters())
    if bad is not None:
        files = inputs.base_w.files
        raise Lora2ggufError(
            f"{files[0] if len(files) == 1 else options.base}: base tensor '{bad[0]}' holds "
            f"{bad[1]} NaN/Inf values; nothing was written"
        )
    model.to(dev)
    rows = model.get_input_embeddings().weight.shape[0]
    resized = inputs.fit["resized_vocab_rows"]
    if resized is not None and resized != rows:
        trace.notes.append(f"resized base embeddings {rows} -> {resized} rows (adapter copies)")
        logger.info("%s", trace.notes[-1])
        model.resize_token_embeddings(resized, mean_resizing=False)
    return tokenizer, model


def _load_adapter(model: Any, options: MergeOptions, inputs: _Inputs, trace: _Trace) -> Any:
    """peft's unmerged base+adapter in eval mode, refused when an adapter tensor is NaN/Inf or unused."""
    from peft import PeftModel, get_peft_model_state_dict

    try:
        peft_model = PeftModel.from_pretrained(model, options.adapter, is_trainable=False)
    except Exception as exc:  # noqa: BLE001 - peft raises many types for bad adapters
        raise Lora2ggufError(f"{options.adapter}: peft cannot load the adapter: {exc}") from None
    peft_model.eval()
    adapter_file = inputs.adapter_w.files[0]
    # save_embedding_layers=True: the widest set peft may have saved (it adds full embedding
    # layers for a resized vocabulary or on request), so no legitimately saved key counts as unused.
    adapter_state = get_peft_model_state_dict(peft_model, save_embedding_layers=True)
    loaded = {k.replace(".default", "") for k in adapter_state}
    bad = _non_finite(adapter_state.items())
    if bad is not None:
        raise Lora2ggufError(
            f"{adapter_file}: adapter tensor '{bad[0]}' holds {bad[1]} NaN/Inf values; nothing was written"
        )
    del adapter_state
    _separate_tied_embeddings_if_adapted(peft_model, trace.notes)
    not_loaded = sorted(set(inputs.adapter_w.tensors) - loaded)
    if not_loaded:
        raise Lora2ggufError(
            f"{adapter_file}: peft did not use {len(not_loaded)} adapter tensors, e.g. "
            f"'{not_loaded[0]}' (target modules missing from the base?)"
        )
    return peft_model


def _reference_logits(
    peft_model: Any, tokenizer: Any, options: MergeOptions, inputs: _Inputs, dev: str, trace: _Trace
) -> _Reference:
    """The unmerged model's logits on the fixed batch, refused when they are already NaN/Inf."""
    import torch

    rows = peft_model.get_input_embeddings().weight.shape[0]
    batch, info = mv.build_token_batch(
        tokenizer,
        options.eval_text,
        rows,
        options.verify_sequences or mv.DEFAULT_SEQUENCES,
        options.verify_seq_len or mv.DEFAULT_SEQ_LEN,
    )
    with Timer() as t:
        logits = mv.logits_on(peft_model, batch, dev)
    trace.timings["reference_forward_s"] = t.seconds
    if not bool(torch.isfinite(logits).all()):
        raise Lora2ggufError(
            f"{inputs.adapter_w.files[0]}: base+adapter already produce NaN/Inf logits before merging "
            f"(dtype {inputs.dtype_name}); nothing was written"
        )
    return _Reference(batch, info, logits)


def _merge(peft_model: Any, inputs: _Inputs, trace: _Trace) -> tuple[Any, dict[str, Any]]:
    """merge_and_unload, refused on NaN/Inf; returns the merged model and its embedding tying."""
    adapter_file = inputs.adapter_w.files[0]
    with Timer() as t:
        try:
            # DoRA keeps peft's safe merge (its in-place path computes the norms another way).
            dora = bool(inputs.adapter_cfg.get("use_dora", False))
            with contextlib.nullcontext() if dora else _updates_rounded_to_weight_dtype():
                merged = peft_model.merge_and_unload(progressbar=True, safe_merge=dora)
        except ValueError as exc:
            raise Lora2ggufError(f"{adapter_file}: merge failed: {exc}; nothing was written") from None
        bad = _non_finite(merged.state_dict().items())
        if bad is not None:
            raise Lora2ggufError(
                f"{adapter_file}: the merge produced {bad[1]} NaN/Inf values in '{bad[0]}'; the adapter weights "
                "are broken or overflow this dtype (try --dtype float32); nothing was written"
            )
        tying = _embedding_tying(merged, trace.warnings)
    trace.timings["merge_s"] = t.seconds
    return merged, tying


@contextlib.contextmanager
def _updates_rounded_to_weight_dtype() -> Iterator[None]:
    """Have peft's in-place merge add each update rounded to the weight's dtype, as its safe merge does.

    In place (safe_merge=False), peft adds the update as computed, in float32 when the adapter's
    factors are; the safe merge rounds it to the weight's dtype first, and every earlier lora2gguf
    release wrote those bytes. The safe merge also replaces each weight by a copy: with the base
    memory-mapped, the file's pages stayed resident beside the copies (2.4 GB peak for a 0.99 GB bf16
    model, against 1.7-1.9 GB in place). Rounding here keeps the bytes without the copies.
    """
    from peft.tuners.lora import layer

    originals = {cls: cls.get_delta_weight for cls in (layer.Linear, layer.Embedding)}

    def rounded(original: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
        def get_delta_weight(self: Any, adapter: str) -> Any:
            return original(self, adapter).to(self.get_base_layer().weight.dtype)

        return get_delta_weight

    for cls, original in originals.items():
        cls.get_delta_weight = rounded(original)
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.get_delta_weight = original


def _write_folder(
    merged: Any, tokenizer: Any, tmp: Path, options: MergeOptions, inputs: _Inputs, trace: _Trace
) -> _Written:
    """Weights (sharded above the shard size), config, generation config and tokenizer files into ``tmp``."""
    with Timer() as t:
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=inputs.shard_bytes)
        _generation_config(merged, options.base, tokenizer, tmp, trace.notes)
        copied = _copy_tokenizer(inputs.tok_src, tmp)
        if inputs.tok_src != options.base and getattr(tokenizer, "chat_template", None) is None:
            copied += _chat_template_from_base(options.base, tmp, trace.warnings)
        if inputs.tok_src != options.base:
            copied += _sentencepiece_model_from_base(inputs.tok_src, options.base, tmp, trace.notes)
        weights = _check_output_safetensors(tmp)
        _normal_permissions(tmp)
    trace.timings["save_s"] = t.seconds
    return _Written(copied, weights)


def _verify_written(
    tmp: Path,
    merged: Any,
    ref: _Reference,
    dev: str,
    options: MergeOptions,
    inputs: _Inputs,
    tying: dict[str, Any],
    trace: _Trace,
    also: Any = None,
) -> _Verified:
    """Hold the written folder against the reference: its config is the base's, and the written weights,
    loaded into the merged model in place, give the reference's logits (and are measured against
    ``also``, a second reference's logits, when given).

    The artifact itself is verified, not the in-memory model: a save that drops or unties a tensor
    would otherwise pass unnoticed. Loading in place keeps one copy of the weights in memory.
    """
    from transformers import AutoTokenizer

    with Timer() as t:
        config_changes = _check_written_config(tmp, options, inputs)
        try:
            out_tokenizer = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        except Exception as exc:  # noqa: BLE001
            raise Lora2ggufError(f"{options.out}: the written tokenizer does not load back: {exc}") from None
        mv.load_written_weights(merged, tmp)
        logits = mv.logits_on(merged, ref.batch, dev)
        metrics = mv.compare_logits(ref.logits, logits)
        vs_also = None if also is None else mv.compare_logits(also, logits)
    trace.timings["verify_s"] = t.seconds
    problems = mv.check_tolerance(metrics, inputs.dtype_name)
    if problems:
        raise Lora2ggufError(
            f"{options.out}: merged model disagrees with base+adapter ({'; '.join(problems)}; "
            f"dtype {inputs.dtype_name}); nothing was written"
        )
    out_rows = merged.get_input_embeddings().weight.shape[0]
    if len(out_tokenizer) > out_rows:
        raise Lora2ggufError(
            f"{inputs.tok_src}: the tokenizer has {len(out_tokenizer)} tokens but the merged model only {out_rows} "
            "embedding rows (tokens were added without training resized embeddings: modules_to_save "
            "embed_tokens/lm_head); nothing was written"
        )
    chat_template = getattr(out_tokenizer, "chat_template", None) is not None
    return _Verified(metrics, out_rows, len(out_tokenizer), chat_template, sha256_tree(tmp), config_changes, vs_also)


# What a merge may change in config.json: bookkeeping, the dtype it was asked for, the vocabulary an
# adapter resized and the tying it had to undo (both checked again, tensor by tensor, by merge.algebra).
_CONFIG_MAY_CHANGE = frozenset({"dtype", "torch_dtype", "transformers_version", "vocab_size", "tie_word_embeddings"})
# Where each config was read from: not part of the file.
_CONFIG_LOAD_KEYS = frozenset({"_name_or_path"})


def _check_written_config(tmp: Path, options: MergeOptions, inputs: _Inputs) -> list[str]:
    """The written config.json describes the base's architecture: both read through transformers (which
    fills in defaults the same way), only the keys a merge may change differ. Returns those that did."""
    from transformers import AutoConfig

    try:
        written = AutoConfig.from_pretrained(tmp, local_files_only=True).to_dict()
    except Exception as exc:  # noqa: BLE001
        raise Lora2ggufError(f"{tmp / 'config.json'}: the written config does not load back: {exc}") from None
    base = AutoConfig.from_pretrained(
        options.base, local_files_only=True, trust_remote_code=options.trust_remote_code
    ).to_dict()
    keys = (written.keys() | base.keys()) - _CONFIG_LOAD_KEYS
    changed = sorted(k for k in keys if written.get(k) != base.get(k))
    wrong = [k for k in changed if k not in _CONFIG_MAY_CHANGE]
    if wrong:
        raise Lora2ggufError(
            f"{options.out / 'config.json'}: key '{wrong[0]}' is {written.get(wrong[0])!r} but the base's is "
            f"{base.get(wrong[0])!r}: the written model would not be the base's architecture; nothing was written"
        )
    return changed


def _check_tensors(tmp: Path, options: MergeOptions, inputs: _Inputs, verified: _Verified, trace: _Trace) -> dict:
    """Every written tensor against the base and adapter files (merge.algebra), tying as written."""
    config = read_json(tmp / "config.json")
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    tied = bool(text_config.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    with Timer() as t:
        expected = ma.expectations(inputs.base_w, inputs.adapter_w, inputs.adapter_cfg, tied)
        figures = ma.check_merged_weights(tmp, expected, inputs.dtype_name)
    trace.timings["tensor_check_s"] = t.seconds
    logger.info(
        "every written tensor is the base plus the adapter's update: %d elements, worst error %.3g of its "
        "rounding bound (%s)", figures["elements"], figures["max_error_to_bound"], options.out,
    )  # fmt: skip
    return figures


def _report(
    options: MergeOptions,
    inputs: _Inputs,
    *,
    dev: str,
    ref: _Reference,
    tying: dict[str, Any],
    written: _Written,
    verified: _Verified,
    trace: _Trace,
    total_s: float,
    memory: dict[str, Any],
    qlora_run: _QLoRA | None = None,
) -> dict[str, Any]:
    body = {
        "model": options.out.name.removesuffix("-merged"),
        "output": {
            "dir": str(options.out),
            "dtype": inputs.dtype_name,
            "weights": written.weights,
            "vocab_rows": verified.vocab_rows,
            "tokenizer_len": verified.tokenizer_len,
            "tokenizer_source": str(inputs.tok_src),
            "tokenizer_files": written.tokenizer_files,
            "chat_template": verified.chat_template,
            "tie_word_embeddings": tying,
            "sha256": verified.sha256,
        },
        "inputs": {
            "base": str(options.base),
            "adapter": str(options.adapter),
            "eval_text": None if options.eval_text is None else str(options.eval_text),
        },
        "adapter": _adapter_facts(inputs),
        # Negative lora_alpha / alpha_pattern values (logged as warnings by the input checks).
        "adapter_warnings": mi.alpha_warnings(inputs.adapter_cfg),
        "base_check": {**inputs.name_check, "shapes_match": True, "weights_format": inputs.base_w.kind},
        "settings": _settings(options, inputs, dev),
        "trained_on": inputs.trained.as_dict(),
        "qlora": _qlora_facts(options, inputs, qlora_run, verified),
        "verification": {
            "compared": (
                "peft base+adapter (unmerged) vs the written weights, loaded into the merged model"
                if qlora_run is None or qlora_run.target == "float"
                else "peft base as trained (quantized layers dequantized)+adapter (unmerged) vs the written "
                "weights, loaded into the merged model"
            ),
            "batch": ref.info,
            "compute": "float32 matrix products on the stored weights",
            **verified.metrics,
            "tolerance": mv.TOLERANCES[inputs.dtype_name].as_dict(verified.metrics["max_abs_reference_logit"]),
            "config_keys_changed": verified.config_changes,
            "tensors": verified.tensors,
            "passed": True,
        },
        "timing_s": {"total": round(total_s, 3), **{k: round(v, 3) for k, v in trace.timings.items()}},
        "memory": memory,
        "input_sha256": _input_hashes(options, inputs),
        "device_info": device_info(dev),
        # A QLoRA auto merge loads the base twice: the same note or warning is kept once.
        "warnings": list(dict.fromkeys(trace.warnings)),
        "notes": list(dict.fromkeys(trace.notes)),
    }
    return build_report("merge_report", body)


_TRAINED_REFERENCE = {
    "nf4": "the base with every layer bitsandbytes quantizes replaced by its 4-bit round trip (lora2gguf.qlora, "
    "bitsandbytes' CUDA arithmetic) + the adapter, unmerged, in the merge dtype",
    "int8": "the base loaded by transformers with bitsandbytes' LLM.int8 layers (Linear8bitLt, threshold 6.0) in the "
    "run's compute dtype + the adapter, unmerged: bitsandbytes' own forward pass on this device",
}
_TRAINED_REFERENCE["fp4"] = _TRAINED_REFERENCE["nf4"]


def _qlora_facts(
    options: MergeOptions, inputs: _Inputs, run: _QLoRA | None, verified: _Verified
) -> dict[str, Any] | None:
    """The QLoRA part of the report: the target and why, the quantization error against the adapter's
    update, and each target's distance from the trained reference (mean KL etc.)."""
    if run is None:
        return None
    return {
        "target_requested": options.qlora_target,
        "target": run.target,
        "reason": run.reason,
        "trained_reference": _TRAINED_REFERENCE[inputs.trained.kind],
        "quantization_vs_lora_update": run.errors,
        "targets_vs_trained_reference": run.measured,
        "written_vs_trained_reference": verified.vs_trained if verified.vs_trained is not None else verified.metrics,
    }


def _adapter_facts(inputs: _Inputs) -> dict[str, Any]:
    cfg = inputs.adapter_cfg
    target_modules = cfg.get("target_modules")
    return {
        "peft_type": cfg.get("peft_type"),
        "r": cfg.get("r"),
        "lora_alpha": cfg.get("lora_alpha"),
        "use_rslora": bool(cfg.get("use_rslora", False)),
        "use_dora": bool(cfg.get("use_dora", False)),
        # peft writes target_modules from a set, in arbitrary order: sorted for stable reports.
        "target_modules": sorted(target_modules) if isinstance(target_modules, list) else target_modules,
        "modules_to_save": cfg.get("modules_to_save"),
        "full_weight_tensors": inputs.fit["full_weight_tensors"],
        "lora_tensors": inputs.fit["lora_tensors"],
        "weights_format": inputs.adapter_w.kind,
    }


def _settings(options: MergeOptions, inputs: _Inputs, dev: str) -> dict[str, Any]:
    return {
        "dtype_requested": options.dtype,
        "dtype": inputs.dtype_name,
        "device_requested": options.device,
        "device": dev,
        "shard_size_bytes": inputs.shard_bytes,
        "allow_pickle": options.allow_pickle,
        "trust_remote_code": options.trust_remote_code,
        "trained_on_requested": options.trained_on,
        "qlora_target": options.qlora_target,
        "merge": "peft PeftModel.from_pretrained(...).merge_and_unload(), in place with each update rounded to the "
        "weight's dtype first (safe_merge's arithmetic; DoRA: safe_merge=True), then every tensor checked for NaN/Inf",
    }


def _digests(paths: list[Path]) -> dict[str, str]:
    return {str(p): sha256_file(p) for p in sorted(set(paths)) if p.is_file()}


def _input_hashes(options: MergeOptions, inputs: _Inputs) -> dict[str, dict[str, str]]:
    base, adapter = options.base, options.adapter
    base_files = [*inputs.base_w.files, base / "config.json", base / "generation_config.json"]
    if inputs.base_w.index_file is not None:
        base_files.append(inputs.base_w.index_file)
    return {
        "adapter": _digests([*inputs.adapter_w.files, adapter / "adapter_config.json"]),
        "base": _digests(base_files),
        "tokenizer": _digests([inputs.tok_src / n for n in TOKENIZER_FILES]),
        "eval_text": _digests([options.eval_text]) if options.eval_text is not None else {},
    }


def parse_size(text: str | int) -> int:
    """'2GB' -> 2_000_000_000 (decimal units like Hugging Face; KiB/MiB/GiB are binary)."""
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.match(str(text))
        if match is None:
            raise Lora2ggufError(f"shard size {text!r} is not a size like 2GB, 500MB or 1GiB (merge.shard_size)")
        value = int(float(match[1]) * _SIZE_UNITS[(match[2] or "B").upper()])
    if value <= 0:
        raise Lora2ggufError(f"shard size {text!r} must be positive (merge.shard_size)")
    return value


def _tokenizer_source(adapter: Path, base: Path) -> Path:
    # LLaMA-Factory saves the tokenizer next to the adapter, with added tokens and its chat template.
    if (adapter / "tokenizer_config.json").is_file() or (adapter / "tokenizer.json").is_file():
        return adapter
    return base


def _copy_tokenizer(source: Path, dest: Path) -> list[str]:
    """Copy tokenizer files byte for byte: re-serialising could drop a chat template or added tokens.

    The output is what gets published: a file that resolves outside ``source`` (a link to a private
    key, say) is refused, and the copies get ordinary permissions, not the source's mode.
    """
    present = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    check_links_inside(source, [source / name for name in present])
    copied = []
    for name in present:
        # copyfile copies the bytes only: the copy is created with the umask's mode, never the source's.
        shutil.copyfile(source / name, dest / name)
        copied.append(name)
    if not copied:
        raise Lora2ggufError(f"{source}: no tokenizer files (tokenizer.json / tokenizer_config.json) found")
    return copied


def _sentencepiece_model_from_base(source: Path, base: Path, dest: Path, notes: list[str]) -> list[str]:
    """transformers 5 saves a SentencePiece tokenizer (Gemma, Mistral, Phi-3) without tokenizer.model, which
    GGUF conversion needs: the run's folder lacks it, so the base's, which the run's vocabulary extends, is kept."""
    if (source / "tokenizer.model").is_file() or not (base / "tokenizer.model").is_file():
        return []
    check_links_inside(base, [base / "tokenizer.model"])
    shutil.copyfile(base / "tokenizer.model", dest / "tokenizer.model")
    notes.append("the run's tokenizer files have no tokenizer.model; the base's was kept (GGUF conversion needs it)")
    return ["tokenizer.model (from base)"]


def _chat_template_from_base(base: Path, dest: Path, warnings_out: list[str]) -> list[str]:
    """The run's tokenizer has no chat template: keep the base's, so chat use still formats turns."""

    template = None
    if (base / "chat_template.jinja").is_file():
        template = (base / "chat_template.jinja").read_text(encoding="utf-8")
    elif (base / "tokenizer_config.json").is_file():
        value = read_json(base / "tokenizer_config.json").get("chat_template")
        template = value if isinstance(value, str) else None
    if template is None:
        return []
    (dest / "chat_template.jinja").write_text(template, encoding="utf-8")
    message = "the run's tokenizer has no chat template; the base's was kept (chat_template.jinja)"
    warnings_out.append(message)
    logger.warning("%s", message)
    return ["chat_template.jinja (from base)"]


def _separate_tied_embeddings_if_adapted(peft_model: Any, notes: list[str]) -> None:
    """Give the output head its own tensor when LoRA adapts one side of a tied embedding.

    Unmerged, a LoRA on embed_tokens changes only the input lookup while lm_head keeps using the
    base matrix. Merging in place into the shared tensor would change lm_head as well, i.e. a
    different model from the one trained (peft #2244, llama.cpp #9065); copying first keeps the
    trained function, and the output is then written untied.
    """
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = peft_model.get_base_model()
    in_mod, out_mod = model.get_input_embeddings(), model.get_output_embeddings()
    if in_mod is None or out_mod is None:
        return
    adapted = isinstance(in_mod, BaseTunerLayer) or isinstance(out_mod, BaseTunerLayer)
    if not adapted or in_mod.weight is not out_mod.weight:
        return
    holder = out_mod.get_base_layer() if isinstance(out_mod, BaseTunerLayer) else out_mod
    holder.weight = torch.nn.Parameter(in_mod.weight.detach().clone(), requires_grad=False)
    notes.append("LoRA adapts a tied embedding: lm_head given its own copy before merging")
    logger.info("%s", notes[-1])


def _embedding_tying(model: Any, warnings_out: list[str]) -> dict[str, Any]:
    """Keep tied embeddings tied when the merge left them equal; untie (and say so) when it did not.

    With modules_to_save on embed_tokens / lm_head, peft trains two separate copies of what was one
    tied matrix, so after the merge they can differ; keeping them tied would silently change the model.
    """
    import torch

    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    tied_in = bool(getattr(text_config, "tie_word_embeddings", False))
    info: dict[str, Any] = {"base_tied": tied_in, "output_tied": tied_in, "reason": None}
    out_emb = model.get_output_embeddings()
    if not tied_in or out_emb is None:
        return info
    in_w = model.get_input_embeddings().weight
    out_w = out_emb.weight
    if in_w is out_w or in_w.data_ptr() == out_w.data_ptr():
        info["reason"] = "input and output embeddings share one tensor"
        return info
    if in_w.shape == out_w.shape and torch.equal(in_w, out_w):
        out_emb.weight = in_w  # equal values: share them again so only one matrix is written
        info["reason"] = "input and output embeddings equal after the merge; re-tied"
        return info
    text_config.tie_word_embeddings = False
    config.tie_word_embeddings = False
    info["output_tied"] = False
    info["reason"] = (
        "the adapter changed the input and output embeddings differently (separate modules_to_save copies "
        "or LoRA on only one of them); they are written as two matrices and tie_word_embeddings=false"
    )
    warnings_out.append(info["reason"])
    logger.warning("%s", info["reason"])
    return info


def _generation_config(model: Any, base: Path, tokenizer: Any, out: Path, notes: list[str]) -> None:
    """Base generation config, with the tokenizer's EOS added so chat generation stops."""
    from transformers import GenerationConfig

    if (base / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(base, local_files_only=True)
    else:
        gen = GenerationConfig.from_model_config(model.config)
        notes.append("base has no generation_config.json; derived one from config.json")
    eos = tokenizer.eos_token_id
    if eos is not None:
        current = gen.eos_token_id
        ids = [] if current is None else ([current] if isinstance(current, int) else list(current))
        if eos not in ids:
            # LLaMA-Factory's chat templates often switch EOS (e.g. to <|im_end|>): without it generation never ends.
            gen.eos_token_id = ids + [eos] if ids else eos
            notes.append(f"generation_config eos_token_id {current} -> {gen.eos_token_id} (tokenizer EOS)")
    if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    gen.save_pretrained(out)


def _check_output_safetensors(folder: Path) -> dict[str, Any]:
    """The written shards: names, sizes and metadata (which must carry nothing run-specific)."""
    shards = sorted(folder.glob("*.safetensors"))
    metadata = {}
    for shard in shards:
        meta = read_metadata(shard)
        extra = {k: v for k, v in meta.items() if k != "format"}
        if extra:
            # Anything beyond the format tag (dates, paths, pids) would break byte-identical reruns.
            raise Lora2ggufError(f"{shard}: unexpected safetensors metadata {extra} (breaks reproducibility)")
        metadata[shard.name] = meta
    return {
        "files": [s.name for s in shards],
        "sharded": len(shards) > 1,
        "bytes": sum(s.stat().st_size for s in shards),
        "metadata": metadata,
    }


def _normal_permissions(folder: Path) -> None:
    """Files as the umask allows (the weights writer leaves 0600, unreadable for a shared cluster group)."""
    mask = os.umask(0)
    os.umask(mask)
    for item in folder.iterdir():
        if item.is_file():
            item.chmod(0o666 & ~mask)


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

