"""Quantizing GGUF files the way llama.cpp does, in numpy: recipe, block quantizers, file rewrite."""
