"""`ridgeline bench`: a load generator for any OpenAI-compatible server (Ridgeline, vLLM, SGLang)."""
