"""Collect an importance matrix by running the merged model in PyTorch over calibration text.

What llama-imatrix measures, measured on the Hugging Face model: for every weight matrix of the
transformer blocks, the sum over calibration tokens of the squared input activation of each
column, and the number of tokens summed. A forward pre-hook on every ``nn.Linear`` sees exactly
the input of the matmul that llama.cpp hooks (``ggml_mul_mat(W, x)``). As in llama-imatrix's
default, only ``blk.*`` weights are collected (not ``output.weight``), and a forward pass of
fewer than 16 tokens is not counted.

The text is tokenized once (with the tokenizer's own BOS, if it adds one), cut to ``max_tokens``
and split into chunks of ``chunk_size`` tokens, each an independent forward pass (llama-imatrix's
``-c``). Unlike llama-imatrix, a final partial chunk of at least 16 tokens is used too, because
fine-tuning sets are small. Sums accumulate in float64 and are stored as float32.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tqdm import tqdm

from lora2gguf.archs import load_config, read_hparams, spec_for
from lora2gguf.errors import Lora2ggufError
from lora2gguf.formats.imatrix import Imatrix, ImatrixEntry

logger = logging.getLogger(__name__)

# llama-imatrix skips matmuls over fewer rows (tokens) than this.
MIN_TOKENS_PER_PASS = 16


@dataclass
class CollectStats:
    tokens_available: int
    tokens_used: int
    chunks: int
    seconds: float
    device: str


def gguf_names(model: Any, model_dir: Path) -> dict[str, str]:
    """Map each nn.Linear module name to its GGUF weight name, for the blk.* weights."""
    import torch

    config = load_config(model_dir)
    config_path = model_dir / "config.json"
    spec = spec_for(config, config_path)
    hparams = read_hparams(config, config_path)
    name_map = gguf.get_tensor_name_map(spec.gguf_arch, hparams.block_count)
    names: dict[str, str] = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        gguf_name = name_map.get_name(module_name + ".weight", try_suffixes=(".weight",))
        if gguf_name is not None and gguf_name.startswith("blk."):
            names[module_name] = gguf_name
    if not names:
        raise Lora2ggufError(f"{model_dir}: no linear layer maps to a blk.* GGUF weight")
    return names


def chunk_ids(ids: list[int], chunk_size: int) -> list[list[int]]:
    chunks = [ids[i : i + chunk_size] for i in range(0, len(ids), chunk_size)]
    return [c for c in chunks if len(c) >= MIN_TOKENS_PER_PASS]


def _calibration_chunks(
    tokenizer: Any, text: str, chunk_size: int, max_tokens: int | None, start_token: int, dataset: str
) -> tuple[int, list[list[int]]]:
    """The tokens of the whole text, and the chunks of the part used."""
    ids = [int(i) for i in tokenizer(text, verbose=False)["input_ids"]]
    available = len(ids)
    ids = ids[start_token:]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    chunks = chunk_ids(ids, chunk_size)
    if not chunks:
        raise Lora2ggufError(
            f"{dataset}: {len(ids)} calibration tokens, fewer than the {MIN_TOKENS_PER_PASS} one pass needs"
        )
    return available, chunks


def _squared_input_sums(
    model: Any, names: dict[str, str], chunks: list[list[int]]
) -> tuple[dict[str, Any], dict[str, int], float]:
    """Run every chunk through ``model`` with a pre-hook on each named module: per module the float64
    sums of the squared inputs, the tokens seen, and the seconds the forward passes took."""
    import torch

    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    sums = {n: torch.zeros(modules[n].in_features, dtype=torch.float64, device=device) for n in names}
    counts = dict.fromkeys(names, 0)

    def hook_for(module_name: str) -> Any:
        def hook(_module: Any, inputs: tuple[Any, ...]) -> None:
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            sums[module_name] += (x * x).sum(dim=0)
            counts[module_name] += x.shape[0]

        return hook

    handles = [modules[n].register_forward_pre_hook(hook_for(n)) for n in names]
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for chunk in tqdm(chunks, desc="imatrix", unit="chunk", disable=None):
                model(torch.tensor([chunk], device=device), use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # CUDA work is asynchronous: time it to the end
    finally:
        for h in handles:
            h.remove()
    return sums, counts, time.perf_counter() - start


def collect(
    model: Any,
    tokenizer: Any,
    model_dir: Path,
    text: str,
    *,
    chunk_size: int,
    max_tokens: int | None,
    dataset: str,
    start_token: int = 0,
) -> tuple[Imatrix, CollectStats]:
    """Run ``model`` over ``text`` (from token ``start_token`` on) and return its importance matrix
    and what was measured."""
    if chunk_size < MIN_TOKENS_PER_PASS:
        raise Lora2ggufError(f"chunk size {chunk_size}: must be at least {MIN_TOKENS_PER_PASS} tokens")
    available, chunks = _calibration_chunks(tokenizer, text, chunk_size, max_tokens, start_token, dataset)
    names = gguf_names(model, model_dir)
    sums, counts, seconds = _squared_input_sums(model, names, chunks)

    imatrix = Imatrix(datasets=[dataset], chunk_count=len(chunks), chunk_size=chunk_size)
    for module_name, gguf_name in names.items():
        values = sums[module_name].cpu().numpy().astype(np.float32)
        if not np.isfinite(values).all():
            raise Lora2ggufError(f"{model_dir}: non-finite activations reach {gguf_name} (module {module_name})")
        imatrix.entries[gguf_name] = ImatrixEntry(
            values.reshape(1, -1), np.array([counts[module_name]], dtype=np.float32)
        )
    used = sum(len(c) for c in chunks)
    device = next(model.parameters()).device
    stats = CollectStats(available, used, len(chunks), seconds, str(device))
    return imatrix, stats
