"""kvrepl: a terminal chat REPL that keeps the model's KV cache across turns, restarts and edits."""

import os

# numpy's OpenBLAS (imported with transformers) starts a thread per core that spins after any
# call; kvrepl does no BLAS in numpy, and on two cores those threads slowed its kernels.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
