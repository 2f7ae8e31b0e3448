"""Numbers that compare two language models: perplexity, KL divergence, top-1 agreement, text similarity.

Pure numpy (no torch) so the maths is testable alone and identical for every backend. Logits arrive
as float32 arrays of shape (positions, vocabulary); everything is computed in float64 because the KL
divergence of an F16 file against its fp32 source is around 1e-6, far below float32 rounding of
log-probabilities near zero.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Positions processed at once: bounds the float64 temporaries to a few hundred MB even with
# Qwen2's 151,936-token vocabulary.
_CHUNK = 64


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@dataclass
class PositionStats:
    """Per-position figures accumulated over all scored windows of a text."""

    nll: list[float] = field(default_factory=list)  # -log p(next token), candidate model
    ref_nll: list[float] = field(default_factory=list)  # same under the reference
    kl: list[float] = field(default_factory=list)  # KL(reference || candidate) of next-token dists
    top1_same: list[bool] = field(default_factory=list)

    def add_window(self, ref_logits: np.ndarray, logits: np.ndarray, token_ids: Sequence[int]) -> None:
        """Score one window: row i predicts token i+1, so the last row has no target and is skipped."""
        ref_logits = np.asarray(ref_logits)
        logits = np.asarray(logits)
        ids = np.asarray(token_ids, dtype=np.int64)
        if ref_logits.shape != logits.shape:
            raise ValueError(f"logit shapes differ: reference {ref_logits.shape}, candidate {logits.shape}")
        if logits.shape[0] != len(ids):
            raise ValueError(f"{logits.shape[0]} logit rows for {len(ids)} tokens")
        n = len(ids) - 1
        for start in range(0, n, _CHUNK):
            stop = min(n, start + _CHUNK)
            targets = ids[start + 1 : stop + 1]
            ref_lp = log_softmax(ref_logits[start:stop])
            lp = log_softmax(logits[start:stop])
            rows = np.arange(stop - start)
            self.ref_nll.extend((-ref_lp[rows, targets]).tolist())
            self.nll.extend((-lp[rows, targets]).tolist())
            kl = (np.exp(ref_lp) * (ref_lp - lp)).sum(axis=-1)
            # KL is non-negative; tiny negative values are float64 rounding when both agree exactly.
            self.kl.extend(np.maximum(kl, 0.0).tolist())
            self.top1_same.extend((ref_lp.argmax(axis=-1) == lp.argmax(axis=-1)).tolist())

    def summary(self) -> dict[str, Any]:
        """Perplexity, KL divergence and top-1 agreement of the candidate over every scored position."""
        return {
            "perplexity": perplexity(self.nll),
            "kl_divergence": kl_summary(self.kl),
            "top1_agreement": top1_agreement(self.top1_same),
            "positions": len(self.kl),
        }


def perplexity(nll: Sequence[float]) -> float:
    """exp of the mean negative log-likelihood (nats)."""
    if len(nll) == 0:
        raise ValueError("perplexity of zero tokens")
    return float(math.exp(float(np.mean(np.asarray(nll, dtype=np.float64)))))


def kl_summary(kl: Sequence[float]) -> dict[str, float]:
    values = np.asarray(kl, dtype=np.float64)
    if values.size == 0:
        raise ValueError("KL summary of zero positions")
    return {
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "p99": float(np.percentile(values, 99)),
        "max": float(values.max()),
    }


def top1_agreement(same: Sequence[bool]) -> float:
    if len(same) == 0:
        raise ValueError("top-1 agreement of zero positions")
    return float(np.mean(np.asarray(same, dtype=np.float64)))


def token_agreement(reference: Sequence[int], candidate: Sequence[int]) -> dict[str, float | int]:
    """How far two greedy continuations agree.

    identical_fraction: positions holding the same token, over the longer of the two lengths (a
    continuation that stops early counts its missing tokens as different). prefix_tokens: length of the
    common prefix, the point where greedy decoding first diverged.
    """
    longest = max(len(reference), len(candidate))
    same = sum(1 for a, b in zip(reference, candidate) if a == b)
    prefix = 0
    for a, b in zip(reference, candidate):
        if a != b:
            break
        prefix += 1
    return {
        "identical_fraction": 1.0 if longest == 0 else same / longest,
        "identical_tokens": same,
        "prefix_tokens": prefix,
        "reference_tokens": len(reference),
        "candidate_tokens": len(candidate),
    }


def text_similarity(reference: str, candidate: str) -> float:
    """difflib's ratio on characters: 2*matches/(len a + len b), 1.0 for identical texts."""
    if not reference and not candidate:
        return 1.0
    return float(difflib.SequenceMatcher(None, reference, candidate, autojunk=False).ratio())


def window_nll(logits: np.ndarray, token_ids: Sequence[int]) -> list[float]:
    """-log p(token i+1 | tokens <= i) for every position of one window (the last row has no target)."""
    ids = np.asarray(token_ids, dtype=np.int64)
    out: list[float] = []
    n = len(ids) - 1
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        lp = log_softmax(np.asarray(logits)[start:stop])
        out.extend((-lp[np.arange(stop - start), ids[start + 1 : stop + 1]]).tolist())
    return out


def windows(ids: Sequence[int], context: int) -> list[list[int]]:
    """Non-overlapping windows of at most ``context`` tokens; a trailing window of one token (nothing
    to predict) is dropped."""
    out = [list(ids[i : i + context]) for i in range(0, len(ids), context)]
    return [w for w in out if len(w) >= 2]
