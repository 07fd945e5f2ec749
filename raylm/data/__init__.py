"""Corpus reading, tokenisation, packing and the sequence order the trainer resumes from."""
