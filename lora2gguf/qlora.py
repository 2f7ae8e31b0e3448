"""QLoRA: which base a LoRA run was trained against, and bitsandbytes' 4-bit quantization of it in torch.

A QLoRA run (LLaMA-Factory ``quantization_bit: 4``) trains its adapter on top of a base whose linear
weights bitsandbytes quantized when the model was loaded (transformers' BitsAndBytesConfig: NF4 or
FP4, blocks of 64, the absmax values quantized again when ``bnb_4bit_use_double_quant``). The adapter
learned to correct those weights, not the float ones. This module

- reads how a run was trained (``TrainedOn``): the config's ``candidates.<name>.trained_on`` wins,
  then LLaMA-Factory's own record in the run folder (training_args.yaml, written by its web UI), then
  the model card peft wrote next to the adapter (README.md: peft up to about 0.9 listed the
  bitsandbytes config there; current peft reads the config as a dict and no longer does). A run
  started from the command line (llamafactory-cli train my.yaml) records neither: its training_args.bin
  is a pickle (never loaded here) and adapter_config.json does not say; name it in the config then;
- rebuilds the quantized base exactly as bitsandbytes' CUDA kernels do (bitsandbytes 0.50:
  csrc/kernels.cu kQuantizeBlockwise / kQuantizeBlockwiseSmall / kDequantizeBlockwise, dQuantizeNF4,
  dQuantizeFP4, dQuantize; functional.py quantize_4bit / dequantize_4bit / quantize_blockwise),
  in torch, so that neither bitsandbytes nor a GPU is needed. benchmarks/bnb_parity.py compares it
  with bitsandbytes' CUDA functions bit for bit.

An 8-bit run (LLM.int8) is not reimplemented: its trained model quantizes activations as well, so the
merge step takes bitsandbytes' own 8-bit forward pass as the reference (bitsandbytes then required).

The arithmetic, as the kernels do it: the weight is cast to the compute dtype (LLaMA-Factory loads the
model in it), flattened and cut into blocks of 64; absmax = max|w| of the block (float32); each value
times float32(1 / absmax) is mapped to a 4-bit code by the kernel's decision tree; dequantization is
float32(level * absmax) rounded to the compute dtype. With double quantization the absmax vector
minus its mean is quantized blockwise again (blocks of 256) to 8 bits with the dynamic map, by the
kernel's 7-step binary search, and dequantized as float32(code * absmax2) + mean.

One difference is known and left: bitsandbytes is built with --use_fast_math, so its 1/absmax is the
GPU's approximate reciprocal (within 1 ulp), where torch divides exactly. A value whose scaled
magnitude lies within an ulp of a decision pivot can therefore land on the neighbouring level;
benchmarks/bnb_parity.py counts such values. The same build flushes subnormal floats to zero, which
can only flip the sign bit of an FP4 zero code (the value stays 0).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lora2gguf.artifacts import read_json
from lora2gguf.errors import Lora2ggufError

if TYPE_CHECKING:  # pragma: no cover - typing only; torch is imported lazily at run time
    import torch

logger = logging.getLogger(__name__)

Reciprocal = Callable[["torch.Tensor"], "torch.Tensor"]

TRAINED_ON = ("float", "nf4", "fp4", "int8")
QUANT_KINDS = ("nf4", "fp4")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
BLOCKSIZE = 64  # transformers' BitsAndBytesConfig / bitsandbytes' Params4bit default
ABSMAX_BLOCKSIZE = 256  # functional.quantize_4bit's second-level blocks (compress_statistics)
# LLaMA-Factory's defaults when its record does not say (hparams/model_args.py).
DEFAULT_DOUBLE_QUANT = True

# Files of a run folder that can record the quantization (read in this order).
TRAINING_ARGS = "training_args.yaml"
MODEL_CARD = "README.md"
RECORD_FILES = (TRAINING_ARGS, MODEL_CARD)

# The line peft's model card puts before the bitsandbytes config of a quantized base
# (PeftModel.create_or_update_model_card).
_CARD_PREFIX = "The following `bitsandbytes` quantization config was used during training:"
_CARD_LINE = re.compile(r"^- (\w+): (.*)$")
_BNB_METHODS = ("bnb", "bitsandbytes")


@dataclass(frozen=True)
class TrainedOn:
    """The base a run's adapter was trained against: float, or a bitsandbytes quantization of it."""

    kind: str  # one of TRAINED_ON
    source: str  # where it was read: the config key, a run file and its keys, or "not recorded"
    double_quant: bool | None = None
    compute_dtype: str | None = None
    blocksize: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- how the run was trained --------------------------------------------------------------------------


def _bool(value: Any, path: Path, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise Lora2ggufError(f"{path}: key '{key}' is {value!r}, expected true or false")


def _compute_dtype(flags: dict[str, Any], path: Path, base_dtype: str | None) -> tuple[str, str]:
    """LLaMA-Factory's compute dtype: bf16 / pure_bf16 / fp16 flags, else bfloat16 for a bfloat16
    base and float16 otherwise (its infer_optim_dtype on a GPU). Returns (dtype, why)."""
    for key, dtype in (("bf16", "bfloat16"), ("pure_bf16", "bfloat16"), ("fp16", "float16")):
        if key in flags and _bool(flags[key], path, key):
            return dtype, f"{key}: true"
    dtype = "bfloat16" if base_dtype == "bfloat16" else "float16"
    return dtype, f"no bf16/fp16 flag; inferred from the base dtype {base_dtype}"


def _from_training_args(path: Path, base_dtype: str | None) -> TrainedOn | None:
    """LLaMA-Factory's training_args.yaml (its web UI writes one into every output folder)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise Lora2ggufError(f"{path}: cannot read the training arguments: {exc}") from None
    if not isinstance(data, dict):
        raise Lora2ggufError(f"{path}: expected a mapping of training arguments")
    bits = data.get("quantization_bit")
    if bits is None:
        return TrainedOn("float", f"{path.name}: no quantization_bit")
    if isinstance(bits, bool) or bits not in (4, 8, "4", "8"):
        raise Lora2ggufError(f"{path}: key 'quantization_bit' is {bits!r}; bitsandbytes trains on 4 or 8 bits")
    method = str(data.get("quantization_method", "bnb"))
    if method not in _BNB_METHODS:
        raise Lora2ggufError(
            f"{path}: key 'quantization_method' is {method!r}; only bitsandbytes (bnb) quantization is known"
        )
    if int(bits) == 8:
        dtype, why = _compute_dtype(data, path, base_dtype)
        return TrainedOn("int8", f"{path.name}: quantization_bit 8; {why}", compute_dtype=dtype)
    kind = str(data.get("quantization_type", "nf4"))
    if kind not in QUANT_KINDS:
        raise Lora2ggufError(f"{path}: key 'quantization_type' is {kind!r}, expected nf4 or fp4")
    double = _bool(data.get("double_quantization", DEFAULT_DOUBLE_QUANT), path, "double_quantization")
    dtype, why = _compute_dtype(data, path, base_dtype)
    source = f"{path.name}: quantization_bit 4, quantization_type {kind}, double_quantization {double}; {why}"
    return TrainedOn(kind, source, double, dtype, BLOCKSIZE)


def _card_config(path: Path) -> dict[str, str] | None:
    """The bitsandbytes config peft's model card lists (None when the card has none)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise Lora2ggufError(f"{path}: cannot read the model card: {exc}") from None
    if _CARD_PREFIX not in lines:
        return None
    values: dict[str, str] = {}
    for line in lines[lines.index(_CARD_PREFIX) + 1 :]:
        match = _CARD_LINE.match(line.strip())
        if match is None:
            if values:
                break
            continue
        values[match[1]] = match[2].strip()
    return values


def _from_model_card(path: Path) -> TrainedOn | None:
    card = _card_config(path)
    if card is None:
        return None
    if _bool(card.get("load_in_8bit", "False"), path, "load_in_8bit"):
        return TrainedOn("int8", f"{path.name}: load_in_8bit True")
    if not _bool(card.get("load_in_4bit", "False"), path, "load_in_4bit"):
        return TrainedOn("float", f"{path.name}: neither load_in_4bit nor load_in_8bit")
    kind = card.get("bnb_4bit_quant_type", "fp4")  # BitsAndBytesConfig's own default
    if kind not in QUANT_KINDS:
        raise Lora2ggufError(f"{path}: key 'bnb_4bit_quant_type' is {kind!r}, expected nf4 or fp4")
    double = _bool(card.get("bnb_4bit_use_double_quant", "False"), path, "bnb_4bit_use_double_quant")
    dtype = card.get("bnb_4bit_compute_dtype", "float32")
    if dtype not in COMPUTE_DTYPES:
        raise Lora2ggufError(f"{path}: key 'bnb_4bit_compute_dtype' is {dtype!r}, expected one of {COMPUTE_DTYPES}")
    source = f"{path.name}: load_in_4bit, bnb_4bit_quant_type {kind}, bnb_4bit_use_double_quant {double}, " \
             f"bnb_4bit_compute_dtype {dtype}"  # fmt: skip
    return TrainedOn(kind, source, double, dtype, BLOCKSIZE)


def _base_dtype(base_dir: Path | None) -> str | None:
    if base_dir is None or not (base_dir / "config.json").is_file():
        return None
    config = read_json(base_dir / "config.json")
    if not isinstance(config, dict):
        return None
    value = config.get("dtype", config.get("torch_dtype"))
    return value if isinstance(value, str) else None


def _recorded(run_dir: Path, base_dtype: str | None) -> TrainedOn | None:
    args, card = run_dir / TRAINING_ARGS, run_dir / MODEL_CARD
    found = _from_training_args(args, base_dtype) if args.is_file() else None
    if found is None and card.is_file():
        found = _from_model_card(card)
    return found


def read_trained_on(run_dir: Path, override: str | None, base_dir: Path | None, where: str) -> TrainedOn:
    """How the run in ``run_dir`` was trained. ``override`` (the config's trained_on, named by ``where``)
    wins over the run's records; its double quantization and compute dtype still come from the
    records when they name a 4-bit run, else from LLaMA-Factory's defaults."""
    if override is not None and override not in TRAINED_ON:
        raise Lora2ggufError(f"{where}: trained_on is {override!r}, expected one of {', '.join(TRAINED_ON)}")
    base_dtype = _base_dtype(base_dir)
    recorded = _recorded(run_dir, base_dtype)
    if override is None:
        if recorded is not None:
            return recorded
        return TrainedOn("float", f"not recorded in {run_dir} ({', '.join(RECORD_FILES)}): assumed float")
    if override == "float":
        return TrainedOn(override, where)
    default_dtype = "bfloat16" if base_dtype == "bfloat16" else "float16"
    if override == "int8":
        dtype = recorded.compute_dtype if recorded is not None and recorded.compute_dtype else default_dtype
        return TrainedOn(override, f"{where}; compute dtype {dtype}", compute_dtype=dtype)
    if recorded is not None and recorded.kind in QUANT_KINDS:
        return TrainedOn(override, f"{where} (settings from {recorded.source})", recorded.double_quant,
                         recorded.compute_dtype, BLOCKSIZE)  # fmt: skip
    source = f"{where}; double quantization and compute dtype {default_dtype} are LLaMA-Factory's defaults"
    return TrainedOn(override, source, DEFAULT_DOUBLE_QUANT, default_dtype, BLOCKSIZE)


# --- the code books ------------------------------------------------------------------------------------


@functools.cache
def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels as bitsandbytes' create_normal_map(0.9677083, use_extra_value=True) makes them:
    normal quantiles at evenly spaced float32 probabilities, 8 positive and 7 negative plus zero, in
    float32, divided by the largest."""
    import torch

    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float().sort().values
    return values / values.max()


@functools.cache
def nf4_pivots() -> torch.Tensor:
    """dQuantizeNF4's decision points: midpoints of neighbouring levels, taken in double precision and
    rounded to float32 (as the kernel's tree was generated, tests/test_functional.py test_normal_map_tree)."""
    levels = nf4_levels().double()
    return ((levels[:-1] + levels[1:]) / 2).float()


@functools.cache
def fp4_levels() -> torch.Tensor:
    """FP4 levels by code: bit 3 the sign, bits 2-1 an exponent field e, bit 0 a mantissa bit m; value
    2^(4-e) * (1 + m/2) for e > 0 and m/16 for e = 0 (bitsandbytes' layout), divided by the largest (12)."""
    import torch

    magnitudes = [(m / 16 if e == 0 else 2.0 ** (4 - e) * (1 + m / 2)) for e in range(4) for m in range(2)]
    positive = torch.tensor(magnitudes, dtype=torch.float32) / torch.tensor(12.0)
    return torch.cat([positive, -positive])  # codes 8-15: the kernel multiplies by -1.0f (0 -> -0.0)


# dQuantizeFP4's decision points on |x|, as the kernel writes them (rounded midpoints: 0.583333 is not
# float32(7/12), so they are kept as written rather than recomputed).
_FP4_PIVOTS = ("0.00260417", "0.0859375", "0.20833333", "0.29166667", "0.4166667", "0.583333", "0.8333333")


@functools.cache
def fp4_pivots() -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's |x| pivots and the 3-bit code of each interval between them, in increasing magnitude."""
    import torch

    pivots = torch.tensor([float(p) for p in _FP4_PIVOTS], dtype=torch.float32)
    order = torch.argsort(fp4_levels()[:8], stable=True).to(torch.uint8)
    return pivots, order


@functools.cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): the 256-entry
    map of the double quantization (a decimal exponent from 1e-6 to 1 and a shrinking linear fraction)."""
    import torch

    data: list[float] = []
    exponent_bits, non_sign_bits = 7, 7
    for i in range(exponent_bits):
        items = 2 ** (i + non_sign_bits - exponent_bits) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


# --- the kernels -----------------------------------------------------------------------------------------


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``flat`` in rows of ``blocksize``, the last one padded with zeros (as the kernels load it)."""
    import torch

    pad = -flat.numel() % blocksize
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, blocksize)


def _scaled(flat: torch.Tensor, blocksize: int, reciprocal: Reciprocal | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each value times float32(1 / absmax of its block), and the absmax values (float32).

    ``reciprocal`` replaces the exact 1 / absmax (benchmarks/bnb_parity.py passes the GPU's
    approximate one, which bitsandbytes' --use_fast_math build uses)."""
    blocks = _blocks(flat.float(), blocksize)
    absmax = blocks.abs().amax(dim=1)
    inverse = 1.0 / absmax if reciprocal is None else reciprocal(absmax)
    return (blocks * inverse.unsqueeze(1)).reshape(-1)[: flat.numel()], absmax


def _codes_4bit(x: torch.Tensor, kind: str) -> torch.Tensor:
    """dQuantizeNF4 / dQuantizeFP4 on every value: the kernels' decision trees are binary searches over
    sorted pivots with strict comparisons, i.e. the number of pivots below the value; NaN (0 * 1/0 of
    an all-zero block) fails every comparison and gets code 0."""
    import torch

    if kind == "nf4":
        codes = torch.bucketize(x, nf4_pivots().to(x.device)).to(torch.uint8)
    else:
        pivots, order = fp4_pivots()
        codes = order.to(x.device)[torch.bucketize(x.abs(), pivots.to(x.device))]
        codes = codes | (x < 0).to(torch.uint8) << 3
    return codes.masked_fill_(torch.isnan(x), 0)


def _dquantize_8bit(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """The kernel's dQuantize<0>: a 7-step binary search over the 256-entry map, then the nearer
    neighbour by float32 midpoints (kept as written: it never reaches index 255 from below)."""
    import torch

    pivot = torch.full_like(x, 127, dtype=torch.int64)
    upper_pivot, lower_pivot = torch.full_like(pivot, 255), torch.zeros_like(pivot)
    upper, lower = torch.ones_like(x), -torch.ones_like(x)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        above = x > val
        lower_pivot, lower = torch.where(above, pivot, lower_pivot), torch.where(above, val, lower)
        upper_pivot, upper = torch.where(above, upper_pivot, pivot), torch.where(above, upper, val)
        pivot = torch.where(above, pivot + step, pivot - step)
        val = code[pivot]
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    above = x > val
    from_above = torch.where(x > (upper + val) * 0.5, upper_pivot, pivot)
    from_below = torch.where(x < (lower + val) * 0.5, lower_pivot, pivot)
    return torch.where(above, from_above, from_below).to(torch.uint8)


@dataclass
class Quant4bit:
    """A 4-bit quantized tensor as bitsandbytes stores it (QuantState): packed codes (two per byte,
    the first in the high nibble), absmax per block, or with double quantization its 8-bit codes,
    their own absmax per 256 and the mean that was subtracted."""

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str
    blocksize: int = BLOCKSIZE
    absmax2: torch.Tensor | None = None
    offset: torch.Tensor | None = None


def quantize_blockwise_8bit(
    x: torch.Tensor, blocksize: int = ABSMAX_BLOCKSIZE, reciprocal: Reciprocal | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """functional.quantize_blockwise with the dynamic map (float32 input): codes and absmax per block."""
    scaled, absmax = _scaled(x.reshape(-1), blocksize, reciprocal)
    return _dquantize_8bit(scaled, dynamic_map().to(x.device)), absmax


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = ABSMAX_BLOCKSIZE) -> torch.Tensor:
    values = dynamic_map().to(codes.device)[codes.long()]
    return (_blocks(values, blocksize) * absmax.unsqueeze(1)).reshape(-1)[: codes.numel()]


def quantize_4bit(
    weight: torch.Tensor, kind: str, double_quant: bool, blocksize: int = BLOCKSIZE, reciprocal: Reciprocal | None = None
) -> Quant4bit:
    """functional.quantize_4bit(weight, blocksize, compress_statistics=double_quant, quant_type=kind)."""
    import torch

    if kind not in QUANT_KINDS:
        raise Lora2ggufError(f"4-bit quantization type {kind!r} is not one of {', '.join(QUANT_KINDS)}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise Lora2ggufError(f"4-bit quantization needs a 16/32-bit float tensor, got {weight.dtype}")
    scaled, absmax = _scaled(weight.reshape(-1), blocksize, reciprocal)
    codes = _codes_4bit(scaled, kind)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    packed = codes[0::2] << 4 | codes[1::2]
    quant = Quant4bit(packed, absmax, tuple(weight.shape), weight.dtype, kind, blocksize)
    if double_quant:
        quant.offset = absmax.mean()
        quant.absmax, quant.absmax2 = quantize_blockwise_8bit(absmax - quant.offset, reciprocal=reciprocal)
    return quant


def dequantize_4bit(quant: Quant4bit) -> torch.Tensor:
    """functional.dequantize_4bit: level * absmax in float32, rounded to the quantized tensor's dtype."""
    import torch

    absmax = quant.absmax
    if quant.absmax2 is not None:
        absmax = dequantize_blockwise_8bit(quant.absmax, quant.absmax2) + quant.offset
    codes = torch.stack([quant.packed >> 4, quant.packed & 0x0F], dim=1).reshape(-1).long()
    n = 1
    for size in quant.shape:
        n *= size
    levels = (nf4_levels() if quant.kind == "nf4" else fp4_levels()).to(codes.device)[codes[:n]]
    values = (_blocks(levels, quant.blocksize) * absmax.unsqueeze(1)).reshape(-1)[:n]
    return values.to(quant.dtype).reshape(quant.shape)


def quantized_layers(model: Any) -> dict[str, Any]:
    """The modules bitsandbytes quantizes when transformers loads ``model`` with a BitsAndBytesConfig,
    by name: every plain ``nn.Linear`` (and GPT-2 ``Conv1D``) except those transformers keeps in float
    (quantizers/base.py get_keys_to_not_convert: the output head, both ends of tied weights, the module of
    the last parameter). Embeddings and norms are no linear layers and stay float too."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    keep = get_keys_to_not_convert(model)
    return {
        name: module
        for name, module in model.named_modules()
        if (type(module) is nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, keep)
    }


def as_trained(weight: torch.Tensor, trained: TrainedOn) -> torch.Tensor:
    """The weight as the QLoRA run saw it: cast to the compute dtype, quantized and dequantized
    (in the compute dtype)."""
    import torch

    if trained.kind not in QUANT_KINDS or trained.compute_dtype is None:
        raise Lora2ggufError(f"no 4-bit quantization to reproduce for a run trained on {trained.kind}")
    compute = getattr(torch, trained.compute_dtype)
    quant = quantize_4bit(weight.to(compute), trained.kind, bool(trained.double_quant), trained.blocksize or BLOCKSIZE)
    return dequantize_4bit(quant)


def layer_as_trained(module: Any, trained: TrainedOn) -> torch.Tensor:
    """A quantized layer's weight as the run saw it, in the layer's own layout (a GPT-2 ``Conv1D``
    stores [in, out]; transformers transposes it to [out, in] before bitsandbytes quantizes it)."""
    from transformers.pytorch_utils import Conv1D

    weight = module.weight.data
    if isinstance(module, Conv1D):
        return as_trained(weight.T.contiguous(), trained).T
    return as_trained(weight, trained)
