"""kvrepl: a terminal chat REPL that keeps the model's KV cache across turns, restarts and edits."""

__version__ = "0.1.0"
