"""Qwen3ForCausalLM (Qwen3 dense) -> ``qwen3``.

Qwen2's layout without the q/k/v biases, plus an RMSNorm on each head's queries and keys
(``q_norm`` / ``k_norm`` -> ``attn_q_norm`` / ``attn_k_norm``, kept F32 like every norm) and an
explicit ``head_dim`` (written as key/value length). The small sizes tie the output head to the
embeddings. Same vocabulary handling as Qwen2 (llama.cpp's Qwen3 converter derives from it).
"""

from __future__ import annotations

import gguf

from lora2gguf.archs.base import ArchSpec

QWEN3 = ArchSpec(gguf_arch=gguf.MODEL_ARCH.QWEN3, hf_architectures=("Qwen3ForCausalLM",), vocab="spm-or-bpe")
