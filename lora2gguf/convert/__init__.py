"""`lora2gguf convert`: a merged Hugging Face model folder to GGUF (our own converter on gguf-py, no torch).

Modules: ``hparams`` (hyperparameter keys and q/k layout; the architecture tables, one module per
model family, are in :mod:`lora2gguf.archs`), ``vocab`` (tokenizer metadata: byte-level BPE),
``vocab_spm`` (SentencePiece),
``tensors`` (per-tensor output types and data conversion) and ``convert`` (the streaming writer);
``external`` runs llama.cpp's own convert_hf_to_gguf.py instead, for the architectures without a table
(``--backend``), through the guarded child script ``_llama_cpp_child``.
The safetensors reader lives in :mod:`lora2gguf.formats.safetensors`.
"""
