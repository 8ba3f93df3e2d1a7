"""Triton kernels, one op per file. Importing this package needs triton (not a GPU)."""
