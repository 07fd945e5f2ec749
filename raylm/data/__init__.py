"""Corpus reading, tokenisation, packing, prepared shards and the sequence order the trainer resumes from (no Ray)."""
