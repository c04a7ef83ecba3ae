"""trimserve: prune a causal LM for a domain and serve the variants side by side."""

__version__ = "0.1.0"
