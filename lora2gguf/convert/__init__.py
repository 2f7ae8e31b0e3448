"""`lora2gguf convert`: a merged Hugging Face model folder to GGUF (our own converter on gguf-py, no torch).

Modules: ``hparams`` (hyperparameter keys and q/k layout; the architecture tables are in
:mod:`lora2gguf.archs`), ``vocab`` (tokenizer metadata),
``tensors`` (per-tensor output types and data conversion) and ``convert`` (the streaming writer).
The safetensors reader lives in :mod:`lora2gguf.formats.safetensors`.
"""
