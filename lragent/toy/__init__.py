"""Embedded default: a tiny Llama-architecture base, its tokenizer and a synthetic multi-role agent task."""
