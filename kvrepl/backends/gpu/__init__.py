"""The GPU path: model.py, on the Triton kernels of triton_ops.py, triton_attn.py and
triton_pdl.py. Imported only when a model runs on CUDA."""
