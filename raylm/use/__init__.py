"""Using a trained model: sampling (and later generation with a KV cache, perplexity, HF export)."""
