"""`lora2gguf merge`: merge a LoRA adapter into its base model with peft, verify it, write an HF folder.

Flow: check the inputs from file headers (merge_inputs) -> load base (+ resize a vocabulary the
adapter extended) -> PeftModel -> reference logits on a fixed batch -> merge_and_unload(safe_merge)
-> reject NaN/Inf -> write weights, config, generation config and tokenizer into a temporary folder
-> reload that folder and compare its logits with the reference (merge_verify) -> rename into place
-> write the report. Any failure leaves no output folder and no report.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from lora2gguf.errors import Lora2ggufError

logger = logging.getLogger(__name__)

HELP = "merge a LoRA adapter into its base model (peft), verify the logits, write an HF folder"

DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
REPORT_SCHEMA = "lora2gguf/merge_report/1"

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, type=Path, help="base model folder (Hugging Face layout)")
    parser.add_argument(
        "--adapter", required=True, type=Path, help="LoRA run folder with adapter_config.json (LLaMA-Factory output)"
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder for the merged model")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="weight dtype of the merge and output (auto: the base's)"
    )
    parser.add_argument("--device", choices=DEVICES, default="auto", help="where to merge (auto: cuda if available)")
    parser.add_argument(
        "--shard-size", default="2GB", help="largest weight file before sharding with an index (e.g. 2GB, 500MB)"
    )
    parser.add_argument("--report", type=Path, help="write the merge report JSON here")
    parser.add_argument(
        "--eval-text", type=Path, help="text for the verification batch (default: fixed pseudo-random token ids)"
    )
    parser.add_argument(
        "--allow-pickle", action="store_true", help="accept pickle (.bin) checkpoints (they can run code on load)"
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow model code shipped inside the base folder"
    )


def run(args: argparse.Namespace) -> int:
    merge_adapter(
        base=args.base,
        adapter=args.adapter,
        out=args.out,
        dtype=args.dtype,
        device=args.device,
        shard_size=args.shard_size,
        report=args.report,
        eval_text=args.eval_text,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
    )
    return 0


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


def _base_dtype_name(base_config: dict[str, Any]) -> str:
    # transformers 5 writes "dtype", older versions "torch_dtype"; missing means fp32 (the HF default).
    name = base_config.get("dtype") or base_config.get("torch_dtype") or "float32"
    name = str(name).replace("torch.", "")
    return name if name in DTYPES else "float32"


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise Lora2ggufError("--device cuda (merge.device) was asked for but torch sees no CUDA device")
    return device


def _tokenizer_source(adapter: Path, base: Path) -> Path:
    # LLaMA-Factory saves the tokenizer next to the adapter, with added tokens and its chat template.
    if (adapter / "tokenizer_config.json").is_file() or (adapter / "tokenizer.json").is_file():
        return adapter
    return base


def _copy_tokenizer(source: Path, dest: Path) -> list[str]:
    """Copy tokenizer files byte for byte: re-serialising could drop a chat template or added tokens."""
    from lora2gguf.merge_inputs import TOKENIZER_FILES

    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)
            copied.append(name)
    if not copied:
        raise Lora2ggufError(f"{source}: no tokenizer files (tokenizer.json / tokenizer_config.json) found")
    return copied


def _chat_template_from_base(base: Path, dest: Path, warnings_out: list[str]) -> list[str]:
    """The run's tokenizer has no chat template: keep the base's, so chat use still formats turns."""
    from lora2gguf.artifacts import read_json

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


def _input_hashes(
    base_w: Any, adapter_w: Any, adapter: Path, base: Path, tok_src: Path, eval_text: Path | None
) -> dict:
    from lora2gguf.artifacts import sha256_file
    from lora2gguf.merge_inputs import TOKENIZER_FILES

    def h(paths: list[Path]) -> dict[str, str]:
        return {str(p): sha256_file(p) for p in sorted(set(paths)) if p.is_file()}

    base_files = [*base_w.files, base / "config.json", base / "generation_config.json"]
    if base_w.index_file is not None:
        base_files.append(base_w.index_file)
    return {
        "adapter": h([*adapter_w.files, adapter / "adapter_config.json"]),
        "base": h(base_files),
        "tokenizer": h([tok_src / n for n in TOKENIZER_FILES]),
        "eval_text": h([eval_text]) if eval_text is not None else {},
    }


def _check_finite(model: Any, adapter_file: Path) -> None:
    import torch

    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise Lora2ggufError(
                f"{adapter_file}: the merge produced {bad} NaN/Inf values in '{name}'; the adapter weights are "
                "broken or overflow this dtype (try --dtype float32); nothing was written"
            )


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
    import json
    import struct

    shards = sorted(folder.glob("*.safetensors"))
    metadata = {}
    for shard in shards:
        with open(shard, "rb") as handle:
            (n,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(n))
        meta = header.get("__metadata__", {})
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


def merge_adapter(
    base: Path,
    adapter: Path,
    out: Path,
    dtype: str = "auto",
    device: str = "auto",
    shard_size: str | int = "2GB",
    report: Path | None = None,
    eval_text: Path | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    verify_sequences: int | None = None,
    verify_seq_len: int | None = None,
) -> dict[str, Any]:
    """Merge, verify and write; returns the report (also written to ``report`` when given)."""
    from lora2gguf import merge_inputs as mi
    from lora2gguf import merge_verify as mv
    from lora2gguf.artifacts import atomic_dir, read_json, write_json
    from lora2gguf.provenance import PeakMemory, Timer, device_info, package_versions

    base, adapter, out = Path(base), Path(adapter), Path(out)
    if dtype not in DTYPES:
        raise Lora2ggufError(f"dtype {dtype!r} (merge.dtype) is not one of {', '.join(DTYPES)}")
    if device not in DEVICES:
        raise Lora2ggufError(f"device {device!r} (merge.device) is not one of {', '.join(DEVICES)}")
    shard_bytes = parse_size(shard_size)
    if eval_text is not None and not Path(eval_text).is_file():
        raise Lora2ggufError(f"{eval_text}: evaluation text not found (--eval-text / evaluation.text)")
    if out.resolve() in (base.resolve(), adapter.resolve()):
        raise Lora2ggufError(f"{out}: the output folder must differ from the base and adapter folders")

    warnings_out: list[str] = []
    notes: list[str] = []
    timings: dict[str, float] = {}

    # 1. Everything that can be checked from headers, before spending time on loading.
    adapter_cfg = mi.read_adapter_config(adapter)
    base_w = mi.find_base_weights(base, allow_pickle)
    adapter_w = mi.find_adapter_weights(adapter, allow_pickle)
    base_config = read_json(base / "config.json")
    name_check = mi.base_name_check(adapter_cfg, base, base_config)
    if name_check["name_matches"] is False:
        warnings_out.append(
            f"adapter records base {name_check['recorded']!r}, configured base is {str(base)!r} (shapes match)"
        )
    fit = mi.check_adapter_fits_base(adapter_w, base_w, adapter_cfg, base_config)
    tok_src = _tokenizer_source(adapter, base)
    dtype_name = _base_dtype_name(base_config) if dtype == "auto" else dtype
    logger.info("inputs: base %s, adapter %s (%d LoRA tensors), tokenizer from %s", base, adapter,
                fit["lora_tensors"], tok_src)  # fmt: skip

    # Belt and braces on top of local_files_only: nothing in a merge may reach the Hugging Face hub
    # (read by huggingface_hub when transformers/peft are first imported).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype_name)
    dev = _resolve_device(device)
    # Seeded so that anything transformers initialises (new rows of a resized embedding) is the same each run.
    torch.manual_seed(0)
    load_kwargs: dict[str, Any] = {
        "dtype": torch_dtype,
        "local_files_only": True,
        "trust_remote_code": trust_remote_code,
        "use_safetensors": base_w.kind == "safetensors",
    }
    if dev.startswith("cuda"):
        load_kwargs["device_map"] = dev  # straight onto the GPU, without a full copy in host memory first

    with Timer() as total, PeakMemory(cuda=dev.startswith("cuda")) as mem:
        with Timer() as t:
            try:
                tokenizer = AutoTokenizer.from_pretrained(
                    tok_src, local_files_only=True, trust_remote_code=trust_remote_code
                )
            except Exception as exc:  # noqa: BLE001 - transformers raises many types for bad files
                raise Lora2ggufError(f"{tok_src}: cannot load the tokenizer: {exc}") from None
            try:
                model = AutoModelForCausalLM.from_pretrained(base, **load_kwargs)
            except Exception as exc:  # noqa: BLE001
                raise Lora2ggufError(f"{base}: cannot load the base model: {exc}") from None
            # A NaN/Inf in the base would otherwise surface later as "base+adapter produce NaN logits",
            # blaming the adapter; name the base tensor instead.
            for name, param in model.named_parameters():
                if param.is_floating_point() and not bool(torch.isfinite(param).all()):
                    raise Lora2ggufError(
                        f"{base_w.files[0] if len(base_w.files) == 1 else base}: base tensor '{name}' holds "
                        f"{int((~torch.isfinite(param)).sum())} NaN/Inf values; nothing was written"
                    )
            model.to(dev)
            rows = model.get_input_embeddings().weight.shape[0]
            if fit["resized_vocab_rows"] is not None and fit["resized_vocab_rows"] != rows:
                notes.append(f"resized base embeddings {rows} -> {fit['resized_vocab_rows']} rows (adapter copies)")
                logger.info("%s", notes[-1])
                model.resize_token_embeddings(fit["resized_vocab_rows"], mean_resizing=False)
            try:
                peft_model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
            except Exception as exc:  # noqa: BLE001 - peft raises many types for bad adapters
                raise Lora2ggufError(f"{adapter}: peft cannot load the adapter: {exc}") from None
            peft_model.eval()
            # save_embedding_layers=True: the widest set peft may have saved (it adds full embedding
            # layers for a resized vocabulary or on request), so no legitimately saved key counts as unused.
            adapter_state = get_peft_model_state_dict(peft_model, save_embedding_layers=True)
            loaded = {k.replace(".default", "") for k in adapter_state}
            for key, tensor in adapter_state.items():
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise Lora2ggufError(
                        f"{adapter_w.files[0]}: adapter tensor '{key}' holds "
                        f"{int((~torch.isfinite(tensor)).sum())} NaN/Inf values; nothing was written"
                    )
            del adapter_state
            _separate_tied_embeddings_if_adapted(peft_model, notes)
            not_loaded = sorted(set(adapter_w.tensors) - loaded)
            if not_loaded:
                raise Lora2ggufError(
                    f"{adapter_w.files[0]}: peft did not use {len(not_loaded)} adapter tensors, e.g. "
                    f"'{not_loaded[0]}' (target modules missing from the base?)"
                )
        timings["load_s"] = t.seconds

        rows = peft_model.get_input_embeddings().weight.shape[0]
        batch, batch_info = mv.build_token_batch(
            tokenizer,
            eval_text,
            rows,
            verify_sequences or mv.DEFAULT_SEQUENCES,
            verify_seq_len or mv.DEFAULT_SEQ_LEN,
        )
        with Timer() as t:
            reference = mv.logits_on(peft_model, batch, dev)
        timings["reference_forward_s"] = t.seconds
        if not bool(torch.isfinite(reference).all()):
            raise Lora2ggufError(
                f"{adapter_w.files[0]}: base+adapter already produce NaN/Inf logits before merging "
                f"(dtype {dtype_name}); nothing was written"
            )

        with Timer() as t:
            try:
                merged = peft_model.merge_and_unload(progressbar=True, safe_merge=True)
            except ValueError as exc:
                raise Lora2ggufError(f"{adapter_w.files[0]}: merge failed: {exc}; nothing was written") from None
            _check_finite(merged, adapter_w.files[0])
            tying = _embedding_tying(merged, warnings_out)
        timings["merge_s"] = t.seconds
        del peft_model

        with atomic_dir(out) as tmp:
            with Timer() as t:
                merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=shard_bytes)
                _generation_config(merged, base, tokenizer, tmp, notes)
                copied = _copy_tokenizer(tok_src, tmp)
                if tok_src != base and getattr(tokenizer, "chat_template", None) is None:
                    copied += _chat_template_from_base(base, tmp, warnings_out)
                weights = _check_output_safetensors(tmp)
                _normal_permissions(tmp)
            timings["save_s"] = t.seconds
            # `model` is the same module as `merged`; drop every reference so the reload below does not
            # hold two copies of the weights at once.
            del merged, model
            _release_memory()
            with Timer() as t:
                # Verify the artifact itself, not the in-memory model: a save that drops or unties a
                # tensor would otherwise pass unnoticed.
                try:
                    reloaded = AutoModelForCausalLM.from_pretrained(tmp, **{**load_kwargs, "use_safetensors": True})
                    out_tokenizer = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
                except Exception as exc:  # noqa: BLE001
                    raise Lora2ggufError(f"{out}: the written model does not load back: {exc}") from None
                reloaded.to(dev).eval()
                merged_logits = mv.logits_on(reloaded, batch, dev)
                metrics = mv.compare_logits(reference, merged_logits)
            timings["verify_s"] = t.seconds
            problems = mv.check_tolerance(metrics, dtype_name)
            if problems:
                raise Lora2ggufError(
                    f"{out}: merged model disagrees with base+adapter ({'; '.join(problems)}; dtype {dtype_name}); "
                    "nothing was written"
                )
            out_rows = reloaded.get_input_embeddings().weight.shape[0]
            if len(out_tokenizer) > out_rows:
                raise Lora2ggufError(
                    f"{tok_src}: the tokenizer has {len(out_tokenizer)} tokens but the merged model only {out_rows} "
                    "embedding rows (tokens were added without training resized embeddings: modules_to_save "
                    "embed_tokens/lm_head); nothing was written"
                )
            if tying["output_tied"] and any(k.startswith("lm_head") for k in _saved_tensor_names(tmp)):
                raise Lora2ggufError(f"{out}: tied embeddings but an lm_head tensor was written")
            chat_template = getattr(out_tokenizer, "chat_template", None)
            from lora2gguf.artifacts import sha256_tree

            output_hashes = sha256_tree(tmp)
            del reloaded
    logger.info(
        "merged %s: max|Δlogit| %.3g, mean KL %.3g, top-1 %.4f (%s, %s) in %.1f s",
        out, metrics["max_abs_logit_delta"], metrics["mean_kl"], metrics["top1_agreement"], dtype_name, dev,
        total.seconds,
    )  # fmt: skip

    target_modules = adapter_cfg.get("target_modules")
    result: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "model": out.name.removesuffix("-merged"),
        "output": {
            "dir": str(out),
            "dtype": dtype_name,
            "weights": weights,
            "vocab_rows": out_rows,
            "tokenizer_len": len(out_tokenizer),
            "tokenizer_source": str(tok_src),
            "tokenizer_files": copied,
            "chat_template": chat_template is not None,
            "tie_word_embeddings": tying,
            "sha256": output_hashes,
        },
        "inputs": {
            "base": str(base),
            "adapter": str(adapter),
            "eval_text": None if eval_text is None else str(eval_text),
        },
        "adapter": {
            "peft_type": adapter_cfg.get("peft_type"),
            "r": adapter_cfg.get("r"),
            "lora_alpha": adapter_cfg.get("lora_alpha"),
            "use_rslora": bool(adapter_cfg.get("use_rslora", False)),
            "use_dora": bool(adapter_cfg.get("use_dora", False)),
            # peft writes target_modules from a set, in arbitrary order: sorted for stable reports.
            "target_modules": sorted(target_modules) if isinstance(target_modules, list) else target_modules,
            "modules_to_save": adapter_cfg.get("modules_to_save"),
            "full_weight_tensors": fit["full_weight_tensors"],
            "lora_tensors": fit["lora_tensors"],
            "weights_format": adapter_w.kind,
        },
        "base_check": {**name_check, "shapes_match": True, "weights_format": base_w.kind},
        "settings": {
            "dtype_requested": dtype,
            "dtype": dtype_name,
            "device_requested": device,
            "device": dev,
            "shard_size_bytes": shard_bytes,
            "allow_pickle": allow_pickle,
            "trust_remote_code": trust_remote_code,
            "merge": "peft PeftModel.from_pretrained(...).merge_and_unload(safe_merge=True)",
        },
        "verification": {
            "compared": "peft base+adapter (unmerged) vs the merged model reloaded from the written files",
            "batch": batch_info,
            **metrics,
            "tolerance": mv.TOLERANCES[dtype_name].as_dict(metrics["max_abs_reference_logit"]),
            "passed": True,
        },
        "timing_s": {"total": round(total.seconds, 3), **{k: round(v, 3) for k, v in timings.items()}},
        "memory": mem.as_dict(),
        "input_sha256": _input_hashes(base_w, adapter_w, adapter, base, tok_src, eval_text),
        "versions": package_versions(),
        "device_info": device_info(dev),
        "warnings": warnings_out,
        "notes": notes,
    }
    if report is not None:
        write_json(report, result)
    return result


def _normal_permissions(folder: Path) -> None:
    """Files as the umask allows (the weights writer leaves 0600, unreadable for a shared cluster group)."""
    mask = os.umask(0)
    os.umask(mask)
    for item in folder.iterdir():
        if item.is_file():
            item.chmod(0o666 & ~mask)


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _saved_tensor_names(folder: Path) -> list[str]:
    from lora2gguf.merge_inputs import read_safetensors_header

    names: list[str] = []
    for shard in sorted(folder.glob("*.safetensors")):
        names.extend(read_safetensors_header(shard))
    return names
