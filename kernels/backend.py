"""The `triton` backend (the interface is described in repa_fast/backends.py). float64 inputs go
to the torch backend, as on the cuda backend: the kernels take float32, float16 and bfloat16, and
every backend gives the same answer to the same input."""
import functools

import torch

from .. import reference
from .manifold import manifold_loss, urepa_loss
from .projection import cosine_alignment_loss, repa_loss
from .zscore import target_zscore


def _float64_to_torch(kernel_fn):
    torch_fn = getattr(reference, kernel_fn.__name__)

    @functools.wraps(kernel_fn)
    def dispatch(*args, **kwargs):
        if any(isinstance(arg, torch.Tensor) and arg.dtype == torch.float64 for arg in (*args, *kwargs.values())):
            return torch_fn(*args, **kwargs)
        return kernel_fn(*args, **kwargs)
    return dispatch


repa_loss = _float64_to_torch(repa_loss)
urepa_loss = _float64_to_torch(urepa_loss)
cosine_alignment_loss = _float64_to_torch(cosine_alignment_loss)
manifold_loss = _float64_to_torch(manifold_loss)

__all__ = ["repa_loss", "urepa_loss", "cosine_alignment_loss", "manifold_loss", "target_zscore"]
