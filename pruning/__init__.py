"""Offline compression of causal LMs: models, variant format, and pruning methods."""
