"""Per-step weight of an alignment loss (DESIGN.md §1 "Weight schedule").

`LambdaSchedule` follows SimpleTuner's CrepaScheduler: warmup, then a constant or decaying
weight, switched off by a step cutoff or by an EMA of the alignment similarity crossing a
threshold. `ParamSpec` and `SCHEDULE_PARAMS` are the one place the schedule's hyper-parameters
are checked; `repa_fast.config` validates its `*_scheduler`, `*_warmup_steps`, ... keys with them.
Standard library only, so the module works without the rest of the package.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_INT64_MAX = 2 ** 63 - 1
SCHEDULERS = ("constant", "linear", "cosine", "polynomial")
DECAYING_SCHEDULERS = ("linear", "cosine", "polynomial")
THRESHOLD_MODES = ("permanent", "recoverable")


@dataclass(frozen=True)
class ParamSpec:
    """What one parameter accepts: its type (bool, int, float or str), range, choices, None."""

    kind: type
    minimum: float | None = None
    minimum_inclusive: bool = True
    below: float | None = None
    choices: tuple[str, ...] = ()
    optional: bool = False

    def describe(self) -> str:
        """What is allowed, in words, for error messages."""
        if self.kind is bool:
            text = "a bool (true or false)"
        elif self.kind is str:
            if self.choices:
                text = "one of " + ", ".join(repr(choice) for choice in self.choices)
            else:
                text = "a non-empty string"
        else:
            text = "an integer" if self.kind is int else "a finite number"
            bounds = []
            if self.minimum is not None:
                bounds.append(f"{'>=' if self.minimum_inclusive else '>'} {self.minimum:g}")
            if self.below is not None:
                bounds.append(f"< {self.below:g}")
            if bounds:
                text += " " + " and ".join(bounds)
        return text + " or None" if self.optional else text

    def parse(self, name: str, value: object) -> Any:
        """Return `value` checked and normalized (ints become floats for float parameters,
        integral floats become ints for int parameters); ValueError naming `name` otherwise."""
        if value is None and self.optional:
            return None
        parsed = self._parse_kind(value)
        if parsed is None or not self._in_range(parsed):
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")
        return parsed

    def _parse_kind(self, value: object) -> Any:
        """`value` converted to `kind`, or None when it is not of that kind."""
        if self.kind is bool:
            return value if isinstance(value, bool) else None
        if self.kind is str:
            return value if isinstance(value, str) else None
        # bool is an int subclass; a flag where a number belongs is a mistake, not 0 or 1.
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return None
        try:
            as_float = float(value)
        except OverflowError:   # an int past float range (~1.8e308): a typo, not a setting
            return None
        if self.kind is int:
            # JSON writes 1e4 as a float: accept it as long as it is a whole number.
            if isinstance(value, numbers.Integral):
                as_int = int(value)
            elif as_float.is_integer():
                as_int = int(as_float)
            else:
                return None
            # A step count fits int64 (what trainers count in); larger ints would overflow the
            # float arithmetic of the schedule.
            return as_int if abs(as_int) <= _INT64_MAX else None
        return as_float if math.isfinite(as_float) else None

    def _in_range(self, value: Any) -> bool:
        if self.kind is str:
            return value in self.choices if self.choices else value != ""
        if self.kind is bool:
            return True
        if self.minimum is not None:
            if value < self.minimum or (value == self.minimum and not self.minimum_inclusive):
                return False
        return self.below is None or value < self.below


# Keyed by LambdaSchedule's argument names; `base` is the configs' `lambda`.
SCHEDULE_PARAMS: dict[str, ParamSpec] = {
    "base": ParamSpec(float, minimum=0.0),
    "scheduler": ParamSpec(str, choices=SCHEDULERS),
    "warmup_steps": ParamSpec(int, minimum=0),
    "decay_steps": ParamSpec(int, minimum=0),
    "lambda_end": ParamSpec(float, minimum=0.0),
    "power": ParamSpec(float, minimum=0.0, minimum_inclusive=False),
    "cutoff_step": ParamSpec(int, minimum=0),
    "similarity_threshold": ParamSpec(float, optional=True),
    "similarity_ema_decay": ParamSpec(float, minimum=0.0, below=1.0),
    "threshold_mode": ParamSpec(str, choices=THRESHOLD_MODES),
    "max_train_steps": ParamSpec(int, minimum=0, optional=True),
}

_STEP = ParamSpec(int, minimum=0)
_SIMILARITY = ParamSpec(float)
_STATE_PARAMS: dict[str, ParamSpec] = {
    "similarity_ema": ParamSpec(float, optional=True),
    "cut_off": ParamSpec(bool),
}


def _check(name: str, value: object) -> Any:
    return SCHEDULE_PARAMS[name].parse(name, value)


class LambdaSchedule:
    """Weight of an alignment loss at each training step (SimpleTuner's CrepaScheduler).

    The hyper-parameters are checked at construction and read as attributes (change them by
    building a new schedule); the state (similarity EMA and cutoff latch) changes with each
    `weight` call and is saved by `state_dict`.
    """

    def __init__(
        self,
        base: float = 0.5,
        scheduler: str = "constant",
        warmup_steps: int = 0,
        decay_steps: int = 0,
        lambda_end: float = 0.0,
        power: float = 1.0,
        cutoff_step: int = 0,
        similarity_threshold: float | None = None,
        similarity_ema_decay: float = 0.99,
        threshold_mode: str = "permanent",
        max_train_steps: int | None = None,
    ) -> None:
        self.base: float = _check("base", base)
        self.scheduler: str = _check("scheduler", scheduler)
        self.warmup_steps: int = _check("warmup_steps", warmup_steps)
        self.decay_steps: int = _check("decay_steps", decay_steps)
        self.lambda_end: float = _check("lambda_end", lambda_end)
        self.power: float = _check("power", power)
        self.cutoff_step: int = _check("cutoff_step", cutoff_step)
        self.similarity_threshold: float | None = _check("similarity_threshold", similarity_threshold)
        self.similarity_ema_decay: float = _check("similarity_ema_decay", similarity_ema_decay)
        self.threshold_mode: str = _check("threshold_mode", threshold_mode)
        self.max_train_steps: int | None = _check("max_train_steps", max_train_steps)
        if self.scheduler in DECAYING_SCHEDULERS and self.decay_steps == 0 and not self.max_train_steps:
            raise ValueError(
                f"scheduler {self.scheduler!r} decays the weight until decay_steps, and "
                f"decay_steps=0 means max_train_steps: give decay_steps > 0 or max_train_steps > 0"
            )
        self._similarity_ema: float | None = None
        self._cut_off = False

    @property
    def similarity_ema(self) -> float | None:
        """EMA of the similarities passed to `weight`; None before the first one."""
        return self._similarity_ema

    @property
    def is_cut_off(self) -> bool:
        """True when the last `weight` call was cut off; in "permanent" mode, for good."""
        return self._cut_off

    def is_off(self, step: int) -> bool:
        """True when `weight(step, ...)` is 0 whatever similarity is passed, so the caller may
        skip computing the loss (and the similarity) at this step."""
        step = _STEP.parse("step", step)
        return self._step_cutoff_reached(step) or (self._cut_off and self.threshold_mode == "permanent")

    def weight(self, step: int, similarity: float | None = None) -> float:
        """The loss weight at `step`; `similarity` (mean cosine of this step) feeds the EMA first."""
        step = _STEP.parse("step", step)
        if similarity is not None:
            # A NaN would stay in the EMA forever and silently disable the threshold.
            self._update_ema(_SIMILARITY.parse("similarity", similarity))
        if self._cut_off and self.threshold_mode == "permanent":
            return 0.0
        cut_off = self._step_cutoff_reached(step) or (
            self.similarity_threshold is not None
            and self._similarity_ema is not None
            and self._similarity_ema >= self.similarity_threshold
        )
        # In "recoverable" mode the latch only records the last call; it is not consulted above.
        self._cut_off = cut_off
        return 0.0 if cut_off else self._scheduled_weight(step)

    def _update_ema(self, similarity: float) -> None:
        if self._similarity_ema is None:
            self._similarity_ema = similarity
        else:
            decay = self.similarity_ema_decay
            self._similarity_ema = decay * self._similarity_ema + (1.0 - decay) * similarity

    def _step_cutoff_reached(self, step: int) -> bool:
        return self.cutoff_step > 0 and step >= self.cutoff_step

    def _scheduled_weight(self, step: int) -> float:
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.base * (step / self.warmup_steps)
        if self.scheduler == "constant":
            return self.base
        # The constructor made sure one of the two is > 0 for a decaying scheduler.
        decay_end = self.decay_steps or self.max_train_steps or 0
        progress = min((step - self.warmup_steps) / max(decay_end - self.warmup_steps, 1), 1.0)
        start, end = self.base, self.lambda_end
        if self.scheduler == "linear":
            return start + (end - start) * progress
        if self.scheduler == "cosine":
            return end + (start - end) * ((1.0 + math.cos(math.pi * progress)) / 2.0)
        return (start - end) * (1.0 - progress) ** self.power + end

    def state_dict(self) -> dict[str, Any]:
        """The state that changes during training (not the hyper-parameters)."""
        return {"similarity_ema": self._similarity_ema, "cut_off": self._cut_off}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        if not isinstance(state, Mapping) or set(state) != set(_STATE_PARAMS):
            raise ValueError(
                f"state must be a mapping with exactly the keys {sorted(_STATE_PARAMS)}, got {state!r}"
            )
        parsed = {name: spec.parse(f"state[{name!r}]", state[name]) for name, spec in _STATE_PARAMS.items()}
        self._similarity_ema = parsed["similarity_ema"]
        self._cut_off = parsed["cut_off"]

    def to_dict(self) -> dict[str, Any]:
        """The hyper-parameters, as keyword arguments of the constructor."""
        return {name: getattr(self, name) for name in SCHEDULE_PARAMS}

    @classmethod
    def from_dict(cls, params: Mapping[str, Any]) -> LambdaSchedule:
        """Build a schedule from `to_dict`'s output (missing keys take their defaults)."""
        if not isinstance(params, Mapping):
            raise ValueError(f"params must be a mapping of LambdaSchedule arguments, got {params!r}")
        unknown = sorted(str(key) for key in params if key not in SCHEDULE_PARAMS)
        if unknown:
            raise ValueError(
                f"unknown LambdaSchedule argument(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(SCHEDULE_PARAMS)}"
            )
        return cls(**params)

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={value!r}" for name, value in self.to_dict().items())
        return f"{type(self).__name__}({args})"
