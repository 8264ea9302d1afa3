"""LambdaSchedule: SimpleTuner's CrepaScheduler semantics (DESIGN.md §1 "Weight schedule")."""
import math

import pytest

from repa_fast.schedule import LambdaSchedule


# --- scheduled weight, hand-computed ---------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 0.0), (50, 0.25), (99, 0.495), (100, 0.5), (10_000, 0.5)],
)
def test_constant_with_warmup(step: int, expected: float) -> None:
    schedule = LambdaSchedule(base=0.5, warmup_steps=100)
    assert schedule.weight(step) == pytest.approx(expected)


def test_constant_without_warmup_is_base_from_step_zero() -> None:
    schedule = LambdaSchedule(base=0.7)
    assert [schedule.weight(step) for step in (0, 1, 1_000_000)] == [0.7, 0.7, 0.7]


@pytest.mark.parametrize(
    ("step", "expected"),
    # warmup to 1.0 over 100 steps, then 1.0 -> 0.2 between steps 100 and 500
    [(0, 0.0), (50, 0.5), (100, 1.0), (300, 0.6), (400, 0.4), (500, 0.2), (900, 0.2)],
)
def test_linear_with_warmup_and_decay(step: int, expected: float) -> None:
    schedule = LambdaSchedule(base=1.0, scheduler="linear", warmup_steps=100, decay_steps=500, lambda_end=0.2)
    assert schedule.weight(step) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("step", "expected"),
    # the seed's example: warmup 100, decay until step 5000, 0.5 -> 0.0
    [
        (50, 0.25),
        (100, 0.5),
        (1325, 0.5 * (1 + math.sqrt(0.5)) / 2),  # p = 0.25
        (2550, 0.25),  # p = 0.5
        (3775, 0.5 * (1 - math.sqrt(0.5)) / 2),  # p = 0.75
        (5000, 0.0),
        (8000, 0.0),
    ],
)
def test_cosine_with_warmup_and_decay(step: int, expected: float) -> None:
    schedule = LambdaSchedule(base=0.5, scheduler="cosine", warmup_steps=100, decay_steps=5000, lambda_end=0.0)
    assert schedule.weight(step) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("step", "expected"),
    # (1.0 - 0.1) * (1 - p)**2 + 0.1 with p = (step - 20) / 80
    [(10, 0.5), (20, 1.0), (40, 0.60625), (60, 0.325), (100, 0.1), (150, 0.1)],
)
def test_polynomial_with_warmup_and_decay(step: int, expected: float) -> None:
    schedule = LambdaSchedule(
        base=1.0, scheduler="polynomial", warmup_steps=20, decay_steps=100, lambda_end=0.1, power=2.0
    )
    assert schedule.weight(step) == pytest.approx(expected)


def test_decay_can_rise_towards_a_larger_end() -> None:
    schedule = LambdaSchedule(base=0.2, scheduler="linear", decay_steps=10, lambda_end=1.0)
    assert schedule.weight(5) == pytest.approx(0.6)


def test_decay_ending_at_warmup_jumps_to_end_after_warmup() -> None:
    # decay_steps <= warmup_steps: the denominator is clamped to 1, so the decay takes one step.
    schedule = LambdaSchedule(base=1.0, scheduler="linear", warmup_steps=10, decay_steps=10, lambda_end=0.0)
    assert schedule.weight(5) == pytest.approx(0.5)
    assert schedule.weight(10) == pytest.approx(1.0)
    assert schedule.weight(11) == pytest.approx(0.0)


@pytest.mark.parametrize("scheduler", ["linear", "cosine", "polynomial"])
def test_decay_steps_zero_means_max_train_steps(scheduler: str) -> None:
    from_max = LambdaSchedule(base=1.0, scheduler=scheduler, warmup_steps=10, max_train_steps=210)
    explicit = LambdaSchedule(base=1.0, scheduler=scheduler, warmup_steps=10, decay_steps=210)
    for step in (0, 10, 60, 110, 209, 210, 500):
        assert from_max.weight(step) == pytest.approx(explicit.weight(step))
    assert from_max.weight(110) == pytest.approx(0.5)
    assert from_max.weight(210) == pytest.approx(0.0)


def test_decay_steps_given_wins_over_max_train_steps() -> None:
    schedule = LambdaSchedule(base=1.0, scheduler="linear", decay_steps=100, max_train_steps=1000)
    assert schedule.weight(50) == pytest.approx(0.5)


@pytest.mark.parametrize("scheduler", ["linear", "cosine", "polynomial"])
@pytest.mark.parametrize("max_train_steps", [None, 0])
def test_decaying_scheduler_needs_decay_steps_or_max_train_steps(scheduler: str, max_train_steps: int | None) -> None:
    with pytest.raises(ValueError, match="decay_steps.*max_train_steps"):
        LambdaSchedule(scheduler=scheduler, max_train_steps=max_train_steps)


def test_constant_needs_neither_decay_steps_nor_max_train_steps() -> None:
    assert LambdaSchedule(scheduler="constant").weight(123) == 0.5


def test_a_zero_given_stays_zero() -> None:
    schedule = LambdaSchedule(base=0.8, scheduler="linear", decay_steps=100, lambda_end=0.0, cutoff_step=0)
    assert schedule.weight(100) == 0.0  # lambda_end 0 is the end value, not "use a default"
    assert schedule.weight(50) == pytest.approx(0.4)  # cutoff_step 0 is no cutoff, not cutoff at 0
    assert not schedule.is_off(10**9)
    assert LambdaSchedule(base=0.0).weight(7) == 0.0


def test_weight_returns_float() -> None:
    assert type(LambdaSchedule(base=1).weight(3)) is float


# --- cutoffs ---------------------------------------------------------------------------------


def test_step_cutoff() -> None:
    schedule = LambdaSchedule(base=0.5, warmup_steps=100, cutoff_step=5000)
    assert schedule.weight(4999) == 0.5
    assert schedule.weight(5000) == 0.0
    assert schedule.weight(6000) == 0.0
    assert schedule.is_cut_off


def test_step_cutoff_applies_during_warmup() -> None:
    schedule = LambdaSchedule(base=0.5, warmup_steps=100, cutoff_step=50)
    assert schedule.weight(49) == pytest.approx(0.245)
    assert schedule.weight(50) == 0.0


def test_permanent_threshold_latches_and_stays_off_when_similarity_drops() -> None:
    schedule = LambdaSchedule(base=0.5, similarity_threshold=0.8, similarity_ema_decay=0.5)
    assert schedule.weight(0, similarity=0.7) == 0.5
    assert not schedule.is_cut_off
    assert schedule.weight(1, similarity=0.95) == 0.0  # EMA 0.825 >= 0.8
    assert schedule.is_cut_off
    assert schedule.weight(2, similarity=-1.0) == 0.0  # EMA -0.0875, still off for good
    assert schedule.similarity_ema == pytest.approx(-0.0875)
    assert schedule.weight(3) == 0.0
    assert schedule.is_cut_off


def test_recoverable_threshold_comes_back_when_similarity_drops() -> None:
    schedule = LambdaSchedule(
        base=0.5, similarity_threshold=0.8, similarity_ema_decay=0.5, threshold_mode="recoverable"
    )
    assert schedule.weight(0, similarity=0.9) == 0.0
    assert schedule.is_cut_off
    assert schedule.weight(1, similarity=0.8) == 0.0  # EMA 0.85
    assert schedule.weight(2, similarity=0.1) == 0.5  # EMA 0.475 < 0.8
    assert not schedule.is_cut_off
    assert schedule.weight(3, similarity=1.0) == 0.5  # EMA 0.7375
    assert schedule.weight(4, similarity=1.0) == 0.0  # EMA 0.86875: off again
    assert schedule.similarity_ema == pytest.approx(0.86875)


def test_threshold_is_inclusive() -> None:
    schedule = LambdaSchedule(similarity_threshold=0.5)
    assert schedule.weight(0, similarity=0.5) == 0.0


def test_threshold_without_any_similarity_yet_does_not_cut_off() -> None:
    schedule = LambdaSchedule(base=0.5, similarity_threshold=-1.0)
    assert schedule.weight(0) == 0.5
    assert schedule.similarity_ema is None


def test_recoverable_mode_does_not_undo_the_step_cutoff() -> None:
    schedule = LambdaSchedule(cutoff_step=10, threshold_mode="recoverable")
    assert schedule.weight(10, similarity=-1.0) == 0.0
    assert schedule.weight(11) == 0.0
    assert schedule.is_off(11)


# --- EMA ---------------------------------------------------------------------------------------


def test_ema_first_value_is_the_similarity_then_decays() -> None:
    schedule = LambdaSchedule(similarity_ema_decay=0.99)
    assert schedule.similarity_ema is None
    schedule.weight(0, similarity=0.9)
    assert schedule.similarity_ema == 0.9
    schedule.weight(1, similarity=0.5)
    assert schedule.similarity_ema == pytest.approx(0.99 * 0.9 + 0.01 * 0.5)


def test_ema_is_updated_before_the_cutoff_test() -> None:
    # Updated after the test, the first call would still return the base weight.
    schedule = LambdaSchedule(base=0.5, similarity_threshold=0.8)
    assert schedule.weight(0, similarity=0.9) == 0.0


def test_ema_updates_even_when_permanently_cut_off() -> None:
    schedule = LambdaSchedule(cutoff_step=1, similarity_ema_decay=0.5)
    schedule.weight(5, similarity=0.2)
    schedule.weight(6, similarity=0.6)
    assert schedule.similarity_ema == pytest.approx(0.4)


def test_weight_without_similarity_leaves_ema_alone() -> None:
    schedule = LambdaSchedule()
    schedule.weight(0, similarity=0.3)
    schedule.weight(1)
    assert schedule.similarity_ema == 0.3


def test_ema_decay_zero_tracks_the_last_similarity() -> None:
    schedule = LambdaSchedule(similarity_ema_decay=0.0)
    schedule.weight(0, similarity=0.1)
    schedule.weight(1, similarity=0.7)
    assert schedule.similarity_ema == 0.7


def test_integer_similarity_is_accepted() -> None:
    schedule = LambdaSchedule(similarity_threshold=0.9)
    assert schedule.weight(0, similarity=1) == 0.0
    assert schedule.similarity_ema == 1.0


# --- is_off ------------------------------------------------------------------------------------


def test_is_off_after_step_cutoff() -> None:
    schedule = LambdaSchedule(cutoff_step=100)
    assert not schedule.is_off(99)
    assert schedule.is_off(100)
    assert schedule.is_off(101)


def test_is_off_when_permanently_latched() -> None:
    schedule = LambdaSchedule(similarity_threshold=0.5)
    assert not schedule.is_off(0)
    schedule.weight(0, similarity=0.6)
    assert schedule.is_off(1)


def test_is_off_false_when_latched_but_recoverable() -> None:
    schedule = LambdaSchedule(similarity_threshold=0.5, threshold_mode="recoverable")
    schedule.weight(0, similarity=0.6)
    assert schedule.is_cut_off
    assert not schedule.is_off(1)  # a low similarity at step 1 may bring it back


def test_is_off_false_during_warmup_at_step_zero() -> None:
    # The weight is 0 at step 0 of a warmup, but the similarity must still feed the EMA.
    schedule = LambdaSchedule(warmup_steps=10)
    assert schedule.weight(0) == 0.0
    assert not schedule.is_off(0)


def test_is_off_does_not_change_state() -> None:
    schedule = LambdaSchedule(cutoff_step=5)
    assert schedule.is_off(5)
    assert schedule.state_dict() == {"similarity_ema": None, "cut_off": False}


# --- state ---------------------------------------------------------------------------------------


def _run(schedule: LambdaSchedule, steps: range) -> list[float]:
    return [schedule.weight(step, similarity=0.3 + 0.01 * step) for step in steps]


@pytest.mark.parametrize("threshold_mode", ["permanent", "recoverable"])
def test_state_dict_round_trip_mid_run(threshold_mode: str) -> None:
    params = dict(
        base=0.5,
        scheduler="cosine",
        warmup_steps=5,
        decay_steps=80,
        similarity_threshold=0.6,
        similarity_ema_decay=0.9,
        threshold_mode=threshold_mode,
    )
    uninterrupted = LambdaSchedule(**params)
    expected = _run(uninterrupted, range(60))

    first_half = LambdaSchedule(**params)
    _run(first_half, range(30))
    saved = first_half.state_dict()
    resumed = LambdaSchedule.from_dict(first_half.to_dict())
    resumed.load_state_dict(saved)
    assert resumed.similarity_ema == first_half.similarity_ema
    assert _run(resumed, range(30, 60)) == expected[30:]
    assert resumed.state_dict() == uninterrupted.state_dict()
    assert expected[59] == 0.0  # the run did cross the threshold


def test_permanent_latch_survives_a_checkpoint() -> None:
    schedule = LambdaSchedule(similarity_threshold=0.5)
    schedule.weight(0, similarity=0.9)
    resumed = LambdaSchedule(similarity_threshold=0.5)
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.is_cut_off
    assert resumed.weight(1, similarity=-1.0) == 0.0


def test_state_dict_holds_only_state_and_is_a_copy() -> None:
    schedule = LambdaSchedule(base=0.9, similarity_threshold=0.5)
    schedule.weight(0, similarity=0.2)
    state = schedule.state_dict()
    assert state == {"similarity_ema": 0.2, "cut_off": False}
    state["cut_off"] = True
    assert not schedule.is_cut_off


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"similarity_ema": 0.5}, "cut_off"),
        ({"similarity_ema": 0.5, "cut_off": False, "base": 1.0}, "keys"),
        ({"similarity_ema": float("nan"), "cut_off": False}, "similarity_ema"),
        ({"similarity_ema": "0.5", "cut_off": False}, "similarity_ema"),
        ({"similarity_ema": None, "cut_off": 1}, "cut_off"),
        ([("similarity_ema", None), ("cut_off", False)], "mapping"),
    ],
)
def test_load_state_dict_rejects_bad_state(state: object, match: str) -> None:
    schedule = LambdaSchedule()
    with pytest.raises(ValueError, match=match):
        schedule.load_state_dict(state)  # type: ignore[arg-type]
    assert schedule.state_dict() == {"similarity_ema": None, "cut_off": False}


# --- hyper-parameters ----------------------------------------------------------------------------


def test_to_dict_from_dict_and_repr() -> None:
    schedule = LambdaSchedule(
        base=0.25,
        scheduler="polynomial",
        warmup_steps=3,
        decay_steps=40,
        lambda_end=0.05,
        power=1.5,
        cutoff_step=35,
        similarity_threshold=0.7,
        similarity_ema_decay=0.95,
        threshold_mode="recoverable",
        max_train_steps=100,
    )
    params = schedule.to_dict()
    assert params == {
        "base": 0.25,
        "scheduler": "polynomial",
        "warmup_steps": 3,
        "decay_steps": 40,
        "lambda_end": 0.05,
        "power": 1.5,
        "cutoff_step": 35,
        "similarity_threshold": 0.7,
        "similarity_ema_decay": 0.95,
        "threshold_mode": "recoverable",
        "max_train_steps": 100,
    }
    assert LambdaSchedule.from_dict(params).to_dict() == params
    assert "scheduler='polynomial'" in repr(schedule)
    assert eval(repr(schedule), {"LambdaSchedule": LambdaSchedule}).to_dict() == params


def test_defaults() -> None:
    assert LambdaSchedule().to_dict() == {
        "base": 0.5,
        "scheduler": "constant",
        "warmup_steps": 0,
        "decay_steps": 0,
        "lambda_end": 0.0,
        "power": 1.0,
        "cutoff_step": 0,
        "similarity_threshold": None,
        "similarity_ema_decay": 0.99,
        "threshold_mode": "permanent",
        "max_train_steps": None,
    }


def test_numbers_are_normalized() -> None:
    schedule = LambdaSchedule(base=1, warmup_steps=100.0, power=2)
    assert type(schedule.base) is float and schedule.base == 1.0
    assert type(schedule.warmup_steps) is int and schedule.warmup_steps == 100
    assert type(schedule.power) is float


def test_from_dict_rejects_unknown_argument() -> None:
    with pytest.raises(ValueError, match="lambda"):
        LambdaSchedule.from_dict({"lambda": 0.5})
    with pytest.raises(ValueError, match="mapping"):
        LambdaSchedule.from_dict([("base", 0.5)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("argument", "value", "allowed"),
    [
        ("scheduler", "cosin", "'constant', 'linear', 'cosine', 'polynomial'"),
        ("scheduler", 3, "'constant'"),
        ("threshold_mode", "sticky", "'permanent', 'recoverable'"),
        ("base", -0.1, ">= 0"),
        ("base", float("nan"), "finite"),
        ("base", True, "finite number"),
        ("base", "0.5", "finite number"),
        ("lambda_end", float("inf"), "finite"),
        ("lambda_end", -1.0, ">= 0"),
        ("power", 0.0, "> 0"),
        ("power", -2, "> 0"),
        ("warmup_steps", -1, ">= 0"),
        ("warmup_steps", 1.5, "integer"),
        ("warmup_steps", True, "integer"),
        ("warmup_steps", float("inf"), "integer"),
        ("decay_steps", -10, ">= 0"),
        ("cutoff_step", -1, ">= 0"),
        ("cutoff_step", "5000", "integer"),
        ("max_train_steps", -1, ">= 0"),
        ("max_train_steps", 2.5, "integer"),
        ("similarity_threshold", float("nan"), "finite"),
        ("similarity_threshold", False, "or None"),
        ("similarity_ema_decay", 1.0, "< 1"),
        ("similarity_ema_decay", -0.01, ">= 0"),
        ("similarity_ema_decay", None, "finite number"),
    ],
)
def test_constructor_rejects_bad_argument(argument: str, value: object, allowed: str) -> None:
    with pytest.raises(ValueError) as error:
        LambdaSchedule(**{argument: value})
    message = str(error.value)
    assert message.startswith(f"{argument} must be")
    assert repr(value) in message
    assert allowed in message


@pytest.mark.parametrize("step", [-1, 1.5, "3", True, None])
def test_weight_and_is_off_reject_bad_step(step: object) -> None:
    schedule = LambdaSchedule()
    with pytest.raises(ValueError, match=r"^step must be an integer >= 0"):
        schedule.weight(step)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^step must be an integer >= 0"):
        schedule.is_off(step)  # type: ignore[arg-type]


@pytest.mark.parametrize("similarity", [float("nan"), float("inf"), "0.5", True])
def test_weight_rejects_bad_similarity_without_touching_the_ema(similarity: object) -> None:
    schedule = LambdaSchedule()
    schedule.weight(0, similarity=0.4)
    with pytest.raises(ValueError, match=r"^similarity must be a finite number"):
        schedule.weight(1, similarity=similarity)  # type: ignore[arg-type]
    assert schedule.similarity_ema == 0.4
