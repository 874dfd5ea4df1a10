"""pymllm: building blocks for LLM inference in JAX."""

__version__ = "0.1.0"
