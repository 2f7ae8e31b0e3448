"""lora2gguf.qlora against bitsandbytes' own CUDA quantization, bit for bit.

The merge rebuilds a QLoRA run's base with lora2gguf.qlora (torch, no bitsandbytes, any device). This
script runs both on the same CUDA tensors and counts every difference: packed 4-bit codes, absmax per
block, the double quantization's 8-bit codes, second-level absmax and offset, and the dequantized
weight (compared as bit patterns). Cases: NF4 and FP4; float32, bfloat16 and float16 weights; with and
without double quantization; weights shaped like a 7B model's layers and a tiny one's, heavy-tailed
weights, an all-zero block and a length that is no multiple of the block size.

Each case runs lora2gguf.qlora three ways:
- ``same_device``: on bitsandbytes' device, exact reciprocal (what a merge on CUDA computes);
- ``cpu``: on the CPU (what a merge without a GPU computes; the double quantization's mean is then
  summed in another order);
- ``fast_rcp``: on the GPU with 1/absmax taken by the PTX instruction rcp.approx.ftz.f32 through
  Triton, the reciprocal that bitsandbytes' --use_fast_math build uses (only when Triton is there);
and also dequantizes bitsandbytes' own quantized state with lora2gguf.qlora (``dequantize_only``).

Run on a machine with an NVIDIA GPU, torch and bitsandbytes (lora2gguf from this checkout on PYTHONPATH):

    PYTHONPATH=. python3 benchmarks/bnb_parity.py [--out FILE.json] [--seed 0]

``--device cpu`` compares with bitsandbytes' CPU functions instead (which are not the CUDA algorithm:
they differ on pivot ties, all-zero blocks and the 8-bit absmax codes; see tests/test_qlora.py).

Prints one JSON object (and writes it to --out): versions, device, every case's counts and a summary.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lora2gguf import qlora  # noqa: E402

SHAPES = {"7b-attn": (4096, 4096), "7b-mlp": (11008, 4096), "tiny": (256, 320), "odd": (3, 1000)}
KINDS = ("nf4", "fp4")
DTYPES = ("float32", "bfloat16", "float16")


def _fast_reciprocal() -> tuple[Any, str | None]:
    """x -> rcp.approx.ftz.f32(x) on the GPU through Triton's inline PTX (None and why, without it)."""
    try:
        import torch
        import triton
        import triton.language as tl
    except ImportError as exc:
        return None, f"no Triton: {exc}"

    @triton.jit
    def _rcp(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=1.0)
        y = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                      is_pure=True, pack=1)  # fmt: skip
        tl.store(out_ptr + offs, y, mask=mask)

    def reciprocal(x: Any) -> Any:
        x = x.contiguous()
        out = torch.empty_like(x)
        _rcp[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
        return out

    try:
        probe = torch.tensor([3.0, 0.0], device="cuda")
        got = reciprocal(probe)
        if not (abs(float(got[0]) - 1 / 3) < 1e-6 and float(got[1]) == float("inf")):
            return None, f"rcp.approx.ftz.f32 gave {got.tolist()} for [3, 0]"
    except Exception as exc:  # noqa: BLE001 - Triton raises many types when it cannot build
        return None, f"Triton could not build rcp.approx.ftz.f32: {exc}"
    return reciprocal, None


def _weights(name: str, shape: tuple[int, int], seed: int, device: str) -> Any:
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(shape, generator=gen, device=device) * 0.02
    if name == "tiny":
        w = w * torch.exp(torch.randn(shape, generator=gen, device=device))  # heavy tails
        w[0, :64] = 0  # an all-zero block
    return w


def _bits(t: Any) -> Any:
    import torch

    view = {4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()]
    return t.contiguous().view(view)


def _diff(a: Any, b: Any) -> int:
    a, b = _bits(a.reshape(-1).cpu()), _bits(b.reshape(-1).cpu())
    return int((a != b).sum()) if a.shape == b.shape else -1


def _value_diff(a: Any, b: Any) -> int:
    """Differences as numbers (+0.0 == -0.0), beside the bit-pattern count of _diff."""
    return int((a.reshape(-1).cpu().float() != b.reshape(-1).cpu().float()).sum())


def _ours(w: Any, kind: str, dq: bool, device: str, reciprocal: Any) -> tuple[Any, Any]:
    quant = qlora.quantize_4bit(w.to(device), kind, dq, reciprocal=reciprocal)
    return quant, qlora.dequantize_4bit(quant)


def _compare(bnb_q: Any, state: Any, bnb_w: Any, quant: Any, ours_w: Any) -> dict[str, int]:
    out = {
        "packed_codes_differ": _diff(bnb_q.reshape(-1), quant.packed),
        "dequantized_differ": _diff(bnb_w, ours_w),
        "dequantized_values_differ": _value_diff(bnb_w, ours_w),
        "values": int(bnb_w.numel()),
    }
    if state.nested:
        out.update(absmax_codes_differ=_diff(state.absmax, quant.absmax), absmax2_differ=_diff(state.state2.absmax,
                   quant.absmax2), offset_differs=_diff(state.offset.reshape(1), quant.offset.reshape(1)))  # fmt: skip
    else:
        out["absmax_differ"] = _diff(state.absmax, quant.absmax)
    return out


def _dequantize_only(bnb_q: Any, state: Any, dtype: Any) -> Any:
    """bitsandbytes' quantized state dequantized by lora2gguf.qlora."""
    packed = bnb_q.reshape(-1)
    quant = qlora.Quant4bit(packed, state.absmax, tuple(state.shape), dtype, state.quant_type, state.blocksize)
    if state.nested:
        quant.absmax2, quant.offset = state.state2.absmax, state.offset
    return qlora.dequantize_4bit(quant)


def _case(w: Any, kind: str, dtype: str, dq: bool, fast_rcp: Any) -> dict[str, Any]:
    import bitsandbytes.functional as F
    import torch

    x = w.to(getattr(torch, dtype))
    bnb_q, state = F.quantize_4bit(x, blocksize=qlora.BLOCKSIZE, compress_statistics=dq, quant_type=kind)
    bnb_w = F.dequantize_4bit(bnb_q, state)
    result: dict[str, Any] = {}
    runs = [("same_device", w.device.type, None), ("cpu", "cpu", None), ("fast_rcp", "cuda", fast_rcp)]
    for label, device, rcp in runs:
        if (label == "fast_rcp" and rcp is None) or (label == "cpu" and w.device.type == "cpu"):
            continue
        quant, ours_w = _ours(x, kind, dq, device, rcp)
        result[label] = _compare(bnb_q, state, bnb_w, quant, ours_w)
    again = _dequantize_only(bnb_q, state, x.dtype)
    result["dequantize_only"] = {"dequantized_differ": _diff(bnb_w, again), "dequantized_values_differ": _value_diff(bnb_w, again)}
    return result


def _facts(device: str) -> dict[str, Any]:
    import bitsandbytes
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "bitsandbytes": bitsandbytes.__version__,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
    }


def _summary(cases: dict[str, Any]) -> dict[str, Any]:
    totals: dict[str, dict[str, int]] = {}
    for case in cases.values():
        for label, counts in case.items():
            bucket = totals.setdefault(label, {})
            for key, value in counts.items():
                bucket[key] = bucket.get(key, 0) + value
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where bitsandbytes runs")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device: this script compares with bitsandbytes' CUDA kernels"}))
        return 2
    fast_rcp, fast_rcp_error = _fast_reciprocal() if args.device == "cuda" else (None, "not on CUDA")
    cases: dict[str, Any] = {}
    for name in args.shapes.split(","):
        w = _weights(name, SHAPES[name], args.seed, args.device)
        for kind in KINDS:
            for dtype in DTYPES:
                for dq in (False, True):
                    cases[f"{name}/{kind}/{dtype}/{'dq' if dq else 'plain'}"] = _case(w, kind, dtype, dq, fast_rcp)
    report = {"facts": _facts(args.device), "fast_rcp_available": fast_rcp is not None,
              "fast_rcp_error": fast_rcp_error, "summary": _summary(cases), "cases": cases}  # fmt: skip
    text = json.dumps(report, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
