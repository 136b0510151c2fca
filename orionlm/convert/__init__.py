"""Converters between orionlm model directories and other formats (Hugging Face, GGUF)."""
