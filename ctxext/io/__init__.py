"""Checkpoint files: named sources, validation before loading, safe loads and atomic saves, output locks, GGUF."""
