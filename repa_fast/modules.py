"""nn.Modules a trainer holds: the projector and the two scheduled losses."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from .alignment import Grid, check_token_alignment
from .backends import check_backend
from .functional import repa_loss, urepa_loss
from .schedule import LambdaSchedule
from .validation import as_tokens, check_eps, check_flag, check_projector, check_same_device


# Where SimpleTuner keeps its projectors in the model's state dict.
SIMPLETUNER_PROJECTOR_PREFIXES = ("crepa_projector.", "urepa_projector.")


class RepaProjector(nn.Sequential):
    """LayerNorm(hidden_dim) + Linear(hidden_dim -> encoder_dim) with fp32 parameters.

    An `nn.Sequential` so its state_dict keys (`0.weight`, `0.bias`, `1.weight`, `1.bias`) match
    the `nn.Sequential(LayerNorm, Linear)` projectors trainers already checkpoint.
    """

    def __init__(self, hidden_dim: int, encoder_dim: int, *, ln_eps: float = 1e-5,
                 device: Optional[torch.device] = None):
        for name, value in (("hidden_dim", hidden_dim), ("encoder_dim", encoder_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        super().__init__(nn.LayerNorm(hidden_dim, eps=check_eps(ln_eps), device=device, dtype=torch.float32),
                         nn.Linear(hidden_dim, encoder_dim, device=device, dtype=torch.float32))

    @property
    def norm(self) -> nn.LayerNorm:
        return self[0]

    @property
    def linear(self) -> nn.Linear:
        return self[1]

    def loss_args(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ln_weight, ln_bias, proj_weight, proj_bias) as the functional losses take them."""
        return self.norm.weight, self.norm.bias, self.linear.weight, self.linear.bias

    def load_simpletuner_state_dict(self, state_dict: Mapping[str, torch.Tensor], *,
                                    prefix: Optional[str] = None) -> None:
        """Load a SimpleTuner projector: the keys under `prefix` (default: whichever of
        `crepa_projector.` / `urepa_projector.` the dict has, so a whole model's state dict works)
        or, when no key has it, the dict itself (`0.weight`, `0.bias`, `1.weight`, `1.bias`).
        Missing, unexpected or mis-shaped keys are a ValueError."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
        prefixes = [prefix] if prefix is not None else list(SIMPLETUNER_PROJECTOR_PREFIXES)
        found = [p for p in prefixes if any(isinstance(k, str) and k.startswith(p) for k in state_dict)]
        if len(found) > 1:
            raise ValueError(f"state_dict holds both {found[0]}* and {found[1]}* keys: pass prefix= to pick one")
        if found:
            state_dict = {k[len(found[0]):]: v for k, v in state_dict.items() if k.startswith(found[0])}
        try:
            self.load_state_dict(dict(state_dict), strict=True)
        except RuntimeError as err:
            raise ValueError(f"state_dict does not fit this projector: {err}") from err

    def simpletuner_state_dict(self, prefix: str = "crepa_projector.") -> Dict[str, torch.Tensor]:
        """The projector's state dict under SimpleTuner's keys (`crepa_projector.0.weight`, ...)."""
        return {prefix + key: value for key, value in self.state_dict().items()}

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, S, D) tokens or a (B, D, H, W) feature map -> (B, S or H*W, E) projections."""
        tokens, _ = as_tokens("hidden", hidden, None)
        check_projector(hidden, *self.loss_args())
        check_same_device(hidden=hidden, projector=self.linear.weight)
        return super().forward(tokens.to(self.linear.weight.dtype))


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _as_schedule(schedule: Union[LambdaSchedule, float, None]) -> LambdaSchedule:
    if schedule is None:
        return LambdaSchedule()
    if isinstance(schedule, LambdaSchedule):
        return schedule
    if isinstance(schedule, (int, float)) and not isinstance(schedule, bool):
        return LambdaSchedule(base=float(schedule))
    raise TypeError(f"schedule must be a LambdaSchedule, a number (constant lambda) or None, "
                    f"got {type(schedule).__name__}")


class _ScheduledAlignmentLoss(nn.Module):
    """Shared by RepaLoss and URepaLoss: the projector, the schedule and the step counter.

    `forward(..., step=None)` uses the module's own step count, advanced once per training-mode
    call; pass the trainer's global step to follow it instead. The count and the schedule's
    similarity EMA live in the state_dict, so a resumed run continues where it stopped. Under
    torch.distributed with a similarity threshold, the losses logged and fed to the EMA are the
    mean over ranks (one all-reduce per training step), so every rank cuts off at the same step.
    """

    def __init__(self, hidden_dim: int, encoder_dim: int, schedule, backend: Optional[str], token_alignment: str):
        super().__init__()
        self.projector = RepaProjector(hidden_dim, encoder_dim)
        self.schedule = _as_schedule(schedule)
        self.backend = check_backend(backend)
        self.token_alignment = check_token_alignment(token_alignment)
        self.step_count = 0

    log_names: Tuple[str, ...]  # one per loss term, in the order _losses returns them

    def _losses(self, hidden, target, hidden_grid, target_grid) -> Tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _term_weights(self) -> Tuple[float, ...]:
        raise NotImplementedError

    def forward(self, hidden: torch.Tensor, target: torch.Tensor, *, hidden_grid: Optional[Grid] = None,
                target_grid: Optional[Grid] = None, step: Optional[int] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
        if step is None:
            step = self.step_count
        off = self.schedule.is_off(step)   # also checks `step`
        # Past the cutoff the loss is computed only for the logs, without a graph.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not off):
            losses = self._losses(hidden, target, hidden_grid, target_grid)
            values = torch.stack([loss.detach().float() for loss in losses])
            if self.training and self.schedule.similarity_threshold is not None and _distributed():
                # Every rank must take the same cutoff decision: the EMA follows the global mean.
                torch.distributed.all_reduce(values)
                values /= torch.distributed.get_world_size()
            values = values.tolist()  # one device sync
            similarity = -values[0]
            # A non-finite step (say an fp16 overflow the grad scaler will skip) keeps its NaN loss but
            # must not poison the similarity EMA for the rest of the run.
            feeds_ema = self.training and math.isfinite(similarity)
            weight = self.schedule.weight(step, similarity if feeds_ema else None)
            total = sum(w * loss for w, loss in zip(self._term_weights(), losses)) * weight
        if self.training:   # only a call that got this far counts as a step
            self.step_count = int(step) + 1
        logs = dict(zip(self.log_names, values))
        logs.update(similarity=similarity, weight=weight)
        return total, logs

    def get_extra_state(self):
        return {"step_count": self.step_count, "schedule": self.schedule.state_dict()}

    def set_extra_state(self, state) -> None:
        self.step_count = int(state["step_count"])
        self.schedule.load_state_dict(state["schedule"])


class RepaLoss(_ScheduledAlignmentLoss):
    """REPA for DiTs: `loss = weight(step) * L_align`; logs alignment, similarity, weight.

    `schedule`: a LambdaSchedule, a number (constant lambda) or None (constant 0.5, SimpleTuner's
    default). `token_alignment`: "grid" or "sequence" (SimpleTuner's rule), as `repa_loss`.
    """

    log_names = ("alignment",)

    def __init__(self, hidden_dim: int, encoder_dim: int, *, schedule=None, spatial_align: bool = True,
                 backend: Optional[str] = None, token_alignment: str = "grid"):
        super().__init__(hidden_dim, encoder_dim, schedule, backend, token_alignment)
        self.spatial_align = check_flag("spatial_align", spatial_align)

    def _losses(self, hidden, target, hidden_grid, target_grid):
        return (repa_loss(hidden, target, *self.projector.loss_args(), hidden_grid=hidden_grid,
                          target_grid=target_grid, spatial_align=self.spatial_align,
                          ln_eps=self.projector.norm.eps, backend=self.backend,
                          token_alignment=self.token_alignment),)

    def _term_weights(self):
        return (1.0,)


class URepaLoss(_ScheduledAlignmentLoss):
    """U-REPA for UNets: `loss = weight(step) * (L_align + manifold_weight * L_manifold)`; logs
    alignment, manifold, similarity, weight."""

    log_names = ("alignment", "manifold")

    def __init__(self, hidden_dim: int, encoder_dim: int, *, manifold_weight: float = 3.0, schedule=None,
                 backend: Optional[str] = None, token_alignment: str = "grid"):
        super().__init__(hidden_dim, encoder_dim, schedule, backend, token_alignment)
        if isinstance(manifold_weight, bool) or not isinstance(manifold_weight, (int, float)) \
                or not math.isfinite(manifold_weight) or manifold_weight < 0:
            raise ValueError(f"manifold_weight must be a number >= 0, got {manifold_weight!r}")
        self.manifold_weight = float(manifold_weight)

    def _losses(self, hidden, target, hidden_grid, target_grid):
        return urepa_loss(hidden, target, *self.projector.loss_args(), hidden_grid=hidden_grid,
                          target_grid=target_grid, ln_eps=self.projector.norm.eps, backend=self.backend,
                          token_alignment=self.token_alignment)

    def _term_weights(self):
        return (1.0, self.manifold_weight)
