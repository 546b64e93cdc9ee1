"""BarkGPT: train tiny GPT models from scratch and ship them, as one reproducible pipeline."""

__version__ = "0.1.0"
