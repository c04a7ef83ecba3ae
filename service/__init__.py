"""The trimserve HTTP server: OpenAI-compatible generation over the full model and its variants."""
