"""The engine floor: the prompt cache, prefill, decode, sampling, model loading."""
