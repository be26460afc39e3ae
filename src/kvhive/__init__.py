"""kvhive: a KV-cache server for LLM inference engines (LMCache 0.5.6 wire compatible)."""

__version__ = "0.1.0"
