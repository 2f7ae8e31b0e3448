"""Deterministic stand-in steps for the smoke workflow (tests/slurm/smoke/Snakefile).

Each step reads its inputs and writes bytes that depend only on them, so a SLURM run and a local run must
produce identical files; bad input (wrong header) makes a step fail with exit code 2 like the real CLI.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

MAGIC = b"SMOKEGGUF"


def stream(seed: bytes, size: int) -> bytes:
    """`size` pseudo-random bytes from a sha256 chain: deterministic, not compressible into nothing."""
    out, block = bytearray(), seed
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:size])


def digest(paths: list[str]) -> bytes:
    h = hashlib.sha256()
    for p in paths:
        files = sorted(Path(p).rglob("*")) if Path(p).is_dir() else [Path(p)]
        for f in files:
            if f.is_file():
                h.update(f.name.encode() + f.read_bytes())
    return h.digest()


def main(argv: list[str]) -> int:
    step, out, *inputs = argv
    # Where did this run? Recorded in the rule's log (stderr is redirected there by the rule).
    env = {k: os.environ.get(k) for k in ("SLURM_JOB_ID", "SLURM_JOB_PARTITION", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES")}
    print(f"step={step} env={json.dumps(env, sort_keys=True)}", file=sys.stderr)
    seed = digest(inputs) if inputs else b"demo"
    if step == "merge":
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "model.safetensors").write_bytes(stream(seed, 1 << 20))
    elif step in ("convert", "quantize"):
        src = inputs[0]
        data = (Path(src) / "model.safetensors").read_bytes() if Path(src).is_dir() else Path(src).read_bytes()
        if step == "quantize" and not data.startswith(MAGIC):
            print(f"error: {src}: not a GGUF file (bad magic)", file=sys.stderr)
            return 2
        body = data[len(MAGIC):] if step == "quantize" else data
        keep = max(1, len(body) // (4 if step == "quantize" else 2))
        Path(out).write_bytes(MAGIC + hashlib.sha256(body).digest() + body[:keep])
    else:  # data, rank, test, compare, plot: small JSON/text artifacts
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"step": step, "sha256": seed.hex()}, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
