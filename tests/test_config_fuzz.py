"""Config fuzzing: random mixes of keys (valid, misspelled, other prefixes, not strings) and values
(wrong types, None, NaN, Inf, strings, lists, bools, huge and negative numbers) either parse or
raise the documented ValueError naming the offending key; nothing else escapes, and whatever
parses gives a schedule whose weights are numbers >= 0."""
import fractions
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import repa_fast as rf
from repa_fast.schedule import SCHEDULE_PARAMS, SCHEDULERS, THRESHOLD_MODES

FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=300)
CONFIG_CLASSES = [pytest.param(rf.RepaConfig, id="RepaConfig"), pytest.param(rf.URepaConfig, id="URepaConfig")]
VALID_KEYS = sorted(set(rf.RepaConfig.keys()) | set(rf.URepaConfig.keys()))
# Past 2**1000 int -> float conversions overflow: test_huge_ints_are_a_value_error covers that.
BIG = 2 ** 1000

keys = st.one_of(
    st.sampled_from(VALID_KEYS),
    st.builds(lambda key, i, char: key[:i] + char + key[i + 1:], st.sampled_from(VALID_KEYS),
              st.integers(0, 30), st.characters()),                                          # misspelled
    st.builds(lambda prefix, key: prefix + key.split("_", 1)[1],
              st.sampled_from(["repa_", "crepa", "CREPA_", "urepa__", "u_repa_", "", "crepa_urepa_"]),
              st.sampled_from(VALID_KEYS)),                                                  # other prefixes
    st.text(max_size=12),
    st.one_of(st.integers(), st.none(), st.booleans(), st.floats(allow_nan=False), st.tuples(st.integers())),
)
values = st.one_of(
    st.none(), st.booleans(), st.integers(-BIG, BIG), st.integers(-3, 10 ** 6),
    st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 5e-324, 1.7e308, 0.999999999, 1.0]),
    st.floats(0, 1), st.text(max_size=10),
    st.sampled_from(SCHEDULERS + THRESHOLD_MODES + ("dinov2_vitg14", "", "Cosine", "0.5", "true", "None")),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.tuples(st.floats()), st.binary(max_size=4), st.complex_numbers(max_magnitude=10),
    st.decimals(allow_nan=True, places=3), st.fractions(max_denominator=100),
    st.sampled_from([np.float64(math.nan), np.float32(0.5), np.int64(7), np.bool_(True), np.float64(1e4),
                     torch.tensor(0.5), torch.tensor(3), fractions.Fraction(1, 3)]),
)
steps = st.one_of(st.integers(-5, 10 ** 6), st.integers(-BIG, BIG), st.floats(), st.none(), st.booleans(),
                  st.text(max_size=4), st.sampled_from([np.int64(3), 2.0, 1e4, torch.tensor(2)]))
similarities = st.one_of(st.none(), st.floats(), st.integers(-BIG, BIG), st.floats(-1, 1), st.booleans(),
                         st.text(max_size=4), st.sampled_from([np.float64(0.3), np.float32(math.nan), [0.5]]))


def _names_an_offending_key(message: str, config: dict) -> bool:
    return any(repr(key) in message or str(key) in message for key in config)


def _assert_weights_are_numbers(schedule: rf.LambdaSchedule):
    for step in (0, 1, 7, 10 ** 6):
        weight = schedule.weight(step, 0.5)
        assert isinstance(weight, float) and weight >= 0.0 and not math.isnan(weight)
        if max(schedule.base, schedule.lambda_end) < 1e300:
            assert weight <= max(schedule.base, schedule.lambda_end)


@pytest.mark.parametrize("cls", CONFIG_CLASSES)
@pytest.mark.parametrize("ignore_unrelated", [False, True])
def test_config_from_dict_raises_only_value_error(cls, ignore_unrelated):
    @FUZZ
    @given(config=st.dictionaries(keys, values, max_size=6))
    def fuzz(config):
        try:
            parsed = cls.from_dict(config, ignore_unrelated=ignore_unrelated)
        except ValueError as error:
            assert _names_an_offending_key(str(error), config), str(error)
            return
        prefixed = {k for k in config if isinstance(k, str) and k.startswith(cls.prefix)}
        assert prefixed <= set(cls.keys()) and (ignore_unrelated or set(config) <= set(cls.keys()))
        assert cls.from_dict(parsed.to_dict()) == parsed
        try:
            schedule = parsed.schedule(max_train_steps=None)
        except ValueError as error:
            assert parsed.scheduler != "constant" and parsed.decay_steps == 0 and "decay_steps" in str(error)
            schedule = parsed.schedule(max_train_steps=1000)
        _assert_weights_are_numbers(schedule)
    fuzz()


@FUZZ
@given(kwargs=st.dictionaries(st.sampled_from(sorted(SCHEDULE_PARAMS)), values, max_size=5))
def test_schedule_constructor_raises_only_value_error(kwargs):
    try:
        schedule = rf.LambdaSchedule(**kwargs)
    except ValueError as error:
        assert any(name in str(error) for name in kwargs) or "decay_steps" in str(error), str(error)
        return
    assert rf.LambdaSchedule.from_dict(schedule.to_dict()).to_dict() == schedule.to_dict()
    _assert_weights_are_numbers(schedule)


@FUZZ
@given(params=st.dictionaries(keys, values, max_size=5))
def test_schedule_from_dict_raises_only_value_error(params):
    try:
        rf.LambdaSchedule.from_dict(params)
    except ValueError as error:
        assert _names_an_offending_key(str(error), params) or "decay_steps" in str(error), str(error)


@FUZZ
@given(kwargs=st.fixed_dictionaries({"decay_steps": st.integers(1, 100)}, optional={
    "scheduler": st.sampled_from(SCHEDULERS), "warmup_steps": st.integers(0, 50),
    "cutoff_step": st.integers(0, 100), "similarity_threshold": st.one_of(st.none(), st.floats(-1, 1)),
    "threshold_mode": st.sampled_from(THRESHOLD_MODES), "similarity_ema_decay": st.floats(0, 0.999)}),
    calls=st.lists(st.tuples(steps, similarities), min_size=1, max_size=8))
def test_schedule_weight_raises_only_value_error_and_keeps_its_state(kwargs, calls):
    schedule = rf.LambdaSchedule(**kwargs)
    for step, similarity in calls:
        state = schedule.state_dict()
        try:
            off = schedule.is_off(step)
            weight = schedule.weight(step, similarity)
        except ValueError as error:
            assert "step" in str(error) or "similarity" in str(error), str(error)
            assert schedule.state_dict() == state   # a rejected call changes nothing
            continue
        assert isinstance(weight, float) and 0.0 <= weight <= schedule.base
        assert not off or weight == 0.0
        ema = schedule.similarity_ema
        assert ema is None or math.isfinite(ema)


# Ints past int64 (or past float range for float keys) are typos, not settings: the documented error.
@pytest.mark.parametrize("call", [
    lambda: rf.LambdaSchedule(base=10 ** 400),
    lambda: rf.LambdaSchedule().weight(3, 10 ** 400),
    lambda: rf.RepaConfig.from_dict({"crepa_lambda": 10 ** 400}),
    lambda: rf.URepaConfig.from_dict({"urepa_manifold_weight": -(10 ** 400)}),
    lambda: rf.LambdaSchedule(warmup_steps=10 ** 400),
    lambda: rf.LambdaSchedule(scheduler="linear", decay_steps=5).weight(2 ** 63),
], ids=["base", "similarity", "crepa_lambda", "urepa_manifold_weight", "warmup_steps", "step"])
def test_huge_ints_are_a_value_error(call):
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine", "polynomial"])
def test_extreme_valid_values_give_a_finite_weight(scheduler):
    schedule = rf.LambdaSchedule(base=1e308, scheduler=scheduler, warmup_steps=2 ** 62, decay_steps=2 ** 63 - 1)
    for step in (0, 5, 2 ** 62, 2 ** 63 - 1):
        assert math.isfinite(schedule.weight(step))
