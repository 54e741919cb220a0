"""GGUF reading and quantized-weight conversion into MLX's affine quantized layout."""
