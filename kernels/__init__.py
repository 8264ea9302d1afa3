"""Triton kernels of the `triton` backend, shipped as `repa_fast.kernels`: one file per op;
`backend.py` is the backend module the dispatcher loads."""
