"""Real (short, CPU) LoRA fine-tuning with peft + the HF Trainer, written in LLaMA-Factory's output layout.

LLaMA-Factory's `sft` stage runs the HF Trainer and then writes, into its output_dir:
adapter_config.json, adapter_model.safetensors, the tokenizer files (with the chat template),
train_results.json, eval_results.json, all_results.json and trainer_state.json (whose log_history
holds the loss of each logging step and the eval loss). We drive the same Trainer so those files are
written by the same code, with the same keys. Like LLaMA-Factory's default (train_on_prompt false),
only assistant turns contribute to the loss.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from lora2gguf import qlora
from lora2gguf.artifacts import atomic_dir, sha256_file
from lora2gguf.demo.dataset import DATA_FILES, data_dir, load_dataset_split, read_jsonl, to_messages
from lora2gguf.errors import Lora2ggufError

logger = logging.getLogger(__name__)

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE_INDEX = -100


def _load_records(dataset: Path | None, split: str) -> list[dict[str, Any]]:
    if dataset is None:
        return load_dataset_split(split)
    path = Path(dataset) / f"{split}.jsonl"
    if not path.is_file():
        raise Lora2ggufError(f"{path}: dataset split file not found (expected train.jsonl and eval.jsonl in {dataset})")
    return read_jsonl(path)


def encode_dialogue(tokenizer: Any, messages: list[dict[str, str]], max_length: int) -> dict[str, list[int]] | None:
    """Token ids and labels for one dialogue; labels are IGNORE_INDEX except on assistant turns.

    The chat template is rendered for growing prefixes of the conversation; each new piece of text is
    encoded on its own (as LLaMA-Factory encodes prompt and response separately), so we know exactly
    which tokens are the assistant's. Returns None when truncation leaves nothing to learn from.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
            if not prompt.startswith(rendered) or not full.startswith(prompt):
                raise Lora2ggufError(
                    "tokenizer_config.json: key chat_template does not render conversations prefix-wise; "
                    "cannot tell prompt from response tokens"
                )
            prompt_ids = tokenizer.encode(prompt[len(rendered) :], add_special_tokens=False)
            answer_ids = tokenizer.encode(full[len(prompt) :], add_special_tokens=False)
            input_ids += prompt_ids + answer_ids
            labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
            rendered = full
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels}


def encode_records(tokenizer: Any, records: Sequence[dict[str, Any]], max_length: int, split: str) -> list[dict]:
    encoded = []
    for record in records:
        item = encode_dialogue(tokenizer, to_messages(record), max_length)
        if item is None:
            logger.warning("%s: dialogue %s has no response tokens within %d tokens; skipped", split, record.get("id"), max_length)
            continue
        encoded.append(item)
    if not encoded:
        raise Lora2ggufError(f"{split} split: no usable dialogues (max_length {max_length} too small?)")
    n_tokens = sum(len(e["input_ids"]) for e in encoded)
    n_target = sum(sum(1 for x in e["labels"] if x != IGNORE_INDEX) for e in encoded)
    logger.info("%s: %d dialogues, %d tokens (%d in the loss)", split, len(encoded), n_tokens, n_target)
    return encoded


class _PadCollator:
    """Right-pads a batch; padding is masked from attention and loss."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids, labels, mask = [], [], []
        for f in features:
            pad = width - len(f["input_ids"])
            ids.append(f["input_ids"] + [self.pad_id] * pad)
            labels.append(f["labels"] + [IGNORE_INDEX] * pad)
            mask.append([1] * len(f["input_ids"]) + [0] * pad)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
        }


@dataclass(frozen=True)
class TrainOptions:
    """Hyperparameters and inputs of one LoRA training (besides the base and output folders).

    ``dataset``: a folder with train.jsonl / eval.jsonl (ShareGPT records); None uses the packaged
    demo data. ``base_name`` is what adapter_config.json records as base_model_name_or_path
    (default: the base path as given).
    """

    dataset: Path | None = None
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Sequence[str] = ALL_LINEAR
    steps: int = 10
    lr: float = 1e-3
    batch_size: int = 2
    grad_accum: int = 1
    max_length: int = 256
    warmup_steps: int = 0
    scheduler: str = "cosine"
    logging_steps: int = 1
    seed: int = 0
    base_name: str | None = None
    # QLoRA: train on the base as bitsandbytes quantizes it (nf4 / fp4; None: the float base). The
    # frozen linear weights are replaced by their 4-bit round trip (lora2gguf.qlora), which is what
    # QLoRA's forward pass multiplies by; activations stay float32 here (CPU).
    quantization: str | None = None
    double_quantization: bool = True
    compute_dtype: str = "bfloat16"

    def hyperparameters(self) -> dict[str, Any]:
        """The values the run record lists, in its key order."""
        values = {
            "r": self.r, "alpha": self.alpha, "dropout": self.dropout, "target_modules": list(self.target_modules),
            "steps": self.steps, "lr": self.lr, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
            "max_length": self.max_length, "warmup_steps": self.warmup_steps, "scheduler": self.scheduler,
            "seed": self.seed,
        }  # fmt: skip
        if self.quantization is not None:  # only QLoRA runs list it: float runs' records stay as they were
            values.update(quantization=self.quantization, double_quantization=self.double_quantization,
                          compute_dtype=self.compute_dtype)  # fmt: skip
        return values


def _check_inputs(base_dir: Path, o: TrainOptions) -> None:
    if not (base_dir / "config.json").is_file():
        raise Lora2ggufError(f"{base_dir / 'config.json'}: base model folder has no config.json")
    if not any(base_dir.glob("*.safetensors")):
        raise Lora2ggufError(f"{base_dir}: no *.safetensors weights (pickle .bin weights are refused)")
    if o.r <= 0 or o.alpha <= 0 or o.steps <= 0 or o.batch_size <= 0 or o.max_length <= 8:
        raise Lora2ggufError(f"train_lora: r, alpha, steps, batch_size must be positive (got r={o.r}, alpha={o.alpha}, steps={o.steps}, batch_size={o.batch_size}, max_length={o.max_length})")


def _load_tokenizer(base_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
    if not tokenizer.chat_template:
        raise Lora2ggufError(f"{base_dir / 'tokenizer_config.json'}: key chat_template missing")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _lora_model(base_dir: Path, o: TrainOptions) -> Any:
    """The base model in float32 with fresh LoRA layers on ``o.target_modules``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, local_files_only=True)
    if o.base_name is not None:
        model.config._name_or_path = o.base_name
    if o.quantization is not None:
        _quantize_base(model, o)
    lora = LoraConfig(
        r=o.r,
        lora_alpha=o.alpha,
        lora_dropout=o.dropout,
        target_modules=list(o.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if o.base_name is not None:
        model.peft_config["default"].base_model_name_or_path = o.base_name
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA r=%d alpha=%d on %s: %d trainable of %d parameters", o.r, o.alpha, ",".join(o.target_modules), trainable, total)
    return model


def _trained_on(o: TrainOptions) -> qlora.TrainedOn:
    return qlora.TrainedOn(o.quantization or "float", "lora2gguf.demo.train", o.double_quantization, o.compute_dtype,
                           qlora.BLOCKSIZE)  # fmt: skip


def _quantize_base(model: Any, o: TrainOptions) -> None:
    """The frozen base as a QLoRA run sees it: each layer bitsandbytes quantizes, round-tripped."""
    import torch

    # LLaMA-Factory's QLoRA computes in bf16 or fp16 (its training_args.yaml has no flag for float32).
    if o.quantization not in qlora.QUANT_KINDS or o.compute_dtype not in ("bfloat16", "float16"):
        raise Lora2ggufError(f"train_lora: quantization {o.quantization!r} / compute dtype {o.compute_dtype!r} unknown")
    layers = qlora.quantized_layers(model)
    with torch.no_grad():
        for module in layers.values():
            module.weight.copy_(qlora.layer_as_trained(module, _trained_on(o)).to(module.weight.dtype))
    logger.info("QLoRA base: %d layers as bitsandbytes %s (double quantization %s, compute %s)", len(layers),
                o.quantization, o.double_quantization, o.compute_dtype)  # fmt: skip


def _qlora_records(out_dir: Path, folder: Path, base_dir: Path, o: TrainOptions) -> None:
    """The record a LLaMA-Factory QLoRA run leaves: its web UI's training_args.yaml (LLaMA-Factory's
    own argument names; peft's model card no longer lists the bitsandbytes config)."""
    args = {
        "stage": "sft", "do_train": True, "model_name_or_path": o.base_name or str(base_dir),
        "finetuning_type": "lora", "quantization_bit": 4, "quantization_method": "bnb",
        "quantization_type": o.quantization, "double_quantization": o.double_quantization,
        "lora_rank": o.r, "lora_alpha": o.alpha, "lora_dropout": o.dropout, "lora_target": ",".join(o.target_modules),
        "learning_rate": o.lr, "max_steps": o.steps, "per_device_train_batch_size": o.batch_size,
        "gradient_accumulation_steps": o.grad_accum, "lr_scheduler_type": o.scheduler, "output_dir": str(out_dir),
        {"bfloat16": "bf16", "float16": "fp16"}[o.compute_dtype]: True,
    }  # fmt: skip
    (folder / qlora.TRAINING_ARGS).write_text(yaml.safe_dump(args, sort_keys=True), encoding="utf-8")


def _trainer(model: Any, tokenizer: Any, train_set: list, eval_set: list, folder: Path, o: TrainOptions) -> Any:
    """The HF Trainer LLaMA-Factory's sft stage drives, on CPU, without checkpoints or in-training eval."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(folder),
        max_steps=o.steps,
        per_device_train_batch_size=o.batch_size,
        per_device_eval_batch_size=o.batch_size,
        gradient_accumulation_steps=o.grad_accum,
        learning_rate=o.lr,
        lr_scheduler_type=o.scheduler,
        warmup_steps=o.warmup_steps,
        logging_steps=o.logging_steps,
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        seed=o.seed,
        data_seed=o.seed,
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=_PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )


def _train_and_save(trainer: Any, folder: Path, out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train, then write what LLaMA-Factory writes: adapter, tokenizer, metrics and trainer state."""
    result = trainer.train()
    trainer.save_model(str(folder))
    _sort_target_modules(folder / "adapter_config.json")
    train_metrics = dict(result.metrics)
    trainer.log_metrics("train", train_metrics)
    trainer.save_metrics("train", train_metrics)
    eval_metrics = trainer.evaluate()
    if not math.isfinite(eval_metrics.get("eval_loss", float("nan"))):
        raise Lora2ggufError(f"{out_dir}: evaluation produced a non-finite eval_loss ({eval_metrics.get('eval_loss')})")
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)
    trainer.save_state()
    return train_metrics, eval_metrics


def train_lora(base_dir: Path, out_dir: Path, options: TrainOptions | None = None, **fields: Any) -> Path:
    """Train a LoRA adapter on ``base_dir`` and write a LLaMA-Factory-style run folder at ``out_dir``.

    ``fields`` override single :class:`TrainOptions` fields (``train_lora(base, out, r=4, steps=2)``).
    Evaluation runs once, after training, on the whole eval split.
    """
    o = replace(options or TrainOptions(), **fields)
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    _check_inputs(base_dir, o)
    train_records = _load_records(o.dataset, "train")
    eval_records = _load_records(o.dataset, "eval")

    # Everything the run uses is imported before seeding, so that no import can draw from the
    # seeded generators (the same runs give the same weights as ever).
    import torch  # noqa: F401
    from peft import LoraConfig, get_peft_model  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed  # noqa: F401

    set_seed(o.seed)
    tokenizer = _load_tokenizer(base_dir)
    train_set = encode_records(tokenizer, train_records, o.max_length, "train")
    eval_set = encode_records(tokenizer, eval_records, o.max_length, "eval")
    model = _lora_model(base_dir, o)
    with atomic_dir(out_dir) as tmp:
        trainer = _trainer(model, tokenizer, train_set, eval_set, tmp, o)
        if o.quantization is not None:
            _qlora_records(out_dir, tmp, base_dir, o)
        train_metrics, eval_metrics = _train_and_save(trainer, tmp, out_dir)
        _write_demo_record(tmp, base_dir, o.dataset, train_set, eval_set, o.hyperparameters())
    logger.info("run written to %s: eval_loss %.4f, train_loss %.4f", out_dir, eval_metrics["eval_loss"], train_metrics["train_loss"])
    return out_dir


def _sort_target_modules(path: Path) -> None:
    """peft writes target_modules from a set (order varies with PYTHONHASHSEED); sort it for reproducible files."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_demo_record(
    folder: Path, base_dir: Path, dataset: Path | None, train_set: list, eval_set: list, hyper: dict[str, Any]
) -> None:
    """Provenance of the run (not a LLaMA-Factory file; readers of the layout ignore it)."""
    data_root = Path(dataset) if dataset is not None else data_dir()
    names = {s: (f"{s}.jsonl" if dataset is not None else DATA_FILES[s]) for s in ("train", "eval")}
    record = {
        "trainer": "transformers.Trainer + peft LoRA (lora2gguf.demo.train)",
        "hyperparameters": hyper,
        "base_model": str(base_dir),
        "base_weights_sha256": {p.name: sha256_file(p) for p in sorted(base_dir.glob("*.safetensors"))},
        "data": {s: {"file": str(data_root / n), "sha256": sha256_file(data_root / n)} for s, n in names.items()},
        "examples": {"train": len(train_set), "eval": len(eval_set)},
        "tokens": {
            "train": sum(len(e["input_ids"]) for e in train_set),
            "eval": sum(len(e["input_ids"]) for e in eval_set),
        },
        "versions": {name: _version(name) for name in ("torch", "transformers", "peft", "accelerate")},
        "torch_threads": _torch_threads(),
    }
    (folder / "lora2gguf_demo_run.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()
