"""Convert a merged Hugging Face model folder to GGUF (our own converter on gguf-py, no torch).

Modules: ``archs`` (one table per supported architecture), ``safetensors_io`` (memory-mapped
tensor reader), ``vocab`` (tokenizer metadata), ``tensors`` (per-tensor output types and data
conversion), ``convert`` (the streaming writer) and ``cli`` (the ``lora2gguf convert`` command).
"""

from __future__ import annotations

__all__ = ["convert"]


def convert(*args, **kwargs):  # type: ignore[no-untyped-def]
    """Lazy re-export of :func:`lora2gguf.gguf_convert.convert.convert` (keeps imports light)."""
    from lora2gguf.gguf_convert.convert import convert as _convert

    return _convert(*args, **kwargs)
