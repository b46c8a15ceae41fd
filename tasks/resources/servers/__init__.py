"""LLM servers this project starts: llama.cpp embedded on CPU (`embedded`), vLLM on GPU (`vllm`), and the
GGUF files the embedded one loads (`models`)."""
