"""`lora2gguf adapter`: a run's peft LoRA adapter as a llama.cpp LoRA GGUF, for serving on the base GGUF.

Modules: ``peft_adapter`` (read and check the run's adapter; refuse what llama.cpp cannot express) and
``export`` (names and layout of the base's architecture, scale folding for rsLoRA and per-module
alphas, the GGUF writer and the report). Public API: ``export.AdapterOptions`` and ``export.export_adapter``.
"""
