"""Corrections store, dataset builder, fine-tuning, evaluation and model registry (later issues)."""
