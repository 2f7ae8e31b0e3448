"""QLoRA merge targets: the base as the run was trained on it, and how far each target is from it.

The layers bitsandbytes quantized (lora2gguf.qlora.quantized_layers) get their weights replaced by the
dequantized ones, in place: a 4-bit run's from lora2gguf.qlora, an 8-bit (LLM.int8) run's from the
8-bit model bitsandbytes built. The quantization error is measured against the adapter's update on
each layer; the target closer to the trained reference is chosen under merge.qlora_target: auto.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lora2gguf import qlora
from lora2gguf.errors import Lora2ggufError

logger = logging.getLogger(__name__)

TARGETS = ("auto", "float", "dequantized")


@dataclass
class ErrorStats:
    """Quantization error against the adapter's update, layer by layer (Frobenius norms)."""

    layers: int = 0
    weights: int = 0
    exact_in_dtype: bool = True
    error_sq: float = 0.0
    delta_sq: float = 0.0
    weight_sq: float = 0.0
    ratios: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        ratios = sorted(self.ratios)
        return {
            "quantized_layers": self.layers,
            "quantized_weights": self.weights,
            "dequantized_exact_in_merge_dtype": self.exact_in_dtype,
            "relative_quantization_error": math.sqrt(self.error_sq / self.weight_sq) if self.weight_sq else None,
            "quantization_error_norm": math.sqrt(self.error_sq),
            "lora_delta_norm": math.sqrt(self.delta_sq),
            "error_to_delta": math.sqrt(self.error_sq / self.delta_sq) if self.delta_sq else None,
            "error_to_delta_per_layer": {
                "layers_with_lora": len(ratios),
                "min": ratios[0] if ratios else None,
                "median": ratios[len(ratios) // 2] if ratios else None,
                "max": ratios[-1] if ratios else None,
            },
        }


def _lora_deltas(peft_model: Any) -> dict[int, Any]:
    """id(base layer) -> the adapter's merged update of that layer (peft's get_delta_weight)."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for name in module.active_adapters:
                if name in getattr(module, "lora_A", {}):
                    delta = module.get_delta_weight(name).float()
                    base = module.get_base_layer()
                    deltas[id(base)] = deltas[id(base)] + delta if id(base) in deltas else delta
    return deltas


TrainedWeight = Callable[[str, Any], Any]


def four_bit_weights(trained: qlora.TrainedOn) -> TrainedWeight:
    """(name, layer) -> the layer's weight as the 4-bit QLoRA run saw it (lora2gguf.qlora)."""
    return lambda name, module: qlora.layer_as_trained(module, trained)


def int8_weights(model8: Any) -> dict[str, Any]:
    """name -> the LLM.int8 weight an 8-bit model (transformers + bitsandbytes) holds, dequantized as
    bitsandbytes does (row codes x row absmax / 127), on the CPU in float32."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    weights = {}
    for name, module in model8.named_modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            param = module.weight
            codes = param.CB if getattr(param, "CB", None) is not None else param.data
            weights[name] = bnbf.int8_vectorwise_dequant(codes, param.SCB).float().cpu()
    return weights


def int8_lookup(weights: dict[str, Any]) -> TrainedWeight:
    """(name, layer) -> the dequantized int8 weight, in the layer's layout (transformers quantizes a GPT-2
    Conv1D as [out, in])."""
    from transformers.pytorch_utils import Conv1D

    def lookup(name: str, module: Any) -> Any:
        if name not in weights:
            raise Lora2ggufError(f"the 8-bit model has no quantized layer '{name}' (transformers quantized others)")
        weight = weights[name]
        return weight.T if isinstance(module, Conv1D) else weight

    return lookup


def load_trained_base(layers: dict[str, Any], trained_weight: TrainedWeight, peft_model: Any | None) -> ErrorStats:
    """Replace each layer's weight, in place, by the one the run was trained on and measure the error;
    with ``peft_model``, against the adapter's update of the layer."""
    import torch

    deltas = _lora_deltas(peft_model) if peft_model is not None else {}
    stats = ErrorStats()
    with torch.no_grad():
        for name, module in layers.items():
            weight = module.weight
            trained_w = trained_weight(name, module).to(weight.device)
            as_dtype = trained_w.to(weight.dtype)
            stats.exact_in_dtype &= bool(torch.equal(as_dtype.to(trained_w.dtype), trained_w))
            error_sq = float((weight.data.float() - as_dtype.float()).pow(2).sum())
            stats.error_sq += error_sq
            stats.weight_sq += float(weight.data.float().pow(2).sum())
            delta = deltas.get(id(module))
            if delta is not None:
                delta_sq = float(delta.pow(2).sum())
                stats.delta_sq += delta_sq
                if delta_sq > 0:
                    stats.ratios.append(math.sqrt(error_sq / delta_sq))
            weight.data.copy_(as_dtype)
            stats.layers += 1
            stats.weights += weight.numel()
    return stats


def choose(measured: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """The target whose mean KL against the trained reference is lower (dequantized on a tie: it is
    the trained base itself), and why."""
    kl = {name: metrics["mean_kl"] for name, metrics in measured.items()}
    if any(value is None for value in kl.values()):
        raise Lora2ggufError(f"non-finite logits while measuring the QLoRA merge targets (mean KL {kl}); nothing was written")
    best = min(kl, key=lambda name: (kl[name], name != "dequantized"))
    others = ", ".join(f"{name} {value:.4g}" for name, value in sorted(kl.items()) if name != best)
    return best, f"lower mean KL against the trained reference: {best} {kl[best]:.4g} vs {others}"
