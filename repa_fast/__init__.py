"""repa-fast: fused REPA / U-REPA losses for diffusion training (DESIGN.md §2 is the API contract)."""
from .alignment import AlignmentPlan, plan_alignment
from .backends import BackendUnavailableError, available_backends
from .integrations.capture import capture_transformer_block, capture_unet_mid_block
from .config import RepaConfig, URepaConfig
from .integrations.encoders import VisionEncoder
from .integrations.feature_cache import (FeatureCache, FeatureCacheMismatchError, FeatureCacheWarning,
                                         fill_feature_cache)
from .integrations.input_checks import InputWarning
from .functional import align_tokens, cosine_alignment_loss, manifold_loss, repa_loss, urepa_loss
from .modules import RepaLoss, RepaProjector, URepaLoss
from .integrations.regularizers import RepaRegularizer, URepaRegularizer
from .schedule import LambdaSchedule

__version__ = "0.1.0"

__all__ = [
    "repa_loss", "urepa_loss", "cosine_alignment_loss", "manifold_loss", "align_tokens", "available_backends",
    "RepaProjector", "RepaLoss", "URepaLoss", "LambdaSchedule", "RepaConfig", "URepaConfig",
    "BackendUnavailableError", "AlignmentPlan", "plan_alignment", "__version__",
    "VisionEncoder", "capture_unet_mid_block", "capture_transformer_block", "RepaRegularizer", "URepaRegularizer",
    "FeatureCache", "FeatureCacheMismatchError", "FeatureCacheWarning", "fill_feature_cache",
    "InputWarning",
]
