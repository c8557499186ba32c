"""The CPU fast path: GGUF weights as they are, repacked, on the C kernels."""
