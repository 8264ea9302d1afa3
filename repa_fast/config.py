"""REPA / U-REPA settings parsed from SimpleTuner's `crepa_*` / `urepa_*` config keys.

A field is its key without the prefix (`crepa_block_index` -> `block_index`), except that
`lambda` is spelled `lambda_` and the `irepa_*` keys (read by both of SimpleTuner's regularizers)
keep their name. Every field carries the `ParamSpec` that checks it; the schedule fields reuse
`repa_fast.schedule.SCHEDULE_PARAMS`, so they are checked exactly as `LambdaSchedule` checks its
arguments.

Every key SimpleTuner 4.10.1 reads is accepted, and a key given as None takes its default (as
SimpleTuner reads it). Keys that only matter for video models are accepted at any valid value;
keys that would change the image loss in a way repa-fast does not implement are an error when
set to anything but their default (`unsupported=` on the field), never silently ignored.
"""
from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any, ClassVar, Self

from .alignment import TOKEN_ALIGNMENTS
from .schedule import SCHEDULE_PARAMS, LambdaSchedule, ParamSpec

_SPEC = "spec"
_KEY = "key"
_UNSUPPORTED = "unsupported"
# Keys of this prefix belong to both configs (SimpleTuner's two regularizers both read them).
_SHARED_PREFIX = "irepa_"
# The projector kinds (repa_fast.projectors.PROJECTOR_KINDS; not imported: config stays torch-free).
PROJECTOR_KINDS = ("layernorm_linear", "mlp", "conv")


def _field(default: Any, spec: ParamSpec, *, key: str | None = None, unsupported: str | None = None,
           supported: tuple = ()) -> Any:
    """`key`: the config key when it is not prefix + name. `unsupported`: why a value other than
    the default (or one of `supported`) is refused."""
    metadata = {_SPEC: spec}
    if key is not None:
        metadata[_KEY] = key
    if unsupported is not None:
        metadata[_UNSUPPORTED] = ((default, *supported), unsupported)
    return dataclasses.field(default=default, metadata=metadata)


def _schedule_field(default: Any, name: str) -> Any:
    return _field(default, SCHEDULE_PARAMS[name])


@dataclasses.dataclass(frozen=True, kw_only=True)
class _AlignmentConfig:
    """Fields and parsing shared by both configs; a subclass sets `prefix` and adds fields."""

    prefix: ClassVar[str]

    enabled: bool = _field(False, ParamSpec(bool))
    lambda_: float = _schedule_field(0.5, "base")
    scheduler: str = _schedule_field("constant", "scheduler")
    warmup_steps: int = _schedule_field(0, "warmup_steps")
    decay_steps: int = _schedule_field(0, "decay_steps")
    lambda_end: float = _schedule_field(0.0, "lambda_end")
    power: float = _schedule_field(1.0, "power")
    cutoff_step: int = _schedule_field(0, "cutoff_step")
    similarity_threshold: float | None = _schedule_field(None, "similarity_threshold")
    similarity_ema_decay: float = _schedule_field(0.99, "similarity_ema_decay")
    threshold_mode: str = _schedule_field("permanent", "threshold_mode")
    # repa-fast's own: "grid" or "sequence" (SimpleTuner's rule), see repa_fast.alignment.
    token_alignment: str = _field("grid", ParamSpec(str, choices=TOKEN_ALIGNMENTS))
    # The projector: None picks "conv" with iREPA, else "layernorm_linear" (SimpleTuner's).
    projector_kind: str | None = _field(None, ParamSpec(str, choices=PROJECTOR_KINDS, optional=True))
    projector_mlp_width: int = _field(2048, ParamSpec(int, minimum=1))   # REPA's projector_dim
    irepa_enabled: bool = _field(False, ParamSpec(bool), key="irepa_enabled")
    irepa_spatial_norm_alpha: float = _field(0.6, ParamSpec(float, minimum=0.0), key="irepa_spatial_norm_alpha")
    # SimpleTuner checks it is odd only when it builds the iREPA projector.
    irepa_projector_kernel_size: int = _field(3, ParamSpec(int, minimum=1), key="irepa_projector_kernel_size")

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            key = self.key(field.name)
            value = field.metadata[_SPEC].parse(key, getattr(self, field.name))
            if _UNSUPPORTED in field.metadata:
                supported, why = field.metadata[_UNSUPPORTED]
                if value not in supported:
                    raise ValueError(f"{key}={value!r} is not supported: {why}; leave it at "
                                     f"{' or '.join(map(repr, supported))} (or use SimpleTuner's own regularizer)")
            object.__setattr__(self, field.name, value)  # frozen: store the normalized value

    @property
    def projector(self) -> str:
        """The projector kind these settings pick. Checked here, when a projector is built (as
        SimpleTuner checks the kernel size), not at parsing: the keys may be set while disabled."""
        if self.irepa_enabled and self.irepa_projector_kernel_size % 2 == 0:
            raise ValueError(f"irepa_projector_kernel_size must be odd with irepa_enabled, got "
                             f"{self.irepa_projector_kernel_size}")
        if self.irepa_enabled and self.projector_kind not in (None, "conv"):
            raise ValueError(f"irepa_enabled uses iREPA's conv projector, but {self.key('projector_kind')} is "
                             f"{self.projector_kind!r}: leave it unset (or 'conv'), or turn irepa_enabled off")
        if self.projector_kind is not None:
            return self.projector_kind
        return "conv" if self.irepa_enabled else "layernorm_linear"

    @property
    def target_zscore_alpha(self) -> float | None:
        """iREPA's spatial z-score of the target (irepa_spatial_norm_alpha), None without iREPA."""
        return self.irepa_spatial_norm_alpha if self.irepa_enabled else None

    @classmethod
    def key(cls, field_name: str) -> str:
        """The config key of a field; the `_` of `lambda_` (`lambda` is a keyword) is dropped."""
        field = {field.name: field for field in dataclasses.fields(cls)}.get(field_name)
        if field is not None and _KEY in field.metadata:
            return field.metadata[_KEY]
        return cls.prefix + field_name.removesuffix("_")

    @classmethod
    def keys(cls) -> list[str]:
        """Every config key this class accepts."""
        return [cls.key(field.name) for field in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], *, ignore_unrelated: bool = False) -> Self:
        """Parse prefixed keys; with `ignore_unrelated`, keys without this prefix are skipped so
        a trainer's whole config can be passed, but a misspelled prefixed key still raises. A
        value of None means the key's default, as in SimpleTuner."""
        if not isinstance(config, Mapping):
            raise ValueError(f"{cls.__name__} config must be a mapping of keys to values, got {config!r}")
        field_by_key = {cls.key(field.name): field.name for field in dataclasses.fields(cls)}
        values = {}
        for key, value in config.items():
            if key in field_by_key:
                if value is not None:
                    values[field_by_key[key]] = value
                continue
            has_prefix = isinstance(key, str) and key.startswith((cls.prefix, _SHARED_PREFIX))
            if has_prefix or not ignore_unrelated:
                raise ValueError(cls._unknown_key_message(key))
        return cls(**values)

    @classmethod
    def _unknown_key_message(cls, key: object) -> str:
        if not isinstance(key, str):
            return f"{cls.__name__} keys are strings, got {key!r}"
        for other in _CONFIG_CLASSES:
            if other is not cls and key in other.keys():
                return (
                    f"{key!r} is a {other.__name__} key, not a {cls.__name__} key "
                    f"({cls.__name__} keys start with {cls.prefix!r}); pass it to "
                    f"{other.__name__}.from_dict, or use ignore_unrelated=True"
                )
        # Compare without the prefix: shared by every key, it would make any two keys look alike.
        key_by_name = {valid_key.removeprefix(cls.prefix): valid_key for valid_key in cls.keys()}
        close_names = difflib.get_close_matches(key.removeprefix(cls.prefix), key_by_name)
        if not close_names and key.startswith(_SHARED_PREFIX):
            close_names = difflib.get_close_matches(key, key_by_name)
        suggestions = [key_by_name[name] for name in close_names]
        hint = (
            f"did you mean {', '.join(repr(suggestion) for suggestion in suggestions)}?"
            if suggestions
            else f"valid keys: {', '.join(cls.keys())}"
        )
        return f"unknown {cls.__name__} key {key!r}; {hint}"

    def to_dict(self) -> dict[str, Any]:
        """Every field under its prefixed key; `from_dict(c.to_dict()) == c`."""
        return {self.key(field.name): getattr(self, field.name) for field in dataclasses.fields(self)}

    def schedule(self, max_train_steps: int | None = None) -> LambdaSchedule:
        """The weight schedule these settings describe, starting from `lambda_`."""
        return LambdaSchedule(
            base=self.lambda_,
            scheduler=self.scheduler,
            warmup_steps=self.warmup_steps,
            decay_steps=self.decay_steps,
            lambda_end=self.lambda_end,
            power=self.power,
            cutoff_step=self.cutoff_step,
            similarity_threshold=self.similarity_threshold,
            similarity_ema_decay=self.similarity_ema_decay,
            threshold_mode=self.threshold_mode,
            max_train_steps=max_train_steps,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RepaConfig(_AlignmentConfig):
    """REPA for DiT models: `crepa_*` keys. `block_index` None leaves the choice to the model."""

    prefix: ClassVar[str] = "crepa_"

    block_index: int | None = _field(None, ParamSpec(int, minimum=0, optional=True))
    encoder: str = _field("dinov2_vitg14", ParamSpec(str))
    model: str | None = _field(None, ParamSpec(str, optional=True))  # SimpleTuner prefers it over `encoder`
    encoder_image_size: int = _field(518, ParamSpec(int, minimum=1))
    spatial_align: bool = _field(True, ParamSpec(bool))
    use_tae: bool = _field(False, ParamSpec(bool))
    # Video-only in SimpleTuner (neighbour frames, frame batching): no effect on an image loss.
    drop_vae_encoder: bool = _field(False, ParamSpec(bool))
    adjacent_distance: int = _field(1, ParamSpec(int, minimum=0))
    adjacent_tau: float = _field(1.0, ParamSpec(float, minimum=0.0, minimum_inclusive=False))
    cumulative_neighbors: bool = _field(False, ParamSpec(bool))
    encoder_frames_batch_size: int = _field(-1, ParamSpec(int))
    normalize_by_frames: bool = _field(True, ParamSpec(bool))
    normalize_neighbour_sum: bool = _field(False, ParamSpec(bool))
    # Teachers other than the external encoder: SimpleTuner's, not repa-fast's.
    use_backbone_features: bool = _field(False, ParamSpec(bool), unsupported="backbone teacher features are "
                                                                           "not implemented in repa-fast")
    feature_source: str | None = _field(
        None, ParamSpec(str, choices=("encoder", "external", "backbone", "internal", "self_flow", "selfflow"),
                        optional=True),
        unsupported="repa-fast aligns to the external encoder only", supported=("encoder", "external"))
    self_flow: bool = _field(False, ParamSpec(bool), unsupported="self-flow teacher features are not "
                                                                 "implemented in repa-fast")
    teacher_block_index: int | None = _field(None, ParamSpec(int, minimum=0, optional=True),
                                             unsupported="a teacher block (backbone / self-flow features) is "
                                                         "not implemented in repa-fast")
    self_flow_mask_ratio: float = _field(0.1, ParamSpec(float, minimum=0.0))

    @property
    def encoder_name(self) -> str:
        """The encoder SimpleTuner loads: `crepa_model`, else `crepa_encoder`."""
        return self.model or self.encoder


@dataclasses.dataclass(frozen=True, kw_only=True)
class URepaConfig(_AlignmentConfig):
    """U-REPA for UNet models: `urepa_*` keys."""

    prefix: ClassVar[str] = "urepa_"

    manifold_weight: float = _field(3.0, ParamSpec(float, minimum=0.0))
    model: str = _field("dinov2_vitg14", ParamSpec(str))
    encoder_image_size: int = _field(518, ParamSpec(int, minimum=1))
    use_tae: bool = _field(False, ParamSpec(bool))

    @property
    def encoder_name(self) -> str:
        return self.model

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], *, ignore_unrelated: bool = False) -> Self:
        """As the base; without `urepa_model` the encoder is `crepa_model`, else `crepa_encoder`
        (SimpleTuner's fallback: one encoder for both)."""
        parsed = super().from_dict(config, ignore_unrelated=ignore_unrelated)
        shared = {key: config[key] for key in ("crepa_model", "crepa_encoder") if config.get(key) is not None}
        if config.get("urepa_model") is None and shared:
            parsed = dataclasses.replace(parsed, model=RepaConfig.from_dict(shared).encoder_name)
        return parsed


_CONFIG_CLASSES: tuple[type[_AlignmentConfig], ...] = (RepaConfig, URepaConfig)
