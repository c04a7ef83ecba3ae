"""The generation engine: scheduling, batching and the KV cache. Knows nothing of HTTP."""
