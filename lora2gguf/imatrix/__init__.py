"""Importance matrices (llama.cpp's imatrix): collected in PyTorch, stored in llama.cpp's GGUF format."""
