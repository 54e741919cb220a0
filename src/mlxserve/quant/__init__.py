"""GGUF reading and quantized-weight conversion into MLX's affine quantized layout."""

# How quantized GGUF tensors become MLX tensors (quant/gguf_convert.py says what each does).
# Here, not there, so the command line can list them without importing numpy and gguf.
GGUF_MODES = ("exact", "native-q4")
