"""Triton kernels of the `triton` backend, shipped as `repa_fast.kernels`."""


def unavailable_reason() -> str:
    return "the triton kernels are not written yet"
