"""Evaluation: inference test of the merged model and float-vs-GGUF comparison in llama.cpp."""
