"""The GPU path (model.py, triton_ops.py): imported only when a model runs on CUDA."""
