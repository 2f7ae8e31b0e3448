"""``lora2gguf adapter``: a run's peft LoRA adapter -> a llama.cpp LoRA GGUF for the run's base.

Layout and naming follow llama.cpp's ``convert_lora_to_gguf.py`` (pinned with llama-cpp-python
0.3.36): per adapted base matrix ``<gguf name>.lora_a`` ([r, in]) and ``<gguf name>.lora_b``
([out, r]), with lora_b's rows in the base's GGUF order (llama: q/k rows permuted per head, as the
converter does to the base weights) and, for the token embedding, lora_a transposed ([vocab, r],
what llama.cpp's ``build_inp_embd`` reads). For a plain LoRA the file is byte-identical to that script's.

Scaling. llama.cpp multiplies each pair's update by ``alpha / r`` (``llama_adapter_lora_weight::
get_scale``: ``adapter.lora.alpha`` over ``lora_b``'s ``ne[0]``, the pair's own rank), with one alpha
per file. peft multiplies by ``s_m = alpha_m / r_m``, or ``alpha_m / sqrt(r_m)`` with rsLoRA, where
``alpha_m`` may come from ``alpha_pattern``. Writing ``A`` = the alpha most modules need
(``t_m = s_m * r_m``) and ``lora_b' = (t_m / A) * lora_b`` gives, for every module,
``(A / r_m) * lora_b' @ lora_a = (t_m / r_m) * lora_b @ lora_a = s_m * lora_b @ lora_a``: exactly
peft's update (up to one rounding of lora_b' in the output type, and of A to float32). Modules with
``t_m = A`` keep their lora_b untouched; a plain LoRA has ``t_m = lora_alpha`` everywhere, so nothing
changes. The reference script always writes ``lora_alpha`` and so scales rsLoRA adapters by
``1/sqrt(r)`` too little and alpha_pattern modules by ``lora_alpha / alpha_m``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from lora2gguf import archs
from lora2gguf.adapter.peft_adapter import MERGE_HINT, LoraPair, PeftAdapter, read_adapter
from lora2gguf.artifacts import Output, atomic_file, check_paths, paired_report, sha256_file
from lora2gguf.errors import Lora2ggufError
from lora2gguf.formats.safetensors import TensorEntry, index_tensors, open_tensor
from lora2gguf.provenance import build_report

logger = logging.getLogger(__name__)

QT = gguf.GGMLQuantizationType
# --outtype -> the GGUF type of every lora_a / lora_b (as convert_lora_to_gguf.py --outtype).
OUTTYPES: dict[str, gguf.GGMLQuantizationType] = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0}


@dataclass(frozen=True)
class AdapterOptions:
    """What ``lora2gguf adapter`` was asked to do."""

    run: Path  # the run folder (adapter_config.json, adapter_model.safetensors)
    base: Path  # the base model folder the run was trained on (config.json, *.safetensors)
    out: Path  # the adapter GGUF to write
    outtype: str = "f16"
    report: Path | None = None  # also write the JSON report here
    allow_pickle: bool = False  # accept adapter_model.bin


@dataclass
class PlannedPair:
    """One pair as it is written: GGUF base name, factors in llama.cpp's layout, the folded factor."""

    pair: LoraPair
    gguf_name: str
    a: np.ndarray
    b: np.ndarray
    factor: float  # multiplies lora_b; 1.0 leaves it as trained


@dataclass(frozen=True)
class _Base:
    folder: Path
    spec: archs.ArchSpec
    hp: archs.HParams
    tensors: dict[str, TensorEntry]


def _read_base(base: Path) -> _Base:
    if not base.is_dir():
        raise Lora2ggufError(f"{base}: base model folder not found")
    config = archs.load_config(base)
    spec = archs.spec_for(config, base / "config.json")
    hp = archs.read_hparams(config, base / "config.json")
    return _Base(base, spec, hp, {e.name: e for e in index_tensors(base)})


def _gguf_name(adapter: PeftAdapter, pair: LoraPair, base: _Base, name_map: gguf.TensorNameMap) -> str:
    """The base tensor the pair modifies, by its GGUF name; refuse what llama.cpp cannot apply."""
    where = adapter.weights_file
    name = name_map.get_name(f"{pair.module}.weight", try_suffixes=(".weight", ".bias"))
    if name is None:
        raise Lora2ggufError(
            f"{where}: module '{pair.module}' has no {base.spec.name} GGUF tensor, so a llama.cpp LoRA adapter cannot "
            f"target it; {MERGE_HINT}"
        )
    transform = base.spec.transform
    if transform is not None and transform(f"{pair.module}.weight", np.zeros(1, np.float32)).any():
        # The base tensor is stored changed in the GGUF (Gemma's norms as w + 1): an update added to it
        # would not be peft's.
        raise Lora2ggufError(
            f"{where}: module '{pair.module}' is LoRA-adapted but {base.spec.name} stores that tensor transformed in "
            f"the GGUF, which a llama.cpp LoRA adapter cannot express; {MERGE_HINT}"
        )
    if base.hp.tie_word_embeddings and name in ("token_embd.weight", "output.weight"):
        raise Lora2ggufError(
            f"{where}: module '{pair.module}' is LoRA-adapted but the base ties its input embedding and output head "
            "(llama.cpp keeps one tensor, token_embd.weight, for both, while peft changes only this module), which a "
            f"llama.cpp LoRA adapter cannot express; {MERGE_HINT}"
        )
    return name


def _check_shape(adapter: PeftAdapter, pair: LoraPair, base: _Base) -> None:
    target = base.tensors.get(f"{pair.module}.weight")
    if target is None or len(target.shape) != 2:
        raise Lora2ggufError(
            f"{adapter.weights_file}: module '{pair.module}' is not a weight matrix of the base model {base.folder}: "
            "the adapter was trained for a different base model"
        )
    out_dim, in_dim = target.shape  # nn.Linear [out, in]; nn.Embedding [num_embeddings, dim]
    if pair.embedding:
        out_dim, in_dim = in_dim, out_dim
    if pair.a.shape[1] != in_dim or pair.b.shape[0] != out_dim:
        raise Lora2ggufError(
            f"{adapter.weights_file}: module '{pair.module}': lora_A {list(pair.a.shape)} / "
            f"lora_B {list(pair.b.shape)} "
            f"do not fit the base tensor '{target.name}' {list(target.shape)} in {target.path}: the adapter was "
            "trained for a different base model"
        )


def _check_base_copy(adapter: PeftAdapter, pair: LoraPair, base: _Base) -> None:
    """peft saved the adapted embedding's base matrix: it must be the base's own (a resized vocabulary
    or a retrained embedding would be lost in a llama.cpp adapter)."""
    copy = adapter.base_copies.get(pair.module)
    if copy is None:
        return
    target = base.tensors[f"{pair.module}.weight"]
    with open_tensor(target) as data:
        same = copy.shape == data.shape and np.array_equal(copy.astype(np.float32), data.astype(np.float32))
    if not same:
        raise Lora2ggufError(
            f"{adapter.weights_file}: module '{pair.module}' carries its own base matrix ({list(copy.shape)}) that "
            f"differs from the base's '{target.name}' {list(target.shape)} (resized vocabulary?), which a llama.cpp "
            f"LoRA adapter cannot express; {MERGE_HINT}"
        )


def choose_alpha(pairs: list[LoraPair]) -> float:
    """The adapter.lora.alpha to write: the per-module alpha llama.cpp needs most often (first on a tie).

    For a plain LoRA that is lora_alpha for every module, so no factor is folded anywhere."""
    needed = Counter(p.llama_alpha for p in pairs if p.llama_alpha != 0)
    best = max(needed.values())
    return next(p.llama_alpha for p in pairs if needed.get(p.llama_alpha) == best)


def plan_pairs(adapter: PeftAdapter, base: _Base) -> tuple[list[PlannedPair], float]:
    """Every pair in llama.cpp's layout with its folded factor; and the alpha written."""
    name_map = gguf.get_tensor_name_map(base.spec.gguf_arch, base.hp.block_count)
    alpha = choose_alpha(adapter.pairs)
    planned = []
    for pair in adapter.pairs:
        name = _gguf_name(adapter, pair, base, name_map)
        _check_shape(adapter, pair, base)
        _check_base_copy(adapter, pair, base)
        a, b = pair.a, pair.b
        heads = _permute_heads(pair.module, base)
        if heads is not None:
            try:
                b = archs.permute_qk(b, heads)
            except ValueError as exc:
                raise Lora2ggufError(f"{adapter.weights_file}: module '{pair.module}': lora_B: {exc}") from None
        if name == "token_embd.weight":
            a = np.ascontiguousarray(a.T)  # llama.cpp gathers rows of lora_a by token id
        planned.append(PlannedPair(pair, name, a, b, pair.llama_alpha / alpha))
    return planned, alpha


def _permute_heads(module: str, base: _Base) -> int | None:
    """n_head for the q/k row permutation of lora_b (the converter's rule for the base weight)."""
    if not base.spec.permute_qk:
        return None
    if module.endswith("q_proj"):
        return base.hp.head_count
    if module.endswith("k_proj"):
        return base.hp.n_head_kv
    return None


def _qtype_for(name: str, shape: tuple[int, ...], outtype: str) -> gguf.GGMLQuantizationType:
    qtype = OUTTYPES[outtype]
    if qtype == QT.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[QT.Q8_0][0] != 0:
        # convert_lora_to_gguf.py falls back to F16 the same way (gguf-py's QuantError).
        logger.debug("%s: row length %d is not a multiple of 32, written as F16 instead of Q8_0", name, shape[-1])
        return QT.F16
    return qtype


def encode(name: str, data: np.ndarray, factor: float, qtype: gguf.GGMLQuantizationType, where: str) -> np.ndarray:
    """One factor in its GGUF type; ``factor`` is applied in float64 and rounded once."""
    if data.dtype == np.float64:
        data = data.astype(np.float32)
    if factor != 1.0:
        data = data.astype(np.float64) * factor
        if qtype != QT.F16:
            data = data.astype(np.float32)
    if not np.isfinite(data).all():
        raise Lora2ggufError(f"{where}: {name} holds NaN/Inf values; the adapter is broken")
    if qtype == QT.F32:
        return data.astype(np.float32, copy=False)
    if qtype == QT.F16:
        with np.errstate(over="ignore"):
            out = data.astype(np.float16)
        if not np.isfinite(out).all():
            raise Lora2ggufError(f"{where}: {name} has values beyond the float16 range; use --outtype bf16 or f32")
        return out
    return gguf.quants.quantize(np.asarray(data, dtype=np.float32), qtype)


def build_writer(adapter: PeftAdapter, base_dir: Path, spec: archs.ArchSpec, planned: list[PlannedPair],
                 alpha: float, outtype: str) -> tuple[gguf.GGUFWriter, dict[str, int]]:
    """A gguf-py writer with every tensor and key, in convert_lora_to_gguf.py's order; and the type counts.

    Keys: general.architecture, general.type = adapter, adapter.type = lora, general.* from the run
    folder (gguf-py's model card / folder-name heuristics, name falling back to the base folder's),
    adapter.lora.alpha, general.quantization_version."""
    writer = gguf.GGUFWriter(path=None, arch=spec.name)
    types: Counter[str] = Counter()
    for item in planned:
        for suffix, data, factor in ((".lora_a", item.a, 1.0), (".lora_b", item.b, item.factor)):
            name = item.gguf_name + suffix
            qtype = _qtype_for(name, data.shape, outtype)
            writer.add_tensor(name, encode(name, data, factor, qtype, str(adapter.weights_file)), raw_dtype=qtype)
            types[qtype.name] += 1
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    total, shared, expert, expert_count = writer.get_total_parameter_count()
    meta = gguf.Metadata.load(None, adapter.folder, None, total)
    if meta.name is None:
        meta.name = base_dir.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, expert_count)
    meta.set_gguf_meta_model(writer)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return writer, dict(sorted(types.items()))


def _correction(adapter: PeftAdapter, item: PlannedPair) -> str | None:
    """Why the reference converter's scale is wrong for this module (None: it is right)."""
    pair = item.pair
    reasons = []
    if pair.rslora:
        reasons.append("use_rslora")
    if pair.alpha != adapter.lora_alpha:
        reasons.append("alpha_pattern")
    return "+".join(reasons) or None


def _module_rows(adapter: PeftAdapter, planned: list[PlannedPair], alpha: float) -> list[dict[str, Any]]:
    return [
        {
            "module": item.pair.module,
            "gguf": item.gguf_name,
            "rank": item.pair.rank,
            "alpha": item.pair.alpha,
            "peft_scaling": item.pair.scaling,
            "llama_cpp_scale": alpha / item.pair.rank * item.factor,
            "lora_b_factor": item.factor,
            "reference_converter_scale": adapter.lora_alpha / item.pair.rank,
            "correction": _correction(adapter, item),
        }
        for item in planned
    ]


def _body(options: AdapterOptions, adapter: PeftAdapter, spec: archs.ArchSpec, planned: list[PlannedPair],
          alpha: float, types: dict[str, int]) -> dict[str, Any]:
    modules = _module_rows(adapter, planned, alpha)
    return {
        "step": "adapter",
        "run": str(options.run),
        "base": str(options.base),
        "output": str(options.out),
        "architecture": spec.name,
        "outtype": options.outtype,
        "n_pairs": len(planned),
        "n_tensors": 2 * len(planned),
        "tensor_types": types,
        "ranks": sorted({p.pair.rank for p in planned}),
        "lora_alpha": adapter.lora_alpha,
        "use_rslora": adapter.use_rslora,
        "rank_pattern": adapter.config.get("rank_pattern") or {},
        "alpha_pattern": adapter.config.get("alpha_pattern") or {},
        "alpha_written": alpha,
        "corrected_modules": sum(1 for m in modules if m["correction"]),
        "folded_modules": sum(1 for p in planned if p.factor != 1.0),
        "same_as_reference_converter": all(m["correction"] is None for m in modules),
        "modules": modules,
        "input_sha256": {
            "adapter_config.json": sha256_file(options.run / "adapter_config.json"),
            adapter.weights_file.name: sha256_file(adapter.weights_file),
            "base/config.json": sha256_file(options.base / "config.json"),
        },
        "adapter_bytes": adapter.weights_file.stat().st_size,
    }


def export_adapter(options: AdapterOptions) -> dict[str, Any]:
    """Write the run's adapter as a llama.cpp LoRA GGUF (and the report); returns the report body."""
    if options.outtype not in OUTTYPES:
        raise Lora2ggufError(f"--outtype {options.outtype!r} is not one of {', '.join(OUTTYPES)}")
    check_paths(
        [("RUN", options.run), ("--base", options.base)],
        [Output("OUT.gguf", options.out), Output("--report", options.report)],
    )
    start = time.perf_counter()
    adapter = read_adapter(options.run, options.allow_pickle)
    base = _read_base(options.base)
    planned, alpha = plan_pairs(adapter, base)
    writer, types = build_writer(adapter, options.base, base.spec, planned, alpha, options.outtype)
    body = _body(options, adapter, base.spec, planned, alpha, types)
    with paired_report(options.report) as write_report, atomic_file(options.out) as temp:
        try:
            writer.write_header_to_file(path=temp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        body["file_bytes"] = temp.stat().st_size
        body["output_sha256"] = sha256_file(temp)
        body["seconds"] = round(time.perf_counter() - start, 3)
        write_report(build_report("adapter", body, device="cpu"))
    logger.info(
        "wrote %s: %d LoRA pairs (%s), rank %s, alpha %g%s, %.2f MiB",
        options.out, len(planned), ", ".join(f"{k} x{v}" for k, v in types.items()),
        "/".join(map(str, body["ranks"])), alpha,
        f", scale corrected for {body['corrected_modules']} module(s)" if body["corrected_modules"] else "",
        body["file_bytes"] / 2**20,
    )
    return body
