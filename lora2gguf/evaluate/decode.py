"""Fast greedy decoding for the inference test: a static KV cache and a decode step captured once as
a CUDA graph.

Eager ``generate()`` on a GPU is bound by kernel launches: a single-token forward of a 0.5B model
launches hundreds of small kernels, and the GPU waits for Python between them. Captured once as a CUDA
graph, the decode step is replayed with one launch per token. A graph replays fixed shapes and fixed
addresses, so the cache is a set of preallocated buffers (``StaticKV``) that the model writes into and
reads from, and the step's inputs (the last token and each row's position) live in fixed tensors
that the step itself advances.

One prompt at a time or several in one batch, it is the same step: each row of the cache has its own
length (its own write position, and a mask that hides the positions past it), so a short prompt never
attends to padding. Prompts are prefilled eagerly (their shapes differ), each on its own as eager
decoding prefills it, or (``prefill="batch"``) right-padded in one forward pass. Only greedy decoding
is supported; sampling stays on the eager path.

Without CUDA (``capture=False``) the same step runs eagerly: the tests check the cache logic on CPU.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lora2gguf.errors import Lora2ggufError
from lora2gguf.settings import DECODE_CHOICES, Generation

logger = logging.getLogger(__name__)

FAST = "cuda-graph"
EAGER = "eager"
# Model types whose forward takes the cache object, explicit position ids and a ready 4D mask the way
# this module uses them: greedy tokens checked against eager decoding (tests/test_fast_decode.py: all
# three on CPU, qwen2 and llama also captured on an H200). Others stay on the eager path.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
# Attention implementations that read the mask and the cached keys as given.
SUPPORTED_ATTENTION = ("sdpa", "eager")
# Masks over the cache: a length that is a multiple of this keeps the mask rows aligned for the fused
# attention kernels.
CACHE_ALIGN = 64
# How a batch's prompts are prefilled: "rows" (each on its own, as eager decoding of one prompt) or
# "batch" (one right-padded forward pass). See GraphDecoder.
BATCH_PREFILL = "rows"


@dataclass(frozen=True)
class DecodeChoice:
    """Which decoding path runs and why (recorded in the report)."""

    requested: str
    path: str
    reason: str


def _greedy_problem(gen: Generation) -> str | None:
    if gen.do_sample:
        return "do_sample is true (the fast path decodes greedily only)"
    if gen.repetition_penalty != 1.0:
        return f"repetition_penalty is {gen.repetition_penalty} (the fast path applies no logits processors)"
    return None


def check_request(requested: str, device: str, gen: Generation) -> DecodeChoice | None:
    """Before loading: settle ``eager`` and every ``auto`` that cannot run fast; refuse an explicit
    fast request that cannot run. None: the model decides (``model_problem``)."""
    if requested not in DECODE_CHOICES:
        raise Lora2ggufError(f"--decode {requested}: expected one of {', '.join(DECODE_CHOICES)}")
    if requested == EAGER:
        return DecodeChoice(requested, EAGER, "--decode eager")
    problem = None if device.startswith("cuda") else f"device {device} (CUDA graphs need a CUDA device)"
    problem = problem or _greedy_problem(gen)
    if problem is None:
        return None
    if requested == FAST:
        raise Lora2ggufError(f"--decode {FAST}: cannot run here: {problem}")
    return DecodeChoice(requested, EAGER, f"auto: eager, {problem}")


def model_problem(model: Any) -> str | None:
    """Why this loaded model cannot use the fast path, or None."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one the fast path supports ({', '.join(SUPPORTED_MODEL_TYPES)})"
    attention = getattr(config, "_attn_implementation", None) or "eager"
    if attention not in SUPPORTED_ATTENTION:
        return f"attention implementation {attention!r} (the fast path supports {', '.join(SUPPORTED_ATTENTION)})"
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        return f"layer types {sorted(layer_types)} (sliding-window layers need masks the fast path does not build)"
    return None


def choose(requested: str, device: str, gen: Generation, model: Any) -> DecodeChoice:
    """The decoding path for this run, after the model is loaded."""
    early = check_request(requested, device, gen)
    if early is not None:
        return early
    problem = model_problem(model)
    if problem is None:
        how = f"--decode {FAST}" if requested == FAST else f"auto: {FAST} on {device}"
        return DecodeChoice(requested, FAST, f"{how}, greedy decoding with a static KV cache")
    if requested == FAST:
        raise Lora2ggufError(f"--decode {FAST}: cannot run this model: {problem}")
    return DecodeChoice(requested, EAGER, f"auto: eager, {problem}")


class StaticKV:
    """The KV cache as fixed buffers, one (rows, kv_heads, positions, head_dim) pair per layer.

    The model calls ``update`` once per layer and step with the new keys and values and attends over
    what it returns. Two modes:

    * ``select(rows, length, new)``: ``new`` entries ending at ``length`` in the selected rows; the
      model attends over exactly ``length`` positions (the prefill). The model asks the cache for
      these sizes (``get_mask_sizes``) and, with no padding, builds no mask at all, exactly as for an
      eager prefill into transformers' own cache.
    * ``select_positions(positions)``: one new entry per row, written at that row's own position
      (a device tensor, so a captured graph reads the current value); the model attends over all
      positions and the caller's mask hides those past each row's length (batched decoding).
    """

    def __init__(self, model: Any, rows: int, positions: int) -> None:
        import torch

        config = model.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        parameter = next(model.parameters())
        shape = (rows, kv_heads, positions, head_dim)
        # Zeros, not empty: masked positions are multiplied by a zero weight, and 0 * NaN would not be 0.
        self.keys = [torch.zeros(shape, dtype=parameter.dtype, device=parameter.device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.rows = slice(0, rows)
        self.length = 0
        self.new = 0
        self.positions: Any = None

    def select(self, rows: slice, length: int, new: int) -> None:
        self.rows, self.length, self.new, self.positions = rows, length, new, None

    def select_positions(self, positions: Any) -> None:
        self.rows, self.positions = slice(0, self.keys[0].shape[0]), positions

    def update(self, key: Any, value: Any, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.positions is None:
            start = self.length - key.shape[2]
            keys[self.rows, :, start : self.length].copy_(key)
            values[self.rows, :, start : self.length].copy_(value)
            return keys[self.rows, :, : self.length], values[self.rows, :, : self.length]
        index = self.positions.view(-1, 1, 1, 1).expand(key.shape)
        keys.scatter_(2, index, key)
        values.scatter_(2, index, value)
        return keys, values

    # What transformers' mask code asks a cache before the layers run (the decode step passes a ready
    # 4D mask, so these are only asked in the select() mode).
    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.length - self.new

    def get_query_offset(self, layer_idx: int | None = 0) -> int:
        return self.length - self.new

    def get_mask_sizes(self, query_length: int, layer_idx: int | None = 0) -> tuple[int, int]:
        return self.length, 0


@dataclass
class RowResult:
    """One prompt's greedy tokens (a stop token kept) and when each was ready (seconds after start)."""

    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    stopped: bool = False


class GraphDecoder:
    """Greedy decoding with a static cache of ``rows`` rows and ``positions`` positions and one decode
    step captured as a CUDA graph.

    ``setup(prompts, max_new_tokens)`` warms up and captures the step (the set-up cost, timed by the
    caller); ``decode`` then answers ``rows`` prompts at a time. ``capture=False`` runs the same step
    eagerly (CPU, tests). ``prefill``: ``rows`` runs each prompt through the model on its own, as
    eager decoding of one prompt does; ``batch`` runs the batch's prompts in one forward pass,
    right-padded (causal attention never lets a token see the padding after it).
    """

    def __init__(self, model: Any, rows: int, positions: int, capture: bool = True, prefill: str = BATCH_PREFILL) -> None:
        import torch

        self.torch = torch
        self.model = model
        self.capture = capture
        self.prefill_mode = prefill
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cache = StaticKV(model, rows, positions)
        self.rows = rows
        self.token = torch.zeros((rows, 1), dtype=torch.long, device=self.device)
        self.position = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.columns = torch.arange(positions, device=self.device).view(1, 1, 1, -1)
        self.step: Callable[[], None] | None = None
        params = inspect.signature(model.forward).parameters
        # transformers 5.2x renamed the cache argument from past_key_values to cache.
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def _forward(self, ids: Any, positions: Any, mask: Any, **kwargs: Any) -> Any:
        return self.model(
            input_ids=ids,
            position_ids=positions,
            # None: the model sizes its (skipped) causal mask from the cache; a 4D mask is used as given.
            attention_mask=mask,
            use_cache=True,
            **kwargs,
            **{self.cache_arg: self.cache},
        )

    def _next_token(self, ids: Any, positions: Any, mask: Any) -> Any:
        """One forward pass over ``ids`` through the static cache; the greedy next token per row."""
        out = self._forward(ids, positions, mask, **self.keep_last)
        # As generate() does: the last position's logits in float32, first maximum on ties.
        return out.logits[:, -1, :].float().argmax(dim=-1)

    def _batch_step(self) -> None:
        """Decode step of every row at its own position; positions past a row's length are masked."""
        self.cache.select_positions(self.position)
        hidden = self.columns > self.position.view(-1, 1, 1, 1)
        mask = self.torch.zeros(hidden.shape, dtype=self.dtype, device=self.device).masked_fill_(hidden, float("-inf"))
        self.token.copy_(self._next_token(self.token, self.position.view(-1, 1), mask).view(-1, 1))
        self.position.add_(1)

    def prefill(self, row: int, ids: list[int]) -> int:
        """Run one prompt into cache row ``row``; its first greedy token (also left in ``token``)."""
        torch = self.torch
        length = len(ids)
        self.cache.select(slice(row, row + 1), length, length)
        tensor = torch.tensor([ids], dtype=torch.long, device=self.device)
        positions = torch.arange(length, device=self.device).view(1, -1)
        first = self._next_token(tensor, positions, None)
        self.token[row, 0] = first[0]
        self.position[row] = length
        return int(first[0])

    def prefill_batch(self, prompts: list[list[int]]) -> list[int]:
        """Run all prompts into the cache in one right-padded forward pass; their first greedy tokens.

        Each row's logits come from its own last prompt position, one row at a time through the
        output layer, as the one-prompt prefill computes them. The padding's cache entries lie past
        the row's length: masked, then overwritten by the row's own tokens."""
        torch = self.torch
        width = max(len(ids) for ids in prompts)
        padded = [ids + [ids[-1]] * (width - len(ids)) for ids in prompts]
        self.cache.select(slice(0, len(prompts)), width, width)
        tensor = torch.tensor(padded, dtype=torch.long, device=self.device)
        positions = torch.arange(width, device=self.device).view(1, -1).expand(len(prompts), -1)
        kwargs = {self.cache_arg: self.cache}
        hidden = self.model.get_decoder()(input_ids=tensor, position_ids=positions, attention_mask=None, use_cache=True, **kwargs)
        head = self.model.get_output_embeddings()
        for row, ids in enumerate(prompts):
            last = hidden.last_hidden_state[row : row + 1, len(ids) - 1 : len(ids), :]
            self.token[row, 0] = head(last)[:, -1, :].float().argmax(dim=-1)[0]
            self.position[row] = len(ids)
        return self.token.view(-1).tolist()

    def _record(self, step: Callable[[], None]) -> None:
        """Capture ``step`` as a CUDA graph, after running it eagerly on a side stream so that lazy
        library set-up (cuBLAS handles, kernel choice) happens outside the capture."""
        torch = self.torch
        if not self.capture:
            self.step = step
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        self.step = graph.replay

    def setup(self, prompts: list[list[int]], max_new_tokens: int) -> int:
        """Warm up and capture the decode step; returns how many graphs were captured."""
        # One warm-up prefill per distinct prompt length (results discarded; the cases prefill again):
        # first uses of a shape cost extra, and this is where they belong. With torch 2.11 on an H200
        # a prompt length new to cuDNN's attention costs about 40 ms more than a seen one (cuDNN
        # builds a plan per sequence length), more than a whole 0.5B prefill.
        firsts = {len(ids): ids for ids in reversed(prompts)}
        for ids in firsts.values():
            self.prefill(0, ids)
        if max_new_tokens < 2:
            return 0
        self._record(self._batch_step)
        return 1 if self.capture else 0

    def decode(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int]) -> list[RowResult]:
        """Greedy replies to ``rows`` prompts decoded together, each row at its own length."""
        if len(prompts) != self.rows:
            raise ValueError(f"{len(prompts)} prompts for a cache of {self.rows} rows")
        start = time.perf_counter()
        results = [RowResult() for _ in prompts]
        if self.prefill_mode == "batch" and len(prompts) > 1:
            firsts = self.prefill_batch(prompts)
            now = time.perf_counter() - start
            for result, token in zip(results, firsts):
                self._take(result, token, now, stop_ids)
        else:
            for row, ids in enumerate(prompts):
                token = self.prefill(row, ids)
                self._take(results[row], token, time.perf_counter() - start, stop_ids)
        for _ in range(max_new_tokens - 1):
            if all(r.stopped for r in results):
                break
            assert self.step is not None, "setup() first"
            self.step()
            tokens = self.token.view(-1).tolist()  # waits for the step
            now = time.perf_counter() - start
            for row, result in enumerate(results):
                if not result.stopped:
                    self._take(result, tokens[row], now, stop_ids)
        return results

    @staticmethod
    def _take(result: RowResult, token: int, when: float, stop_ids: set[int]) -> None:
        result.tokens.append(token)
        result.times.append(when)
        result.stopped = token in stop_ids


def cache_positions(prompts: list[list[int]], max_new_tokens: int) -> int:
    """Positions the cache needs: the longest prompt plus its reply, rounded up to CACHE_ALIGN."""
    need = max(len(ids) for ids in prompts) + max_new_tokens
    return -(-need // CACHE_ALIGN) * CACHE_ALIGN
