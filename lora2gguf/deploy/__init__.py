"""Deploy: serve a GGUF, write its Ollama Modelfile and prove the served chat prompt equals training."""
