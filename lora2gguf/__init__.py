"""lora2gguf: turn LoRA fine-tuning runs into deployable, verified GGUF models."""

__version__ = "0.1.0"
