"""Evaluation: perplexity against context length, passkey retrieval (plain functions returning plain results)."""
