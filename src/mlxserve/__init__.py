"""mlxserve: fast local LLM inference on MLX."""

__version__ = "0.1.0"
