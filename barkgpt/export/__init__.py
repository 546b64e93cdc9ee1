"""Shipping a trained model: GGUF files llama.cpp runs, quantization, parity checks, HF folders.

`gguf_file` writes and pre-flights GGUF files, `vocab` turns a BarkGPT tokenizer into llama.cpp's
tokenizer metadata, `quantize` calls llama.cpp's own quantizer, `parity` compares llama.cpp with
PyTorch, `hf` writes a Hugging Face Llama folder. `barkgpt.stages` calls these.
"""
