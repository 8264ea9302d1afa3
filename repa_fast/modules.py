"""nn.Modules a trainer holds: the projector and the two scheduled losses."""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .alignment import Grid, check_token_alignment, square_grid
from .backends import check_backend
from .functional import repa_loss
from .projectors import check_projector_kind, check_zscore_alpha, projector_losses
from .reference import spatial_zscore
from .schedule import LambdaSchedule
from .validation import as_tokens, check_eps, check_flag, check_projector, check_same_device


# Where SimpleTuner keeps its projectors in the model's state dict.
SIMPLETUNER_PROJECTOR_PREFIXES = ("crepa_projector.", "urepa_projector.")


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class RepaProjector(nn.Sequential):
    """The projector head, fp32 parameters, of one of three kinds, each with the state_dict keys
    of the codebase it comes from:

    - "layernorm_linear" (SimpleTuner's, the default): LayerNorm(D) + Linear(D -> E); keys
      `0.weight`, `0.bias`, `1.weight`, `1.bias` as a trainer's `nn.Sequential(LayerNorm, Linear)`.
    - "mlp" (REPA's `build_mlp`): `mlp_depth` Linear layers, D -> mlp_width -> ... -> E, SiLU
      between; keys `0`, `2`, `4` (depth 3) as REPA's `projectors.{i}`.
    - "conv" (iREPA's): Conv2d(D -> E, kernel_size, padding kernel_size // 2) over the hidden
      tokens on their grid; keys `projection.weight`, `projection.bias` as SimpleTuner's
      `crepa_projector`.

    `load_source_state_dict` reads those checkpoints with their prefixes.
    """

    def __init__(self, hidden_dim: int, encoder_dim: int, kind: str = "layernorm_linear", *, mlp_width: int = 2048,
                 mlp_depth: int = 3, kernel_size: int = 3, ln_eps: float = 1e-5,
                 device: Optional[torch.device] = None):
        hidden_dim = _check_positive_int("hidden_dim", hidden_dim)
        encoder_dim = _check_positive_int("encoder_dim", encoder_dim)
        kind = check_projector_kind(kind)
        factory = dict(device=device, dtype=torch.float32)
        if kind == "layernorm_linear":
            super().__init__(nn.LayerNorm(hidden_dim, eps=check_eps(ln_eps), **factory),
                             nn.Linear(hidden_dim, encoder_dim, **factory))
        elif kind == "mlp":
            widths = [hidden_dim] + [_check_positive_int("mlp_width", mlp_width)] * \
                (_check_positive_int("mlp_depth", mlp_depth) - 1) + [encoder_dim]
            layers = []
            for fan_in, fan_out in zip(widths[:-1], widths[1:]):
                layers += [nn.Linear(fan_in, fan_out, **factory), nn.SiLU()]
            super().__init__(*layers[:-1])
        else:
            if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size <= 0 \
                    or kernel_size % 2 == 0:
                raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
            super().__init__(OrderedDict(projection=nn.Conv2d(hidden_dim, encoder_dim, kernel_size,
                                                              padding=kernel_size // 2, **factory)))
        self.kind, self.hidden_dim, self.encoder_dim = kind, hidden_dim, encoder_dim

    def _only(self, kind: str, what: str):
        if self.kind != kind:
            raise TypeError(f"{what} is for the {kind!r} projector kind; this projector is {self.kind!r}")

    @property
    def norm(self) -> nn.LayerNorm:
        self._only("layernorm_linear", "norm")
        return self[0]

    @property
    def linear(self) -> nn.Linear:
        """The last Linear (of "layernorm_linear" and "mlp")."""
        if self.kind == "conv":
            raise TypeError("linear is for the 'layernorm_linear' and 'mlp' projector kinds; this projector is 'conv'")
        return self[-1]

    @property
    def hidden_layers(self) -> List[nn.Module]:
        """The layers before the last Linear of an "mlp" head."""
        self._only("mlp", "hidden_layers")
        return list(self)[:-1]

    @property
    def conv(self) -> nn.Conv2d:
        self._only("conv", "conv")
        return self.projection

    def loss_args(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ln_weight, ln_bias, proj_weight, proj_bias) as the functional losses take them."""
        self._only("layernorm_linear", "loss_args")
        return self.norm.weight, self.norm.bias, self.linear.weight, self.linear.bias

    def forward(self, hidden: torch.Tensor, grid: Optional[Grid] = None) -> torch.Tensor:
        """(B, S, D) tokens or a (B, D, H, W) feature map -> (B, S or H*W, E) projections; the
        "conv" kind needs the tokens' grid (`grid`, a feature map, or a square token count)."""
        tokens, grid = as_tokens("hidden", hidden, grid)
        if self.kind == "layernorm_linear":
            check_projector(hidden, *self.loss_args())
        check_same_device(hidden=hidden, projector=self[0].weight)
        if tokens.shape[-1] != self.hidden_dim:
            raise ValueError(f"hidden of shape {tuple(hidden.shape)} has {tokens.shape[-1]} features but the "
                             f"projector takes {self.hidden_dim}")
        tokens = tokens.to(self[0].weight.dtype)
        if self.kind != "conv":
            return super().forward(tokens)
        grid = grid if grid is not None else square_grid(tokens.shape[1])
        if grid is None:
            raise ValueError(f"the conv projector needs the tokens' grid: hidden of shape {tuple(hidden.shape)} "
                             f"has {tokens.shape[1]} tokens, not a square; pass grid=(h, w)")
        fmap = tokens.transpose(1, 2).reshape(tokens.shape[0], self.hidden_dim, *grid)
        return self.conv(fmap).flatten(2).transpose(1, 2)

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

    def load_source_state_dict(self, state_dict: Mapping[str, torch.Tensor], *, index: int = 0) -> None:
        """Load this projector from a checkpoint of the codebase its kind comes from: its own keys,
        REPA's `projectors.{index}.*` (a SiT / REPA-E / LightningDiT model state dict) or
        SimpleTuner's `crepa_projector.*` / `urepa_projector.*` (the model's state dict), each
        also under a leading prefix such as `module.`."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
        own = set(self.state_dict())
        found = dict(state_dict) if set(state_dict) == own else {}
        for marker in (f"projectors.{index}.", *SIMPLETUNER_PROJECTOR_PREFIXES):
            if found:
                break
            found = {key.split(marker, 1)[1]: value for key, value in state_dict.items()
                     if isinstance(key, str) and (key.startswith(marker) or f".{marker}" in key)}
        if not found:
            sample = ", ".join(repr(key) for key in list(state_dict)[:4])
            raise ValueError(f"no {self.kind} projector in state_dict: expected its own keys ({', '.join(sorted(own))}), "
                             f"'projectors.{index}.*' (REPA) or 'crepa_projector.*' / 'urepa_projector.*' "
                             f"(SimpleTuner); got keys {sample}{', ...' if len(state_dict) > 4 else ''}")
        try:
            self.load_state_dict(found)
        except RuntimeError as err:
            raise ValueError(f"state_dict does not fit this {self.kind} projector "
                             f"({self.hidden_dim} -> {self.encoder_dim}): {err}") from None


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

    def __init__(self, hidden_dim: int, encoder_dim, schedule, backend: Optional[str], token_alignment: str,
                 projector, target_zscore_alpha: Optional[float]):
        super().__init__()
        projectors = _build_projectors(hidden_dim, encoder_dim, projector)
        if isinstance(encoder_dim, Sequence):
            self.projectors = nn.ModuleList(projectors)
        else:
            self.projector = projectors[0]
        self.schedule = _as_schedule(schedule)
        self.backend = check_backend(backend)
        self.token_alignment = check_token_alignment(token_alignment)
        self.target_zscore_alpha = check_zscore_alpha(target_zscore_alpha)
        self.step_count = 0

    def projector_list(self) -> List[RepaProjector]:
        """The projectors, one per encoder."""
        return list(self.projectors) if hasattr(self, "projectors") else [self.projector]

    def load_source_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load the projectors from a source codebase's checkpoint (RepaProjector.load_source_state_dict):
        encoder i's from REPA's `projectors.{i}.*`, a single one also from SimpleTuner's keys."""
        for index, projector in enumerate(self.projector_list()):
            projector.load_source_state_dict(state_dict, index=index)

    def _pairs(self, target, target_grid) -> List[Tuple[RepaProjector, torch.Tensor, Optional[Grid]]]:
        """(projector, target, target_grid) per encoder; several encoders take lists of both."""
        projectors = self.projector_list()
        if not hasattr(self, "projectors"):
            return [(projectors[0], target, target_grid)]
        count = len(projectors)
        grids = [None] * count if target_grid is None else target_grid
        for name, value in (("target", target), ("target_grid", grids)):
            if not isinstance(value, (list, tuple)) or len(value) != count:
                raise ValueError(f"this loss aligns {count} encoders: {name} must be a list of {count}, got "
                                 f"{type(value).__name__}" + (f" of {len(value)}" if isinstance(value, (list, tuple))
                                                              else ""))
        return list(zip(projectors, target, grids))

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


def _build_projectors(hidden_dim: int, encoder_dim, projector) -> List[RepaProjector]:
    """One projector per encoder width: built of kind `projector` (a name), or the RepaProjector(s)
    given, checked against the widths."""
    several = isinstance(encoder_dim, Sequence)
    dims = list(encoder_dim) if several else [encoder_dim]
    if several and not dims:
        raise ValueError("encoder_dim is an empty list: give one width per encoder")
    if isinstance(projector, str):
        return [RepaProjector(hidden_dim, dim, projector) for dim in dims]
    given = list(projector) if several and isinstance(projector, Sequence) else [projector]
    if not all(isinstance(p, RepaProjector) for p in given):
        raise TypeError(f"projector must be a kind name, a RepaProjector{' or a list of them' if several else ''}, "
                        f"got {type(projector).__name__}")
    if len(given) != len(dims):
        raise ValueError(f"{len(dims)} encoder widths but {len(given)} projectors: give one per encoder")
    for p, dim in zip(given, dims):
        if (p.hidden_dim, p.encoder_dim) != (hidden_dim, dim):
            raise ValueError(f"the {p.kind} projector maps {p.hidden_dim} -> {p.encoder_dim} features, but this loss "
                             f"has hidden_dim {hidden_dim} and encoder_dim {dim}")
    return given


class RepaLoss(_ScheduledAlignmentLoss):
    """REPA for DiTs: `loss = weight(step) * L_align`; logs alignment, similarity, weight.

    `schedule`: a LambdaSchedule, a number (constant lambda) or None (constant 0.5, SimpleTuner's
    default). `token_alignment`: "grid" or "sequence" (SimpleTuner's rule), as `repa_loss`. `projector`: a kind name ("layernorm_linear", "mlp", "conv") or a RepaProjector.
    `target_zscore_alpha`: None, or iREPA's spatial z-score of the target (0.6 in iREPA).
    Several encoders: `encoder_dim` a list of widths (and `projector` a kind name or a list of
    RepaProjectors); forward then takes a list of targets (and of target grids) and the loss is
    the mean over encoders. The projectors are then `self.projectors`, as in REPA's models.
    """

    log_names = ("alignment",)

    def __init__(self, hidden_dim: int, encoder_dim: Union[int, Sequence[int]], *, schedule=None,
                 spatial_align: bool = True, backend: Optional[str] = None, token_alignment: str = "grid",
                 projector: Union[str, RepaProjector, Sequence[RepaProjector]] = "layernorm_linear",
                 target_zscore_alpha: Optional[float] = None):
        super().__init__(hidden_dim, encoder_dim, schedule, backend, token_alignment, projector, target_zscore_alpha)
        self.spatial_align = check_flag("spatial_align", spatial_align)

    def _losses(self, hidden, target, hidden_grid, target_grid):
        pairs = self._pairs(target, target_grid)
        if len(pairs) > 1 and all(p.kind == "layernorm_linear" for p, _, _ in pairs):
            # One LayerNorm and one GEMM for every encoder (functional repa_loss with lists).
            targets, grids = [], []
            for _, t, grid in pairs:
                tokens, grid = as_tokens("target", t, grid, allow_feature_map=False)
                alpha = self.target_zscore_alpha
                targets.append(tokens if alpha is None else spatial_zscore(tokens.detach(), alpha))
                grids.append(grid)
            params = list(zip(*(p.loss_args() for p, _, _ in pairs)))
            eps = {p.norm.eps for p, _, _ in pairs}
            if len(eps) > 1:
                raise ValueError(f"the encoders' LayerNorms have different eps {sorted(eps)}: one LayerNorm serves all")
            return (repa_loss(hidden, targets, *params, hidden_grid=hidden_grid, target_grid=grids,
                              spatial_align=self.spatial_align, ln_eps=eps.pop(), backend=self.backend,
                              token_alignment=self.token_alignment),)
        losses = [projector_losses(p, hidden, t, hidden_grid=hidden_grid, target_grid=grid,
                                   spatial_align=self.spatial_align, target_zscore_alpha=self.target_zscore_alpha,
                                   backend=self.backend, token_alignment=self.token_alignment)[0]
                  for p, t, grid in pairs]
        return (losses[0] if len(losses) == 1 else torch.stack(losses).mean(),)

    def _term_weights(self):
        return (1.0,)


class URepaLoss(_ScheduledAlignmentLoss):
    """U-REPA for UNets: `loss = weight(step) * (L_align + manifold_weight * L_manifold)`; logs
    alignment, manifold, similarity, weight. `projector`, `target_zscore_alpha`: as RepaLoss's
    (one encoder)."""

    log_names = ("alignment", "manifold")

    def __init__(self, hidden_dim: int, encoder_dim: int, *, manifold_weight: float = 3.0, schedule=None,
                 backend: Optional[str] = None, token_alignment: str = "grid",
                 projector: Union[str, RepaProjector] = "layernorm_linear", target_zscore_alpha: Optional[float] = None):
        if isinstance(encoder_dim, Sequence):
            raise ValueError(f"URepaLoss aligns one encoder: encoder_dim must be an int, got {encoder_dim!r}")
        super().__init__(hidden_dim, encoder_dim, schedule, backend, token_alignment, projector, target_zscore_alpha)
        if isinstance(manifold_weight, bool) or not isinstance(manifold_weight, (int, float)) \
                or not math.isfinite(manifold_weight) or manifold_weight < 0:
            raise ValueError(f"manifold_weight must be a number >= 0, got {manifold_weight!r}")
        self.manifold_weight = float(manifold_weight)

    def _losses(self, hidden, target, hidden_grid, target_grid):
        return projector_losses(self.projector, hidden, target, hidden_grid=hidden_grid, target_grid=target_grid,
                                target_zscore_alpha=self.target_zscore_alpha, manifold=True, backend=self.backend,
                                token_alignment=self.token_alignment)

    def _term_weights(self):
        return (1.0, self.manifold_weight)
