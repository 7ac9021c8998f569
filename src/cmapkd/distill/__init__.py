"""Distillers (one per method) and the training loop."""
