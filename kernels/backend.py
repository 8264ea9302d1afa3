"""The `triton` backend (the interface is described in repa_fast/backends.py)."""
from .manifold import manifold_loss, urepa_loss
from .projection import cosine_alignment_loss, repa_loss

__all__ = ["repa_loss", "urepa_loss", "cosine_alignment_loss", "manifold_loss"]
