"""Collect an importance matrix by running the merged model in PyTorch over calibration text.

What llama-imatrix measures, measured on the Hugging Face model: for every weight matrix of the
transformer blocks, the sum over calibration tokens of the squared input activation of each
column, and the number of tokens summed. Each collected ``nn.Linear`` gets its own forward for the
run: it sees exactly the input of the matmul that llama.cpp hooks (``ggml_mul_mat(W, x)``),
adds it to the sums and does the matmul. As in llama-imatrix's default, only ``blk.*`` weights are
collected (not ``output.weight``), and a forward pass of fewer than 16 tokens is not counted.

The text is tokenized once (with the tokenizer's own BOS, if it adds one), cut to ``max_tokens``
and split into chunks of ``chunk_size`` tokens, each an independent sequence (llama-imatrix's
``-c``). Unlike llama-imatrix, a final partial chunk of at least 16 tokens is used too, because
fine-tuning sets are small.

How it runs, and why the numbers are those of the float32 model:

- Only the decoder body runs (the base model, not the LM head): no collected weight is past the
  last block, and the output layer is the single largest matmul (a quarter of the work of a 0.5B
  model with a 152k vocabulary).
- Everything is computed in float32. The collected weights may stay in the checkpoint's dtype
  (bf16/f16 load as memory maps, no copy): each is widened into a reused float32 buffer just before
  its matmul, which is exact, so the matmul sees the float32 model's weight. A plain embedding is
  only gathered, so it stays too and its rows are widened. Every other parameter (norms, biases)
  is small and widened for the run; buffers that a half-precision load computed in half precision
  (Gemma's embedding scale) get the values a float32 load computes.
- Chunks of equal length run as one batch of up to ``BATCH_TOKENS`` tokens (as llama-imatrix runs
  ``-b 2048`` / ``-c`` sequences per pass): independent sequences, and each row of a matmul depends
  on its own token only, so the numbers are those of one chunk at a time, from wider, faster matmuls.
- Squares and sums are float64 (exact squares of the float32 inputs), stored as float32. A tensor
  that several layers read (q/k/v, gate/up) is squared once.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Iterator
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
# Tokens per forward pass when chunks are batched: wide enough for the matmuls to run at full speed
# on a CPU, small enough that the activations stay well under the weights' size.
BATCH_TOKENS = 2048


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


def batches(chunks: list[list[int]], batch_tokens: int = BATCH_TOKENS) -> list[list[list[int]]]:
    """Consecutive chunks of one length grouped into batches of at most ``batch_tokens`` tokens
    (a longer chunk alone)."""
    out: list[list[list[int]]] = []
    for chunk in chunks:
        last = out[-1] if out else None
        if last and len(last[0]) == len(chunk) and (len(last) + 1) * len(chunk) <= batch_tokens:
            last.append(chunk)
        else:
            out.append([chunk])
    return out


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


class SquaredInputs:
    """The float64 sums of the squared inputs of the named linear layers and the tokens each saw,
    filled by the forward that ``forward_for`` gives each layer (the layer's own matmul in float32)."""

    def __init__(self, modules: dict[str, Any], device: Any) -> None:
        import torch

        self._torch = torch
        self.sums = {n: torch.zeros(m.in_features, dtype=torch.float64, device=device) for n, m in modules.items()}
        self.counts = dict.fromkeys(modules, 0)
        # q/k/v (and gate/up) read the same tensor: its squares are summed once.
        self._last: tuple[Any, Any] = (None, None)
        self._buffers: dict[tuple[Any, ...], Any] = {}

    def forward_for(self, name: str, module: Any) -> Any:
        def forward(x: Any) -> Any:
            self._add(name, x)
            return self._linear(x, module.weight, module.bias)

        return forward

    def release(self) -> None:
        self._last = (None, None)
        self._buffers.clear()

    def _buffer(self, shape: Any, dtype: Any, device: Any) -> Any:
        key = (tuple(shape), dtype, device)
        if key not in self._buffers:
            self._buffers[key] = self._torch.empty(key[0], dtype=dtype, device=device)
        return self._buffers[key]

    def _add(self, name: str, x: Any) -> None:
        if x is not self._last[0]:
            rows = x.detach().reshape(-1, x.shape[-1])
            # float64 squares are exact; a reused buffer spares the page faults of a fresh one per call
            wide = self._buffer(rows.shape, self._torch.float64, rows.device).copy_(rows)
            self._last = (x, wide.mul_(wide).sum(dim=0))
        self.sums[name] += self._last[1]
        self.counts[name] += x.numel() // x.shape[-1]

    def _linear(self, x: Any, weight: Any, bias: Any) -> Any:
        torch = self._torch
        if weight.dtype != torch.float32:
            # bf16/f16 widen exactly; one buffer per shape serves every layer (they run one after another)
            weight = self._buffer(weight.shape, torch.float32, weight.device).copy_(weight)
        if bias is not None and bias.dtype != torch.float32:
            bias = bias.float()
        return torch.nn.functional.linear(x.float(), weight, bias)


def _body(model: Any, modules: dict[str, Any]) -> Any:
    """The module to run: the base model (no LM head) when every collected layer is inside it."""
    base = getattr(model, "base_model", model)
    if base is model:
        return model
    inside = {id(m) for m in base.modules()}
    return base if all(id(m) in inside for m in modules.values()) else model


def _float32_buffers(model: Any) -> dict[str, Any]:
    """The buffers a float32 load of ``model``'s config computes (parameters left on the meta device)."""
    import torch
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        skeleton = type(model)._from_config(copy.deepcopy(model.config), dtype=torch.float32)
    return dict(skeleton.named_buffers())


@contextlib.contextmanager
def _float32_compute(model: Any, body: Any, modules: dict[str, Any], collector: SquaredInputs) -> Iterator[None]:
    """Run ``body`` in float32 with ``collector``'s forward on ``modules``; everything is put back after."""
    import torch

    embedding = model.get_input_embeddings()
    # A plain embedding is a gather: widening the gathered rows equals widening the table. Not when the
    # whole model runs: a tied LM head would multiply by the narrow table.
    keep_embedding = (
        body is not model and type(embedding) is torch.nn.Embedding and embedding.weight.dtype != torch.float32
    )
    kept = {id(t) for m in modules.values() for t in (m.weight, m.bias) if t is not None}
    if keep_embedding:
        kept.add(id(embedding.weight))
    restore: list[tuple[Any, Any]] = []
    buffers: list[tuple[Any, str, Any]] = []
    handle = None
    try:
        for param in body.parameters():
            if id(param) not in kept and param.is_floating_point() and param.dtype != torch.float32:
                restore.append((param, param.data))
                param.data = param.data.float()
        buffers = _widen_buffers(model, body)
        if keep_embedding:
            handle = embedding.register_forward_hook(lambda _m, _i, out: out.float())
        for name, module in modules.items():
            module.forward = collector.forward_for(name, module)
        yield
    finally:
        for module in modules.values():
            vars(module).pop("forward", None)
        if handle is not None:
            handle.remove()
        for owner, key, original in buffers:
            owner._buffers[key] = original
        for param, data in restore:
            param.data = data
        collector.release()


def _widen_buffers(model: Any, body: Any) -> list[tuple[Any, str, Any]]:
    """Give ``body``'s half-precision floating buffers their float32-load values; returns what to restore."""
    import torch

    prefix = {id(m): n for n, m in model.named_modules()}
    narrow = [
        (owner, key, buffer, f"{prefix[id(owner)]}.{key}".lstrip("."))
        for owner in body.modules()
        for key, buffer in owner._buffers.items()
        if buffer is not None and buffer.is_floating_point() and buffer.dtype != torch.float32
    ]
    if not narrow:
        return []
    reference = _float32_buffers(model)
    restore = []
    for owner, key, buffer, full_name in narrow:
        wide = reference.get(full_name)
        usable = wide is not None and wide.shape == buffer.shape and wide.dtype == torch.float32
        owner._buffers[key] = wide.to(buffer.device) if usable else buffer.float()
        restore.append((owner, key, buffer))
    return restore


def _squared_input_sums(
    model: Any, names: dict[str, str], chunks: list[list[int]]
) -> tuple[dict[str, Any], dict[str, int], float]:
    """Run the chunks through ``model``'s body in float32, batched: per named module the float64 sums
    of the squared inputs, the tokens seen, and the seconds the forward passes took."""
    import torch

    all_modules = dict(model.named_modules())
    modules = {n: all_modules[n] for n in names}
    device = next(model.parameters()).device
    collector = SquaredInputs(modules, device)
    body = _body(model, modules)
    start = time.perf_counter()
    with _float32_compute(model, body, modules, collector), torch.inference_mode():
        with tqdm(total=len(chunks), desc="imatrix", unit="chunk", disable=None) as bar:
            for batch in batches(chunks):
                body(torch.tensor(batch, device=device), use_cache=False)
                bar.update(len(batch))
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # CUDA work is asynchronous: time it to the end
    return collector.sums, collector.counts, time.perf_counter() - start


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
    and what was measured. ``model`` may hold its weights in any floating dtype: the run is float32."""
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
