"""Serving: an OpenAI-compatible FastAPI app over a GGUF (llama.cpp) or the PyTorch checkpoint."""
