"""Verification of a merge: unmerged base+adapter vs merged model on one fixed token batch.

The merged weights W + s*B@A are mathematically the same function as the unmerged W x + s*B(A x),
so the logits of both must agree up to rounding of the working dtype. The tolerances below are per
dtype: fp32 rounding leaves differences around 1e-5 (relative), half precision rounds the merged
weight itself to 8 or 11 significant bits, so logits move by up to a few tenths there.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora2gguf.errors import Lora2ggufError
from lora2gguf.formats.safetensors import open_tensor, read_header, row_slices

if TYPE_CHECKING:  # pragma: no cover - typing only; torch is imported lazily at run time
    import torch

logger = logging.getLogger(__name__)

# How much text the fixed batch takes from the evaluation file: 64 positions through every layer and
# the whole vocabulary, end to end (about 2 s per forward pass of a 0.5B model on 2 cores). The
# per-tensor check (merge.algebra) sees every element; this batch checks the model as a whole.
DEFAULT_SEQUENCES = 2
DEFAULT_SEQ_LEN = 32
_MAX_TEXT_CHARS = 200_000
# Positions compared at once (in float64).
_COMPARE_ROWS = 16
# Elements of a weight widened to float32 at once: a 151,936-row output head goes in slices of rows.
_WIDEN_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class Tolerance:
    """Largest acceptable disagreement; each bound is checked separately."""

    max_abs_logit_delta: float
    mean_kl: float
    min_top1_agreement: float
    # Rounding error grows with the logits' magnitude, so the |Δlogit| bound is the larger of the
    # absolute one and this fraction of the largest reference logit.
    rel_logit_delta: float = 0.0

    def logit_bound(self, max_abs_reference_logit: float) -> float:
        return max(self.max_abs_logit_delta, self.rel_logit_delta * max_abs_reference_logit)

    def as_dict(self, max_abs_reference_logit: float | None = None) -> dict[str, float]:
        out = {
            "max_abs_logit_delta": self.max_abs_logit_delta,
            "rel_logit_delta": self.rel_logit_delta,
            "mean_kl": self.mean_kl,
            "min_top1_agreement": self.min_top1_agreement,
        }
        if max_abs_reference_logit is not None:
            out["effective_max_abs_logit_delta"] = self.logit_bound(max_abs_reference_logit)
        return out


# Half-precision bounds are loose on purpose: they must catch a wrong merge (deltas of whole logits,
# KL of 0.1 and more, top-1 flips on many positions) without tripping on rounding of the merged weight.
# Measured for scale (random Qwen2-0.5B shape, r=8 on all linear layers, 256 positions): fp32 max
# |Δlogit| 7e-6, KL 7e-13, top-1 1.0; bf16 max |Δlogit| 0.09-0.1, KL 1.2e-4, top-1 0.92-0.95 (a random
# model's flat distributions have many near-ties, so top-1 flips there more than in a trained model).
# SmolLM2-135M-Instruct (logits up to 39), r=8 random adapter, 256 positions of the demo eval text:
# fp32 6.4e-5 / KL 1e-11 / top-1 1.0; fp16 0.17 / 3.4e-5 / 1.0; bf16 1.0 / 2.1e-3 / 0.973.
TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(max_abs_logit_delta=1e-2, rel_logit_delta=1e-4, mean_kl=1e-6, min_top1_agreement=0.99),
    "float16": Tolerance(max_abs_logit_delta=0.5, rel_logit_delta=0.03, mean_kl=5e-3, min_top1_agreement=0.90),
    "bfloat16": Tolerance(max_abs_logit_delta=1.5, rel_logit_delta=0.1, mean_kl=2e-2, min_top1_agreement=0.85),
}


def build_token_batch(
    tokenizer: Any,
    eval_text: Path | None,
    vocab_rows: int,
    sequences: int = DEFAULT_SEQUENCES,
    seq_len: int = DEFAULT_SEQ_LEN,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """A fixed [sequences, seq_len] batch of token ids: consecutive windows of the evaluation text.

    Without an evaluation text the batch is pseudo-random ids from a fixed seed, which still
    exercises every weight but not realistic activations; the report says which one was used.
    """
    import torch

    if eval_text is not None:
        try:
            text = Path(eval_text).read_text(encoding="utf-8")[:_MAX_TEXT_CHARS]
        except (OSError, UnicodeDecodeError) as exc:
            raise Lora2ggufError(f"{eval_text}: cannot read evaluation text: {exc}") from None
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < 8:
            raise Lora2ggufError(f"{eval_text}: evaluation text has only {len(ids)} tokens; need at least 8")
        seq_len = min(seq_len, len(ids))
        sequences = max(1, min(sequences, len(ids) // seq_len))
        batch = torch.tensor(ids[: sequences * seq_len], dtype=torch.long).reshape(sequences, seq_len)
        source: dict[str, Any] = {"source": str(eval_text), "kind": "evaluation text, consecutive windows"}
    else:
        generator = torch.Generator().manual_seed(1234)
        batch = torch.randint(0, vocab_rows, (sequences, seq_len), generator=generator)
        source = {"source": None, "kind": "pseudo-random token ids (seed 1234); no evaluation text given"}
    if int(batch.max()) >= vocab_rows:
        raise Lora2ggufError(
            f"tokenizer produces id {int(batch.max())} but the model has only {vocab_rows} embedding rows"
        )
    source.update(
        sequences=int(batch.shape[0]),
        tokens_per_sequence=int(batch.shape[1]),
        token_ids_sha256=hashlib.sha256(batch.numpy().astype("<i8").tobytes()).hexdigest(),
    )
    return batch, source


def logits_on(model: Any, batch: torch.Tensor, device: str) -> torch.Tensor:
    """Logits in float32 on the CPU for the whole batch in one forward pass, every matrix product in
    float32 on the stored weights (see ``float32_compute``)."""
    import torch

    with torch.no_grad(), float32_compute(model):
        out = model(input_ids=batch.to(device), use_cache=False)
    return out.logits.float().cpu()


@contextlib.contextmanager
def float32_compute(model: Any) -> Iterator[None]:
    """Run every linear layer and embedding of ``model`` in float32 on its stored half-precision weights.

    On a CPU, bf16 matrix products run several times slower than float32 ones, and their rounding is
    noise the comparison must then tolerate. A float32 copy of the model would double its memory: each
    weight is widened only for its own product instead (a vocabulary-sized head in slices of rows).
    """
    import torch

    patched = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.dtype != torch.float32]
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    for module in patched:
        module.forward = functools.partial(_linear_float32, module)
    hooks = [m.register_forward_hook(lambda _m, _i, out: out.float()) for m in embeddings]
    try:
        yield
    finally:
        for module in patched:
            del module.forward  # back to the class's forward
        for hook in hooks:
            hook.remove()


def _linear_float32(module: Any, x: torch.Tensor) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    x = x.float()
    weight, bias = module.weight, None if module.bias is None else module.bias.float()
    rows = weight.shape[0]
    step = max(1, _WIDEN_ELEMENTS // weight.shape[1])
    if rows <= step:
        return F.linear(x, weight.float(), bias)
    parts = [F.linear(x, weight[i : i + step].float()) for i in range(0, rows, step)]
    out = torch.cat(parts, dim=-1)
    return out if bias is None else out + bias


def load_written_weights(model: Any, folder: Path) -> None:
    """Copy every tensor written into ``folder`` into ``model`` in place, so that its logits are the
    written artifact's, without a second copy of the weights in memory; raise when a written tensor
    does not fit the model or a model tensor was not written."""
    import numpy as np
    import torch

    state = model.state_dict()
    filled: set[int] = set()
    for shard in sorted(folder.glob("*.safetensors")):
        for entry in read_header(shard):
            target = state.get(entry.name)
            if target is None or tuple(target.shape) != entry.shape:
                have = None if target is None else list(target.shape)
                raise Lora2ggufError(
                    f"{shard}: tensor '{entry.name}' {list(entry.shape)} does not fit the merged model ({have}); "
                    "nothing was written"
                )
            slices = row_slices(entry, _WIDEN_ELEMENTS) if target.dim() > 1 else [None]
            for rows in slices:
                with open_tensor(entry, rows, widen=False) as data:
                    values = torch.from_numpy(np.array(data))
                if entry.dtype == "BF16":
                    values = values.view(torch.bfloat16)  # the stored bits, not a float32 detour
                (target if rows is None else target[rows[0] : rows[1]]).copy_(values)
            filled.add(target.data_ptr())
    unwritten = sorted(name for name, tensor in state.items() if tensor.data_ptr() not in filled)
    if unwritten:
        raise Lora2ggufError(f"{folder}: the merged model's tensor '{unwritten[0]}' was not written; nothing was written")


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, Any]:
    """max |Δlogit|, KL(reference || candidate) per position (mean and max) and top-1 agreement."""
    import torch

    if reference.shape != candidate.shape:
        raise Lora2ggufError(f"logit shapes differ: unmerged {list(reference.shape)} vs merged {list(candidate.shape)}")
    ref = reference.reshape(-1, reference.shape[-1])
    cand = candidate.reshape(-1, candidate.shape[-1])
    if not (bool(torch.isfinite(ref).all()) and bool(torch.isfinite(cand).all())):
        return {
            "finite": False,
            "max_abs_logit_delta": None,
            "mean_abs_logit_delta": None,
            "mean_kl": None,
            "max_kl": None,
            "top1_agreement": None,
            "positions": int(ref.shape[0]),
            "reason": "non-finite logits (NaN or Inf)",
        }
    # float64, a few positions at a time: a 151,936-token vocabulary makes each position 1.2 MB.
    parts = [_compare_rows(ref[i : i + _COMPARE_ROWS].double(), cand[i : i + _COMPARE_ROWS].double())
             for i in range(0, ref.shape[0], _COMPARE_ROWS)]  # fmt: skip
    delta_max, delta_sum, kl, agree = (torch.cat([p[k] for p in parts]) for k in range(4))
    return {
        "finite": True,
        "max_abs_logit_delta": float(delta_max.max()),
        "mean_abs_logit_delta": float(delta_sum.sum() / ref.numel()),
        "max_abs_reference_logit": float(ref.abs().max()),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "top1_agreement": float(agree.mean()),
        "positions": int(ref.shape[0]),
    }


def _compare_rows(ref: torch.Tensor, cand: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per position: max and sum of |Δlogit|, KL(ref || cand), top-1 agreement (1.0 or 0.0)."""
    import torch

    delta = (ref - cand).abs()
    log_p = torch.log_softmax(ref, dim=-1)
    log_q = torch.log_softmax(cand, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp_min(0.0)  # clamp: tiny negative rounding
    agree = (ref.argmax(dim=-1) == cand.argmax(dim=-1)).double()
    return delta.amax(dim=-1), delta.sum(dim=-1), kl, agree


def check_tolerance(metrics: dict[str, Any], dtype: str) -> list[str]:
    """Return the list of violated bounds (empty when the merge passes)."""
    tol = TOLERANCES[dtype]
    if not metrics["finite"]:
        return ["logits are not finite (NaN/Inf)"]
    problems = []
    bound = tol.logit_bound(metrics["max_abs_reference_logit"])
    if metrics["max_abs_logit_delta"] > bound:
        problems.append(f"max |Δlogit| {metrics['max_abs_logit_delta']:.4g} > {bound:g}")
    if metrics["mean_kl"] > tol.mean_kl:
        problems.append(f"mean KL {metrics['mean_kl']:.4g} > {tol.mean_kl:g}")
    if metrics["top1_agreement"] < tol.min_top1_agreement:
        problems.append(f"top-1 agreement {metrics['top1_agreement']:.4f} < {tol.min_top1_agreement:g}")
    return problems
