"""Offline compression of causal LMs: data, evaluation, variant format, and pruning methods."""
