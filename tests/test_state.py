"""Checkpoints: the modules round-trip through state_dict and torch.save (a resumed run continues
bitwise as if never stopped, the schedule's similarity EMA and latch included), and the configs and
schedules round-trip through to_dict / from_dict."""
import dataclasses
import io
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import repa_fast as rf
from repa_fast import config as config_module
from repa_fast.schedule import SCHEDULE_PARAMS, ParamSpec

HIDDEN_DIM, ENCODER_DIM = 12, 10
# Every part of the schedule in play: warmup, cosine decay, an EMA that moves fast, a threshold
# the similarity never reaches (so training goes on and the EMA keeps mattering).
SCHEDULE = dict(base=0.5, scheduler="cosine", warmup_steps=2, decay_steps=8, lambda_end=0.05,
                similarity_threshold=0.99, similarity_ema_decay=0.5, threshold_mode="recoverable")
LOSS_MODULES = [pytest.param(rf.RepaLoss, id="RepaLoss"), pytest.param(rf.URepaLoss, id="URepaLoss")]


def _saved(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def _loaded(buffer: io.BytesIO):
    return torch.load(buffer, weights_only=True)   # what a careful trainer uses: plain data only


def _batches(count):
    return [(torch.randn(2, 16, HIDDEN_DIM), torch.randn(2, 9, ENCODER_DIM)) for _ in range(count)]


def _fresh(module_class, seed, **schedule):
    torch.manual_seed(seed)
    module = module_class(HIDDEN_DIM, ENCODER_DIM, schedule=rf.LambdaSchedule(**dict(SCHEDULE, **schedule)))
    return module, torch.optim.Adam(module.parameters(), lr=5e-2)


def train_steps(module, optimizer, batches):
    """One optimizer step per (hidden, target) batch; the module's logs of each step."""
    logs = []
    for hidden, target in batches:
        loss, log = module(hidden, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        logs.append(log)
    return logs


def _assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("module_class", LOSS_MODULES)
def test_resumed_training_equals_the_uninterrupted_run(module_class):
    batches = _batches(6)
    module, optimizer = _fresh(module_class, seed=0)
    uninterrupted_logs = train_steps(module, optimizer, batches)

    first, first_optimizer = _fresh(module_class, seed=0)
    train_steps(first, first_optimizer, batches[:3])
    checkpoint = _saved({"module": first.state_dict(), "optimizer": first_optimizer.state_dict()})
    resumed, resumed_optimizer = _fresh(module_class, seed=1)   # other initial weights: the load must replace them
    state = _loaded(checkpoint)
    resumed.load_state_dict(state["module"])
    resumed_optimizer.load_state_dict(state["optimizer"])
    assert resumed.step_count == 3 and resumed.schedule.similarity_ema == first.schedule.similarity_ema
    resumed_logs = train_steps(resumed, resumed_optimizer, batches[3:])

    assert resumed_logs == uninterrupted_logs[3:]
    assert resumed.step_count == module.step_count == 6
    assert resumed.schedule.similarity_ema == module.schedule.similarity_ema
    _assert_same_state(resumed.state_dict(), module.state_dict())
    # The weight followed the schedule through the warmup and into the decay.
    weights = [log["weight"] for log in uninterrupted_logs]
    assert weights[:3] == [0.0, 0.25, 0.5] and 0.05 < weights[-1] < 0.5


@pytest.mark.parametrize("module_class", LOSS_MODULES)
def test_permanent_latch_survives_a_checkpoint(module_class):
    """Any similarity >= -1 crosses this threshold: the first step latches the loss off for good."""
    latched, optimizer = _fresh(module_class, seed=0, similarity_threshold=-1.0, threshold_mode="permanent")
    batches = _batches(2)
    logs = train_steps(latched, optimizer, batches[:1])
    assert logs[0]["weight"] == 0.0 and latched.schedule.is_cut_off
    resumed, resumed_optimizer = _fresh(module_class, seed=0, similarity_threshold=-1.0, threshold_mode="permanent")
    resumed.load_state_dict(_loaded(_saved(latched.state_dict())))
    assert resumed.schedule.is_cut_off and resumed.step_count == 1
    loss, log = resumed(*batches[1])
    assert log["weight"] == 0.0 and loss.item() == 0.0 and not loss.requires_grad
    # Without the checkpoint the same step would train.
    fresh, _ = _fresh(module_class, seed=0, similarity_threshold=-1.0, threshold_mode="permanent")
    assert not fresh.schedule.is_cut_off


@pytest.mark.parametrize("module_class", LOSS_MODULES)
def test_state_dict_holds_the_projector_and_the_schedule_state(module_class):
    module, optimizer = _fresh(module_class, seed=0)
    train_steps(module, optimizer, _batches(2))
    state = module.state_dict()
    assert set(state) == {"projector.0.weight", "projector.0.bias", "projector.1.weight", "projector.1.bias",
                          "_extra_state"}
    assert state["_extra_state"] == {"step_count": 2, "schedule": module.schedule.state_dict()}
    eval_copy, _ = _fresh(module_class, seed=3)
    eval_copy.load_state_dict(_loaded(_saved(state)))
    eval_copy.eval()
    batch = _batches(1)[0]
    module.eval()
    assert module(*batch)[1] == eval_copy(*batch)[1]
    assert eval_copy.step_count == 2   # evaluation does not advance the schedule


def test_projector_round_trip_and_plain_sequential_checkpoints():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.LayerNorm(HIDDEN_DIM), nn.Linear(HIDDEN_DIM, ENCODER_DIM))
    projector = rf.RepaProjector(HIDDEN_DIM, ENCODER_DIM)
    projector.load_state_dict(_loaded(_saved(plain.state_dict())))   # a trainer's existing checkpoint
    hidden = torch.randn(2, 7, HIDDEN_DIM)
    assert torch.equal(projector(hidden), plain(hidden))
    again = rf.RepaProjector(HIDDEN_DIM, ENCODER_DIM)
    again.load_state_dict(_loaded(_saved(projector.state_dict())))
    assert torch.equal(again(hidden), projector(hidden))
    assert all(p.dtype == torch.float32 for p in again.parameters())


def test_schedule_state_round_trips_through_torch_save():
    schedule = rf.LambdaSchedule(**SCHEDULE)
    for step, similarity in enumerate([0.2, 0.4, -0.1]):
        schedule.weight(step, similarity)
    restored = rf.LambdaSchedule.from_dict(_loaded(_saved(schedule.to_dict())))
    restored.load_state_dict(_loaded(_saved(schedule.state_dict())))
    assert restored.to_dict() == schedule.to_dict() and restored.state_dict() == schedule.state_dict()
    assert [restored.weight(s, 0.3) for s in range(3, 9)] == [schedule.weight(s, 0.3) for s in range(3, 9)]


# ---------------------------------------------------------------- to_dict / from_dict (hypothesis)

def _valid_values(spec: ParamSpec):
    """Every kind of value `spec` accepts, ints for float fields and whole floats for int ones included."""
    if spec.kind is bool:
        values = st.booleans()
    elif spec.kind is str:
        values = st.sampled_from(spec.choices) if spec.choices else st.text(min_size=1, max_size=20)
    elif spec.kind is int:
        low = int(spec.minimum or 0)
        values = st.one_of(st.integers(low, 10 ** 12), st.integers(low, 10 ** 6).map(float))
    else:
        low = -1e6 if spec.minimum is None else spec.minimum
        high = 1e6 if spec.below is None else spec.below
        floats = st.floats(low, high, allow_nan=False, exclude_min=not spec.minimum_inclusive,
                           exclude_max=spec.below is not None)
        values = st.one_of(floats, st.integers(math.ceil(low), math.floor(high) - 1)
                           .filter(lambda v: spec.minimum_inclusive or v > low))
    return st.one_of(st.none(), values) if spec.optional else values


def _config_dicts(cls):
    # The field specs are the configs' own (dataclass field metadata), so new keys are covered too;
    # keys for what repa-fast does not implement accept only their supported values.
    def values(field):
        if config_module._UNSUPPORTED in field.metadata:
            return st.sampled_from(field.metadata[config_module._UNSUPPORTED][0])
        return _valid_values(field.metadata[config_module._SPEC])
    return st.fixed_dictionaries({}, optional={cls.key(f.name): values(f) for f in dataclasses.fields(cls)})


ROUND_TRIP = settings(derandomize=True, database=None, deadline=None, max_examples=150)


@pytest.mark.parametrize("cls", [rf.RepaConfig, rf.URepaConfig])
def test_config_round_trips(cls):
    @ROUND_TRIP
    @given(values=_config_dicts(cls))
    def round_trip(values):
        parsed = cls.from_dict(values)
        assert cls.from_dict(parsed.to_dict()) == parsed
        assert cls.from_dict(json.loads(json.dumps(parsed.to_dict()))) == parsed
        for key, value in values.items():   # each value kept, numbers normalized to the field's type
            stored = parsed.to_dict()[key]
            assert stored == value and (value is None or type(stored) in (bool, int, float, str))
        try:
            schedule = parsed.schedule(max_train_steps=1000)
        except ValueError as error:   # a decaying scheduler needs decay_steps or max_train_steps
            assert parsed.decay_steps == 0 and "decay_steps" in str(error)
        else:
            assert rf.LambdaSchedule.from_dict(schedule.to_dict()).to_dict() == schedule.to_dict()
    round_trip()


@ROUND_TRIP
@given(values=st.fixed_dictionaries({}, optional={name: _valid_values(spec)
                                                  for name, spec in SCHEDULE_PARAMS.items()}))
def test_schedule_round_trips(values):
    try:
        schedule = rf.LambdaSchedule(**values)
    except ValueError as error:
        assert values.get("scheduler") in ("linear", "cosine", "polynomial") and "decay_steps" in str(error)
        return
    params = schedule.to_dict()
    again = rf.LambdaSchedule.from_dict(json.loads(json.dumps(params)))
    assert again.to_dict() == params and repr(again) == repr(schedule)
