"""Evaluation: retrieval, zero-shot classification, VQA probe, efficiency."""
