"""LLM servers this project starts: llama.cpp embedded on CPU (`embedded`), vLLM on GPU (`vllm`), the GGUF
files the embedded one loads (`models`); and which servers a command generates with (`endpoints`)."""
