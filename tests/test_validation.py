"""Bad input is rejected by the public layer, before any backend runs, with the same
ValueError / TypeError on every backend, naming the argument, what was seen and what was expected."""
import re

import numpy as np
import pytest
import torch

import repa_fast as rf
import repa_fast.functional
from repa_fast.backends import BackendUnavailableError
from parity import projection_inputs

BACKEND_CHOICES = [None, *rf.available_backends("cpu")]
# B=2, S=9 (3 x 3), D=8, N=4 (2 x 2), E=6
B, S, D, N, E = 2, 9, 8, 4, 6


def _inputs(**changes):
    inputs = projection_inputs(B, S, D, N, E)
    inputs.update(changes)
    return inputs


def _pair(**changes):
    return dict({"projected": torch.randn(B, N, E), "target": torch.randn(B, N, E)}, **changes)


def _rejected(fn, kwargs, error, match, monkeypatch):
    """fn(**kwargs) raises `error` matching `match` (a literal text), the same message with every
    backend, and before any backend is even looked up."""
    messages = set()
    for backend in BACKEND_CHOICES:
        with pytest.raises(error, match=re.escape(match)) as info:
            fn(**kwargs, backend=backend)
        messages.add(str(info.value))
    assert len(messages) == 1, messages

    def no_dispatch(*args, **kwargs):
        raise AssertionError("a backend was looked up before the input was validated")
    with monkeypatch.context() as patch:
        patch.setattr(repa_fast.functional, "resolve_backend", no_dispatch)
        with pytest.raises(error, match=re.escape(match)):
            fn(**kwargs)


PROJECTION_FNS = [pytest.param(rf.repa_loss, id="repa_loss"), pytest.param(rf.urepa_loss, id="urepa_loss")]
PAIR_FNS = [pytest.param(rf.cosine_alignment_loss, id="cosine"), pytest.param(rf.manifold_loss, id="manifold")]


# ---------------------------------------------------------------- rank

@pytest.mark.parametrize("fn", PROJECTION_FNS)
@pytest.mark.parametrize("name, shape, match", [
    ("hidden", (S, D), "hidden must be (B, S, D) tokens or a (B, D, H, W) feature map (3 or 4 dims), "
                       "got shape (9, 8) (2 dims)"),
    ("hidden", (B, 1, S, D, 1), "hidden must be (B, S, D) tokens or a (B, D, H, W) feature map (3 or 4 dims), "
                                "got shape (2, 1, 9, 8, 1) (5 dims)"),
    ("target", (B, E, 2, 2), "target must be (B, N, E) tokens (3 dims), got shape (2, 6, 2, 2) (4 dims)"),
    ("target", (N, E), "target must be (B, N, E) tokens (3 dims), got shape (4, 6) (2 dims)"),
    ("ln_weight", (1, D), "ln_weight must be (D,) (1 dims), got shape (1, 8) (2 dims)"),
    ("ln_bias", (), "ln_bias must be (D,) (1 dims), got shape () (0 dims)"),
    ("proj_weight", (E * D,), "proj_weight must be (E, D) (2 dims), got shape (48,) (1 dims)"),
    ("proj_bias", (1, E), "proj_bias must be (E,) (1 dims), got shape (1, 6) (2 dims)"),
])
def test_wrong_rank(fn, name, shape, match, monkeypatch):
    _rejected(fn, _inputs(**{name: torch.randn(shape)}), ValueError, match, monkeypatch)


@pytest.mark.parametrize("fn", PAIR_FNS)
@pytest.mark.parametrize("name", ["projected", "target"])
def test_wrong_rank_of_a_pair(fn, name, monkeypatch):
    _rejected(fn, _pair(**{name: torch.randn(B, N, E, 1)}), ValueError,
              f"{name} must be (B, N, E) tokens (3 dims), got shape (2, 4, 6, 1) (4 dims)", monkeypatch)


def test_wrong_rank_in_align_tokens():
    with pytest.raises(ValueError, match=re.escape("b must be (B, S, D) tokens or a (B, D, H, W) feature map")):
        rf.align_tokens(torch.randn(B, S, D), torch.randn(N, E))


# ---------------------------------------------------------------- sizes that disagree

@pytest.mark.parametrize("fn", PROJECTION_FNS)
@pytest.mark.parametrize("changes, match", [
    ({"target": torch.randn(3, N, E)},
     "batch sizes differ: hidden of shape (2, 9, 8) has batch 2, target of shape (3, 4, 6) has batch 3"),
    ({"hidden": torch.randn(B, S, 7)},
     "ln_weight has shape (8,) but hidden of shape (2, 9, 7) has 7 features; expected (7,)"),
    ({"hidden": torch.randn(B, 7, 3, 3)},
     "ln_weight has shape (8,) but hidden of shape (2, 7, 3, 3) has 7 features; expected (7,)"),
    ({"ln_bias": torch.randn(5)},
     "ln_bias has shape (5,) but hidden of shape (2, 9, 8) has 8 features; expected (8,)"),
    ({"proj_weight": torch.randn(E, 5)},
     "proj_weight has shape (6, 5), 5 in-features, but the LayerNorm (ln_weight) has 8 and hidden of shape "
     "(2, 9, 8) has 8 features; expected (6, 8)"),
    ({"target": torch.randn(B, N, 5)},
     "proj_weight has shape (6, 8), 6 out-features, but target of shape (2, 4, 5) has 5 features; expected (5, 8)"),
    ({"proj_bias": torch.randn(7)},
     "proj_bias has shape (7,) but proj_weight of shape (6, 8) has 6 out-features; expected (6,)"),
], ids=["batch", "hidden-features", "feature-map-features", "ln_bias", "proj-in", "proj-out", "proj_bias"])
def test_sizes_that_disagree(fn, changes, match, monkeypatch):
    _rejected(fn, _inputs(**changes), ValueError, match, monkeypatch)


@pytest.mark.parametrize("fn", PAIR_FNS)
@pytest.mark.parametrize("target_shape", [(3, N, E), (B, 5, E), (B, N, 5)])
def test_pair_shapes_that_disagree(fn, target_shape, monkeypatch):
    _rejected(fn, _pair(target=torch.randn(target_shape)), ValueError,
              f"projected and target must have the same (B, N, E) shape, got projected (2, 4, 6) and target "
              f"{target_shape}", monkeypatch)


def test_batch_disagreement_in_align_tokens():
    with pytest.raises(ValueError, match=re.escape("batch sizes differ: a of shape (2, 9, 8) has batch 2, "
                                                   "b of shape (1, 4, 6) has batch 1")):
        rf.align_tokens(torch.randn(B, S, D), torch.randn(1, N, E))


# ---------------------------------------------------------------- grids

@pytest.mark.parametrize("fn", PROJECTION_FNS)
@pytest.mark.parametrize("changes, match", [
    ({"hidden_grid": (2, 4)}, "hidden_grid=(2, 4) has 8 cells but there are 9 tokens in hidden of shape (2, 9, 8); "
                              "expected h * w == 9"),
    ({"target_grid": (1, 3)}, "target_grid=(1, 3) has 3 cells but there are 4 tokens in target of shape (2, 4, 6)"),
    ({"hidden": torch.randn(B, D, 3, 3), "hidden_grid": (1, 9)},
     "hidden is a feature map of grid (3, 3) (shape (2, 8, 3, 3)) but hidden_grid=(1, 9) was given"),
    ({"hidden_grid": (9,)}, "hidden_grid must be None or a pair of positive ints (h, w), got (9,)"),
    ({"hidden_grid": (0, 9)}, "hidden_grid must be None or a pair of positive ints (h, w), got (0, 9)"),
    ({"target_grid": (2.0, 2)}, "target_grid must be None or a pair of positive ints (h, w), got (2.0, 2)"),
    ({"target_grid": (True, 4)}, "target_grid must be None or a pair of positive ints (h, w), got (True, 4)"),
    ({"target_grid": "22"}, "target_grid must be None or a pair of positive ints (h, w), got '22'"),
    ({"hidden": torch.randn(B, D, 3, 3), "hidden_grid": 9},
     "hidden_grid must be None or a pair of positive ints (h, w), got 9"),
], ids=["hidden-cells", "target-cells", "feature-map-conflict", "one-int", "zero", "float", "bool", "str",
        "feature-map-int"])
def test_bad_grids(fn, changes, match, monkeypatch):
    _rejected(fn, _inputs(**changes), ValueError, match, monkeypatch)


def test_grid_of_numpy_ints_or_a_torch_size_is_accepted():
    inputs = projection_inputs(B, 12, D, 6, E, dtype=torch.float64, param_dtype=torch.float64)
    expected = rf.repa_loss(**inputs, hidden_grid=(3, 4), target_grid=(2, 3))
    assert rf.repa_loss(**inputs, hidden_grid=(np.int64(3), np.int32(4)), target_grid=torch.Size([2, 3])) == expected


# ---------------------------------------------------------------- dtypes and types

@pytest.mark.parametrize("fn", PROJECTION_FNS)
@pytest.mark.parametrize("name, dtype", [("hidden", torch.int64), ("target", torch.bool), ("ln_weight", torch.int32),
                                         ("ln_bias", torch.uint8), ("proj_weight", torch.complex64),
                                         ("proj_bias", torch.int16)])
def test_non_float_dtypes(fn, name, dtype, monkeypatch):
    inputs = _inputs()
    inputs[name] = torch.ones_like(inputs[name], dtype=dtype)
    _rejected(fn, inputs, TypeError, f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), "
                                     f"got {dtype}", monkeypatch)


@pytest.mark.parametrize("fn", PAIR_FNS)
@pytest.mark.parametrize("name", ["projected", "target"])
def test_non_float_pair(fn, name, monkeypatch):
    _rejected(fn, _pair(**{name: torch.ones(B, N, E, dtype=torch.int64)}), TypeError,
              f"{name} must be a floating tensor", monkeypatch)


@pytest.mark.parametrize("fn", PROJECTION_FNS)
@pytest.mark.parametrize("hidden_dtype, name, param_dtype", [
    (torch.float32, "proj_weight", torch.float16),
    (torch.float32, "ln_weight", torch.float64),
    (torch.float16, "ln_bias", torch.bfloat16),
    (torch.float64, "proj_bias", torch.float16),
])
def test_parameters_neither_float32_nor_hidden_dtype(fn, hidden_dtype, name, param_dtype, monkeypatch):
    inputs = _inputs()
    inputs["hidden"] = inputs["hidden"].to(hidden_dtype)
    inputs[name] = inputs[name].to(param_dtype)
    _rejected(fn, inputs, TypeError, f"{name} has dtype {param_dtype} and hidden {hidden_dtype}: projector "
                                     f"parameters must be float32 or hidden's dtype", monkeypatch)


@pytest.mark.parametrize("fn", PROJECTION_FNS)
@pytest.mark.parametrize("name, value, type_name", [("hidden", np.zeros((B, S, D), np.float32), "ndarray"),
                                                    ("target", [[[0.0]]], "list"), ("ln_weight", None, "NoneType")])
def test_not_a_tensor(fn, name, value, type_name, monkeypatch):
    _rejected(fn, _inputs(**{name: value}), TypeError, f"{name} must be a torch.Tensor, got {type_name}", monkeypatch)


@pytest.mark.parametrize("fn", PROJECTION_FNS)
def test_sparse_tensor(fn, monkeypatch):
    inputs = _inputs()
    _rejected(fn, dict(inputs, hidden=inputs["hidden"].to_sparse()), TypeError,
              "hidden must be a dense (strided) tensor, got layout torch.sparse_coo", monkeypatch)


# ---------------------------------------------------------------- devices

OTHER_DEVICES = ["meta", *(["cuda:0"] if torch.cuda.is_available() else [])]   # as str(tensor.device) reads


@pytest.mark.parametrize("device", OTHER_DEVICES)
@pytest.mark.parametrize("fn", PROJECTION_FNS)
@pytest.mark.parametrize("name", ["hidden", "target", "ln_weight", "ln_bias", "proj_weight", "proj_bias"])
def test_tensors_on_different_devices(fn, name, device, monkeypatch):
    inputs = _inputs()
    inputs[name] = inputs[name].to(device)
    others = ", ".join(n for n in inputs if n != name)
    first, second = (f"{name} on {device}", f"{others} on cpu") if name == "hidden" else \
        (f"{others} on cpu", f"{name} on {device}")
    _rejected(fn, inputs, ValueError, f"all tensors must be on one device, got {first} and {second}", monkeypatch)


@pytest.mark.parametrize("device", OTHER_DEVICES)
@pytest.mark.parametrize("fn", PAIR_FNS)
def test_pair_on_different_devices(fn, device, monkeypatch):
    _rejected(fn, _pair(target=torch.randn(B, N, E, device=device)), ValueError,
              f"all tensors must be on one device, got projected on cpu and target on {device}", monkeypatch)


@pytest.mark.parametrize("device", OTHER_DEVICES)
def test_align_tokens_on_different_devices(device):
    with pytest.raises(ValueError, match=re.escape(f"got a on {device} and b on cpu")):
        rf.align_tokens(torch.randn(B, S, D, device=device), torch.randn(B, N, E))


# ---------------------------------------------------------------- empty input

@pytest.mark.parametrize("fn", PROJECTION_FNS)
@pytest.mark.parametrize("sizes, name, shape", [
    ((0, S, D, N, E), "hidden", (0, 9, 8)),     # empty batch
    ((B, 0, D, N, E), "hidden", (2, 0, 8)),     # no tokens
    ((B, S, D, 0, E), "target", (2, 0, 6)),
    ((B, S, 0, N, E), "hidden", (2, 9, 0)),     # no features
    ((B, S, D, N, 0), "target", (2, 4, 0)),
])
def test_empty_input(fn, sizes, name, shape, monkeypatch):
    _rejected(fn, projection_inputs(*sizes), ValueError,
              f"{name} is empty, shape {shape}: batch, token and feature sizes must all be >= 1", monkeypatch)


@pytest.mark.parametrize("fn", PROJECTION_FNS)
def test_empty_feature_map(fn, monkeypatch):
    _rejected(fn, _inputs(hidden=torch.randn(B, D, 0, 3)), ValueError, "hidden is empty, shape (2, 8, 0, 3)",
              monkeypatch)


@pytest.mark.parametrize("fn", PAIR_FNS)
@pytest.mark.parametrize("shape", [(0, N, E), (B, 0, E), (B, N, 0)])
def test_empty_pair(fn, shape, monkeypatch):
    _rejected(fn, _pair(projected=torch.randn(shape), target=torch.randn(shape)), ValueError,
              f"projected is empty, shape {shape}", monkeypatch)


def test_empty_align_tokens():
    with pytest.raises(ValueError, match=re.escape("a is empty, shape (2, 0, 8)")):
        rf.align_tokens(torch.randn(B, 0, D), torch.randn(B, N, E))


# ---------------------------------------------------------------- scalar arguments and backends

@pytest.mark.parametrize("fn", PROJECTION_FNS)
@pytest.mark.parametrize("ln_eps", [0.0, -1e-5, float("nan"), float("inf"), "1e-5", True, None])
def test_bad_ln_eps(fn, ln_eps, monkeypatch):
    _rejected(fn, _inputs(ln_eps=ln_eps), ValueError, f"ln_eps must be a finite number > 0, got {ln_eps!r}",
              monkeypatch)


@pytest.mark.parametrize("value", ["false", 0, None])
def test_spatial_align_must_be_a_bool(value, monkeypatch):
    _rejected(rf.repa_loss, _inputs(spatial_align=value), TypeError,
              f"spatial_align must be a bool, got {value!r}", monkeypatch)
    with pytest.raises(TypeError, match="spatial_align must be a bool"):
        rf.align_tokens(torch.randn(B, S, D), torch.randn(B, N, E), spatial_align=value)
    with pytest.raises(TypeError, match="spatial_align must be a bool"):
        rf.RepaLoss(D, E, spatial_align=value)


UNKNOWN_BACKENDS = ["tritonn", "Torch", "", 3]


@pytest.mark.parametrize("backend", UNKNOWN_BACKENDS)
def test_unknown_backend(backend):
    match = re.escape(f"backend must be one of torch, triton, cuda, 'auto' or None, got {backend!r}")
    for call in (lambda: rf.repa_loss(**_inputs(), backend=backend),
                 lambda: rf.urepa_loss(**_inputs(), backend=backend),
                 lambda: rf.cosine_alignment_loss(**_pair(), backend=backend),
                 lambda: rf.manifold_loss(**_pair(), backend=backend),
                 lambda: rf.RepaLoss(D, E, backend=backend),        # at construction, not at the first step
                 lambda: rf.URepaLoss(D, E, backend=backend)):
        with pytest.raises(ValueError, match=match):
            call()


def test_unknown_backend_from_the_environment(monkeypatch):
    monkeypatch.setenv("REPA_FAST_BACKEND", "tritonn")
    with pytest.raises(ValueError, match="got 'tritonn'"):
        rf.repa_loss(**_inputs())


def test_backend_that_cannot_run_here_says_what_is_missing():
    if "cuda" in rf.available_backends("cpu"):
        pytest.skip("the cuda backend runs here")
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot run: "):
        rf.repa_loss(**_inputs(), backend="cuda")


# ---------------------------------------------------------------- modules

def test_projector_construction():
    for hidden_dim, encoder_dim in ((0, E), (D, -1), (True, E), (D, 6.0), ("8", E)):
        with pytest.raises(ValueError, match="must be a positive int"):
            rf.RepaProjector(hidden_dim, encoder_dim)
    with pytest.raises(ValueError, match="ln_eps must be a finite number > 0, got 0"):
        rf.RepaProjector(D, E, ln_eps=0)


@pytest.mark.parametrize("hidden, match", [
    (torch.randn(B, S, 7), "ln_weight has shape (8,) but hidden of shape (2, 9, 7) has 7 features"),
    (torch.randn(B, 7, 3, 3), "ln_weight has shape (8,) but hidden of shape (2, 7, 3, 3) has 7 features"),
    (torch.randn(S, D), "hidden must be (B, S, D) tokens or a (B, D, H, W) feature map"),
    (torch.ones(B, S, D, dtype=torch.int32), "hidden must be a floating tensor"),
    (torch.randn(B, S, D, device="meta"), "all tensors must be on one device, got hidden on meta and projector on cpu"),
], ids=["features", "feature-map-features", "rank", "dtype", "device"])
def test_projector_forward_rejects(hidden, match):
    with pytest.raises((ValueError, TypeError), match=re.escape(match)):
        rf.RepaProjector(D, E)(hidden)


LOSS_MODULES = [pytest.param(rf.RepaLoss, id="RepaLoss"), pytest.param(rf.URepaLoss, id="URepaLoss")]


@pytest.mark.parametrize("module_class", LOSS_MODULES)
@pytest.mark.parametrize("changes, kwargs, error, match", [
    ({"hidden": torch.randn(B, S, 7)}, {}, ValueError, "ln_weight has shape (8,) but hidden of shape (2, 9, 7)"),
    ({"target": torch.randn(B, N, 5)}, {}, ValueError, "6 out-features, but target of shape (2, 4, 5) has 5 features"),
    ({"target": torch.randn(3, N, E)}, {}, ValueError, "batch sizes differ"),
    ({"target": torch.randn(B, N, E, device="meta")}, {}, ValueError, "target on meta"),
    ({}, {"hidden_grid": (2, 2)}, ValueError, "hidden_grid=(2, 2) has 4 cells but there are 9 tokens"),
    ({}, {"step": -1}, ValueError, "step must be an integer >= 0, got -1"),
    ({}, {"step": 1.5}, ValueError, "step must be an integer >= 0, got 1.5"),
    ({}, {"step": "3"}, ValueError, "step must be an integer >= 0, got '3'"),
], ids=["hidden-features", "target-features", "batch", "device", "grid", "step-negative", "step-float", "step-str"])
def test_loss_module_forward_rejects(module_class, changes, kwargs, error, match):
    module = module_class(D, E)
    inputs = {"hidden": torch.randn(B, S, D), "target": torch.randn(B, N, E), **changes}
    with pytest.raises(error, match=re.escape(match)):
        module(**inputs, **kwargs)
    assert module.step_count == 0   # a rejected call does not advance the schedule


def test_loss_module_construction():
    with pytest.raises(TypeError, match="schedule must be a LambdaSchedule, a number"):
        rf.RepaLoss(D, E, schedule="cosine")
    for manifold_weight in (-1.0, float("nan"), "3", True):
        with pytest.raises(ValueError, match="manifold_weight must be a number >= 0"):
            rf.URepaLoss(D, E, manifold_weight=manifold_weight)
    with pytest.raises(ValueError, match="base must be a finite number >= 0"):
        rf.RepaLoss(D, E, schedule=-0.5)
