"""raylm: train Llama-style language models on Ray."""

__version__ = "0.1.0"
