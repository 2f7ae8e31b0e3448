"""Qwen2ForCausalLM (Qwen1.5, Qwen2, Qwen2.5) -> ``qwen2``: byte-level BPE, q/k/v biases, NEOX RoPE (no permutation)."""

from __future__ import annotations

import gguf

from lora2gguf.archs.base import ArchSpec

# llama.cpp's Qwen2 converter reads a tokenizer.model first when there is one (none of the released
# Qwen2 folders has), then tokenizer.json.
QWEN2 = ArchSpec(gguf_arch=gguf.MODEL_ARCH.QWEN2, hf_architectures=("Qwen2ForCausalLM",), vocab="spm-or-bpe")
