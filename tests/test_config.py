"""RepaConfig / URepaConfig: the seed page's crepa_* / urepa_* keys."""
import dataclasses
import json
import math

import pytest

from repa_fast.config import RepaConfig, URepaConfig
from repa_fast.schedule import LambdaSchedule

# The four JSON examples of the seed page, verbatim.
SEED_DIT_REPA = """
{
  "crepa_enabled": true,
  "crepa_block_index": 8,
  "crepa_lambda": 0.5,
  "crepa_encoder": "dinov2_vitg14",
  "crepa_encoder_image_size": 518
}
"""
SEED_UNET_UREPA = """
{
  "urepa_enabled": true,
  "urepa_lambda": 0.5,
  "urepa_manifold_weight": 3.0,
  "urepa_model": "dinov2_vitg14",
  "urepa_encoder_image_size": 518
}
"""
SEED_CREPA_SCHEDULE = """
{
  "crepa_scheduler": "cosine",
  "crepa_warmup_steps": 100,
  "crepa_decay_steps": 5000,
  "crepa_lambda_end": 0.0
}
"""
SEED_UREPA_SCHEDULE = """
{
  "urepa_scheduler": "cosine",
  "urepa_warmup_steps": 100,
  "urepa_cutoff_step": 5000
}
"""

REPA_DEFAULTS = {
    "enabled": False,
    "block_index": None,
    "lambda_": 0.5,
    "encoder": "dinov2_vitg14",
    "encoder_image_size": 518,
    "spatial_align": True,
    "scheduler": "constant",
    "warmup_steps": 0,
    "decay_steps": 0,
    "lambda_end": 0.0,
    "power": 1.0,
    "cutoff_step": 0,
    "similarity_threshold": None,
    "similarity_ema_decay": 0.99,
    "threshold_mode": "permanent",
    "token_alignment": "grid",
    "projector_kind": None,
    "projector_mlp_width": 2048,
    "irepa_enabled": False,
    "irepa_spatial_norm_alpha": 0.6,
    "irepa_projector_kernel_size": 3,
    "model": None,
    "use_tae": False,
    "drop_vae_encoder": False,
    "adjacent_distance": 1,
    "adjacent_tau": 1.0,
    "cumulative_neighbors": False,
    "encoder_frames_batch_size": -1,
    "normalize_by_frames": True,
    "normalize_neighbour_sum": False,
    "use_backbone_features": False,
    "feature_source": None,
    "self_flow": False,
    "teacher_block_index": None,
    "self_flow_mask_ratio": 0.1,
}
UREPA_DEFAULTS = {
    "enabled": False,
    "lambda_": 0.5,
    "manifold_weight": 3.0,
    "model": "dinov2_vitg14",
    "encoder_image_size": 518,
    "use_tae": False,
    "scheduler": "constant",
    "warmup_steps": 0,
    "decay_steps": 0,
    "lambda_end": 0.0,
    "power": 1.0,
    "cutoff_step": 0,
    "similarity_threshold": None,
    "similarity_ema_decay": 0.99,
    "threshold_mode": "permanent",
    "token_alignment": "grid",
    "projector_kind": None,
    "projector_mlp_width": 2048,
    "irepa_enabled": False,
    "irepa_spatial_norm_alpha": 0.6,
    "irepa_projector_kernel_size": 3,
}


def _fields(config: RepaConfig | URepaConfig) -> dict[str, object]:
    return dataclasses.asdict(config)


# --- the seed's examples -----------------------------------------------------------------------


def test_seed_dit_repa_example() -> None:
    config = RepaConfig.from_dict(json.loads(SEED_DIT_REPA))
    assert _fields(config) == {**REPA_DEFAULTS, "enabled": True, "block_index": 8}


def test_seed_unet_urepa_example() -> None:
    config = URepaConfig.from_dict(json.loads(SEED_UNET_UREPA))
    assert _fields(config) == {**UREPA_DEFAULTS, "enabled": True}


def test_seed_crepa_schedule_example() -> None:
    config = RepaConfig.from_dict(json.loads(SEED_CREPA_SCHEDULE))
    assert _fields(config) == {**REPA_DEFAULTS, "scheduler": "cosine", "warmup_steps": 100, "decay_steps": 5000}
    schedule = config.schedule()
    assert schedule.weight(50) == pytest.approx(0.25)
    assert schedule.weight(2550) == pytest.approx(0.25)  # halfway through the cosine decay
    assert schedule.weight(5000) == pytest.approx(0.0)


def test_seed_urepa_schedule_example() -> None:
    config = URepaConfig.from_dict(json.loads(SEED_UREPA_SCHEDULE))
    assert _fields(config) == {**UREPA_DEFAULTS, "scheduler": "cosine", "warmup_steps": 100, "cutoff_step": 5000}
    # cosine with decay_steps 0 decays until max_train_steps, and is cut off at 5000.
    schedule = config.schedule(max_train_steps=10_100)
    assert schedule.weight(100) == pytest.approx(0.5)
    assert schedule.weight(4999) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4899 / 10_000)) / 2)
    assert schedule.weight(5000) == 0.0
    assert schedule.is_off(5000)


def test_seed_examples_together_in_one_trainer_config() -> None:
    trainer_config = {
        "model_family": "flux",
        "learning_rate": 1e-4,
        **json.loads(SEED_DIT_REPA),
        **json.loads(SEED_CREPA_SCHEDULE),
        **json.loads(SEED_UNET_UREPA),
        **json.loads(SEED_UREPA_SCHEDULE),
    }
    repa = RepaConfig.from_dict(trainer_config, ignore_unrelated=True)
    urepa = URepaConfig.from_dict(trainer_config, ignore_unrelated=True)
    assert (repa.block_index, repa.scheduler, repa.decay_steps) == (8, "cosine", 5000)
    assert (urepa.enabled, urepa.manifold_weight, urepa.cutoff_step) == (True, 3.0, 5000)


# --- defaults ----------------------------------------------------------------------------------


def test_repa_defaults() -> None:
    assert _fields(RepaConfig()) == REPA_DEFAULTS
    assert RepaConfig.from_dict({}) == RepaConfig()


def test_urepa_defaults() -> None:
    assert _fields(URepaConfig()) == UREPA_DEFAULTS
    assert URepaConfig.from_dict({}) == URepaConfig()


@pytest.mark.parametrize("config_class", [RepaConfig, URepaConfig])
def test_default_schedule_is_lambda_schedule_default(config_class: type[RepaConfig | URepaConfig]) -> None:
    assert config_class().schedule().to_dict() == LambdaSchedule().to_dict()


# --- unknown keys ------------------------------------------------------------------------------


def test_unknown_key_suggests_the_closest_key() -> None:
    with pytest.raises(ValueError, match=r"'crepa_lamda'.*did you mean 'crepa_lambda'"):
        RepaConfig.from_dict({"crepa_lamda": 0.5})
    with pytest.raises(ValueError, match=r"'urepa_manifold_wieght'.*did you mean 'urepa_manifold_weight'"):
        URepaConfig.from_dict({"urepa_manifold_wieght": 1.0})
    # Compared without the prefix, so a forgotten prefix is suggested back.
    with pytest.raises(ValueError, match=r"'block_idx'.*did you mean 'crepa_block_index'"):
        RepaConfig.from_dict({"block_idx": 8})


def test_unknown_key_without_close_match_lists_the_valid_keys() -> None:
    with pytest.raises(ValueError, match=r"'crepa_qwertyuiop'.*valid keys: crepa_enabled, "):
        RepaConfig.from_dict({"crepa_qwertyuiop": 1})


def test_key_of_the_other_config_names_that_config() -> None:
    with pytest.raises(ValueError, match=r"'urepa_lambda' is a URepaConfig key, not a RepaConfig key"):
        RepaConfig.from_dict({"urepa_lambda": 0.5})
    with pytest.raises(ValueError, match=r"'crepa_block_index' is a RepaConfig key, not a URepaConfig key"):
        URepaConfig.from_dict({"crepa_block_index": 8})


@pytest.mark.parametrize("key", ["lambda", "lambda_", "block_index", "learning_rate"])
def test_unprefixed_key_is_unknown(key: str) -> None:
    with pytest.raises(ValueError, match=f"unknown RepaConfig key '{key}'"):
        RepaConfig.from_dict({key: 1})


def test_non_string_key_is_rejected() -> None:
    with pytest.raises(ValueError, match="keys are strings, got 3"):
        RepaConfig.from_dict({3: True})


def test_non_mapping_is_rejected() -> None:
    with pytest.raises(ValueError, match="mapping"):
        RepaConfig.from_dict([("crepa_enabled", True)])  # type: ignore[arg-type]


def test_ignore_unrelated_skips_other_keys_only() -> None:
    trainer_config = {"learning_rate": 1e-4, "urepa_enabled": True, 3: "x", "crepa_enabled": True}
    assert RepaConfig.from_dict(trainer_config, ignore_unrelated=True) == RepaConfig(enabled=True)
    assert URepaConfig.from_dict(trainer_config, ignore_unrelated=True) == URepaConfig(enabled=True)
    with pytest.raises(ValueError, match="learning_rate"):
        RepaConfig.from_dict(trainer_config)


def test_ignore_unrelated_still_rejects_a_misspelled_prefixed_key() -> None:
    with pytest.raises(ValueError, match=r"'crepa_warmup'.*did you mean 'crepa_warmup_steps'"):
        RepaConfig.from_dict({"learning_rate": 1e-4, "crepa_warmup": 10}, ignore_unrelated=True)


# --- wrong values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config_class", "key", "value", "allowed"),
    [
        (RepaConfig, "crepa_enabled", 1, "a bool"),
        (RepaConfig, "crepa_enabled", "true", "a bool"),
        (RepaConfig, "crepa_spatial_align", 0, "a bool"),
        (RepaConfig, "crepa_block_index", 8.5, "an integer >= 0 or None"),
        (RepaConfig, "crepa_block_index", -1, "an integer >= 0 or None"),
        (RepaConfig, "crepa_block_index", "8", "an integer >= 0 or None"),
        (RepaConfig, "crepa_block_index", True, "an integer >= 0 or None"),
        (RepaConfig, "crepa_lambda", "0.5", "a finite number >= 0"),
        (RepaConfig, "crepa_lambda", -0.5, "a finite number >= 0"),
        (RepaConfig, "crepa_lambda", float("nan"), "a finite number >= 0"),
        (RepaConfig, "crepa_lambda", True, "a finite number >= 0"),
        (RepaConfig, "crepa_encoder", 14, "a non-empty string"),
        (RepaConfig, "crepa_encoder", "", "a non-empty string"),
        (RepaConfig, "crepa_encoder_image_size", 0, "an integer >= 1"),
        (RepaConfig, "crepa_encoder_image_size", 518.5, "an integer >= 1"),
        (RepaConfig, "crepa_scheduler", "cosin", "one of 'constant', 'linear', 'cosine', 'polynomial'"),
        (RepaConfig, "crepa_threshold_mode", "sticky", "one of 'permanent', 'recoverable'"),
        (RepaConfig, "crepa_warmup_steps", -1, "an integer >= 0"),
        (RepaConfig, "crepa_warmup_steps", 10.5, "an integer >= 0"),
        (RepaConfig, "crepa_decay_steps", "5000", "an integer >= 0"),
        (RepaConfig, "crepa_cutoff_step", False, "an integer >= 0"),
        (RepaConfig, "crepa_lambda_end", -0.1, "a finite number >= 0"),
        (RepaConfig, "crepa_power", 0, "a finite number > 0"),
        (RepaConfig, "crepa_similarity_threshold", "high", "a finite number or None"),
        (RepaConfig, "crepa_similarity_threshold", float("inf"), "a finite number or None"),
        (RepaConfig, "crepa_similarity_ema_decay", 1.0, "a finite number >= 0 and < 1"),
        (URepaConfig, "urepa_enabled", "yes", "a bool"),
        (URepaConfig, "urepa_lambda", -1, "a finite number >= 0"),
        (URepaConfig, "urepa_manifold_weight", -3.0, "a finite number >= 0"),
        (URepaConfig, "urepa_manifold_weight", "3.0", "a finite number >= 0"),
        (URepaConfig, "urepa_encoder_image_size", -518, "an integer >= 1"),
        (URepaConfig, "urepa_use_tae", 1, "a bool"),
        (URepaConfig, "urepa_scheduler", "exponential", "one of 'constant'"),
        (URepaConfig, "urepa_cutoff_step", 5000.5, "an integer >= 0"),
        (URepaConfig, "urepa_threshold_mode", "Permanent", "one of 'permanent', 'recoverable'"),
        (URepaConfig, "urepa_similarity_ema_decay", -0.5, "a finite number >= 0 and < 1"),
    ],
)
def test_wrong_value_names_key_value_and_what_is_allowed(
    config_class: type[RepaConfig | URepaConfig], key: str, value: object, allowed: str
) -> None:
    with pytest.raises(ValueError) as error:
        config_class.from_dict({key: value})
    message = str(error.value)
    assert message.startswith(f"{key} must be {allowed}")
    assert message.endswith(f"got {value!r}")


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ValueError, match=r"^crepa_lambda must be"):
        RepaConfig(lambda_=-1.0)
    with pytest.raises(ValueError, match=r"^urepa_use_tae must be"):
        URepaConfig(use_tae="no")  # type: ignore[arg-type]


def test_configs_are_frozen() -> None:
    config = RepaConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lambda_ = 2.0  # type: ignore[misc]


# --- accepted values ---------------------------------------------------------------------------


def test_ints_are_accepted_for_float_fields() -> None:
    config = URepaConfig.from_dict({"urepa_lambda": 1, "urepa_manifold_weight": 1, "urepa_power": 2})
    assert (config.lambda_, config.manifold_weight, config.power) == (1.0, 1.0, 2.0)
    assert all(type(value) is float for value in (config.lambda_, config.manifold_weight, config.power))


def test_whole_floats_are_accepted_for_int_fields() -> None:
    # JSON writes 1e4 as a float.
    config = RepaConfig.from_dict({"crepa_decay_steps": 1e4, "crepa_block_index": 8.0})
    assert (config.decay_steps, config.block_index) == (10_000, 8)
    assert type(config.decay_steps) is int and type(config.block_index) is int


def test_none_is_accepted_for_block_index_and_similarity_threshold() -> None:
    config = RepaConfig.from_dict({"crepa_block_index": None, "crepa_similarity_threshold": None})
    assert config.block_index is None and config.similarity_threshold is None
    config = URepaConfig.from_dict({"urepa_similarity_threshold": 0.9})
    assert config.similarity_threshold == 0.9


def test_a_zero_given_stays_zero() -> None:
    config = RepaConfig.from_dict(
        {
            "crepa_block_index": 0,
            "crepa_lambda": 0,
            "crepa_warmup_steps": 0,
            "crepa_cutoff_step": 0,
            "crepa_lambda_end": 0,
            "crepa_similarity_ema_decay": 0,
            "crepa_similarity_threshold": 0,
        }
    )
    assert config.block_index == 0  # block 0, not "model-dependent default"
    assert config.lambda_ == 0.0
    assert config.similarity_threshold == 0.0
    schedule = config.schedule()
    expected = LambdaSchedule(base=0.0, similarity_ema_decay=0.0, similarity_threshold=0.0)
    assert schedule.to_dict() == expected.to_dict()
    assert not schedule.is_off(10**6)  # cutoff_step 0 is no cutoff
    assert schedule.weight(10**6) == 0.0
    assert URepaConfig.from_dict({"urepa_manifold_weight": 0}).manifold_weight == 0.0


# --- to_dict / schedule ------------------------------------------------------------------------


def test_to_dict_has_every_prefixed_key() -> None:
    assert list(RepaConfig().to_dict()) == RepaConfig.keys()
    assert set(RepaConfig().to_dict()) == {RepaConfig.key(name) for name in REPA_DEFAULTS}
    assert set(URepaConfig().to_dict()) == {URepaConfig.key(name) for name in UREPA_DEFAULTS}
    assert RepaConfig.key("irepa_enabled") == URepaConfig.key("irepa_enabled") == "irepa_enabled"
    assert RepaConfig(lambda_=0.25).to_dict()["crepa_lambda"] == 0.25


def test_to_dict_round_trip_through_json() -> None:
    repa = RepaConfig(
        enabled=True,
        block_index=10,
        lambda_=0.3,
        encoder="dinov2_vits14",
        encoder_image_size=224,
        spatial_align=False,
        scheduler="polynomial",
        warmup_steps=50,
        decay_steps=2000,
        lambda_end=0.05,
        power=2.0,
        cutoff_step=1500,
        similarity_threshold=0.85,
        similarity_ema_decay=0.9,
        threshold_mode="recoverable",
    )
    urepa = URepaConfig(enabled=True, manifold_weight=1.0, model="dinov2_vits14", use_tae=True, cutoff_step=7)
    for config in (repa, urepa):
        assert type(config).from_dict(config.to_dict()) == config
        assert type(config).from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_schedule_is_built_from_the_fields() -> None:
    config = URepaConfig(
        lambda_=0.8,
        scheduler="linear",
        warmup_steps=10,
        decay_steps=110,
        lambda_end=0.2,
        power=3.0,
        cutoff_step=90,
        similarity_threshold=0.95,
        similarity_ema_decay=0.5,
        threshold_mode="recoverable",
    )
    schedule = config.schedule(max_train_steps=1000)
    assert isinstance(schedule, LambdaSchedule)
    assert schedule.to_dict() == {
        "base": 0.8,
        "scheduler": "linear",
        "warmup_steps": 10,
        "decay_steps": 110,
        "lambda_end": 0.2,
        "power": 3.0,
        "cutoff_step": 90,
        "similarity_threshold": 0.95,
        "similarity_ema_decay": 0.5,
        "threshold_mode": "recoverable",
        "max_train_steps": 1000,
    }
    assert schedule.weight(60) == pytest.approx(0.5)


def test_schedule_of_decaying_config_needs_decay_steps_or_max_train_steps() -> None:
    config = RepaConfig(scheduler="cosine", warmup_steps=100)
    with pytest.raises(ValueError, match="decay_steps.*max_train_steps"):
        config.schedule()
    assert config.schedule(max_train_steps=1100).weight(600) == pytest.approx(0.25)


def test_each_call_builds_a_fresh_schedule() -> None:
    config = RepaConfig(similarity_threshold=0.5)
    first = config.schedule()
    first.weight(0, similarity=0.9)
    assert first.is_cut_off
    assert not config.schedule().is_cut_off
