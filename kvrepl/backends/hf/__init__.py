"""The transformers fallback: what kvrepl changes in transformers' forward."""
