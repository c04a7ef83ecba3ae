"""Depth pruning: layer importance criteria, layer surgery, LLM-Streamline and TrimLLM."""
