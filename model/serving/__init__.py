"""``lmforge serve``: an OpenAI-compatible completions server with continuous batching (onnxruntime, no torch)."""
