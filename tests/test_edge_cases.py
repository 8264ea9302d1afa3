"""Awkward but valid input on every backend against the float64 reference (DESIGN.md §4):
strided and expanded tensors, one token, zero-norm rows, mixed dtypes, very large N; and
non-finite input, which gives a NaN loss exactly where the reference does (never masked), or an
error naming the tensor with REPA_FAST_CHECK_FINITE=1."""
import math
import re

import pytest
import torch

import repa_fast as rf
from repa_fast import reference
from parity import (PROJECTION_ARGS, TOLERANCE, LargestAllocation, assert_matches_reference, cast,
                    interpolate_tokens, literal_projection, outputs_and_grads, projection_inputs, rel_err)

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
CASES = [pytest.param(backend, device, id=f"{backend}-{device}")
         for device in DEVICES for backend in rf.available_backends(device)]


def half_dtypes(backend, device):
    """The Triton interpreter has no bfloat16; everything else runs both."""
    if device == "cpu" and backend != "torch":
        return [torch.float16]
    return [torch.float16, torch.bfloat16]


def random_pair(*shape, device):
    """Projected and target tokens of one shape, standard normal."""
    return {"projected": torch.randn(*shape, device=device), "target": torch.randn(*shape, device=device)}


def correlated_target(inputs, hidden_grid, target_grid, noise=0.7):
    """A target near the aligned projection, as a trained projector sees: the loss is far from 0,
    so a relative error measures the kernels and not the cancellation of random cosines."""
    with torch.no_grad():
        params = [inputs[name].double() for name in PROJECTION_ARGS]
        z = literal_projection(*params)
        if hidden_grid != target_grid:
            z = interpolate_tokens(z, hidden_grid, target_grid)
        target = z + noise * torch.randn_like(z)
    return dict(inputs, target=target.to(inputs["target"].dtype))


# ---------------------------------------------------------------- strided, expanded, offset views

def _views_repa(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias, loss=rf.repa_loss, **kwargs):
    """The arguments as views that are not contiguous: hidden (B, D, S) read as (B, S, D) tokens,
    target expanded over the batch, every other LayerNorm weight, the weight as a transpose, the
    bias at a storage offset."""
    return loss(hidden.transpose(1, 2), target.expand(3, -1, -1), ln_weight[::2], ln_bias, proj_weight.t(),
              proj_bias[1:], **kwargs)


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("fn", [rf.repa_loss, rf.urepa_loss], ids=["repa", "urepa"])
@pytest.mark.parametrize("hidden_tokens, target_tokens", [(25, 9), (9, 16), (12, 12)])
def test_strided_and_expanded_inputs(backend, device, fn, hidden_tokens, target_tokens):
    D, E = 10, 7
    base = {
        "hidden": torch.randn(3, D, hidden_tokens, device=device),
        "target": torch.randn(1, target_tokens, E, device=device),
        "ln_weight": 1.0 + 0.2 * torch.randn(2 * D, device=device),
        "ln_bias": 0.1 * torch.randn(D, device=device),
        "proj_weight": torch.randn(D, E, device=device) / math.sqrt(D),
        "proj_bias": 0.1 * torch.randn(E + 1, device=device),
    }
    hidden, target, ln_weight, _, proj_weight, proj_bias = _views_repa(**base, loss=lambda *args: args)
    assert not any(v.is_contiguous() for v in (hidden, target, ln_weight, proj_weight))
    assert target.stride(0) == 0 and proj_bias.storage_offset() == 1
    assert_matches_reference(_views_repa, base, backend=backend, loss=fn)


@pytest.mark.parametrize("backend, device", CASES)
def test_feature_maps_in_every_memory_format(backend, device):
    inputs = correlated_target(projection_inputs(2, (5, 6), 9, 16, 11, device=device, feature_map=True), (5, 6), (4, 4))
    for hidden in (inputs["hidden"], inputs["hidden"].to(memory_format=torch.channels_last),
                   inputs["hidden"].permute(0, 1, 3, 2)):   # (B, D, W, H): a 6 x 5 grid, column-major in memory
        assert_matches_reference(rf.urepa_loss, dict(inputs, hidden=hidden), backend=backend)


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("fn", [rf.cosine_alignment_loss, rf.manifold_loss], ids=["cosine", "manifold"])
def test_strided_and_expanded_pairs(backend, device, fn):
    def strided(projected, target, **kwargs):
        return fn(projected.transpose(1, 2), target.expand(4, -1, -1)[:, :, 1:], **kwargs)
    base = {"projected": torch.randn(4, 13, 10, device=device), "target": torch.randn(1, 10, 14, device=device)}
    assert_matches_reference(strided, base, backend=backend, grad_names=("projected",))


# ---------------------------------------------------------------- one token

@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("hidden_tokens, target_tokens", [(1, 1), (1, 4), (9, 1), (5, 1)])
def test_one_token(backend, device, hidden_tokens, target_tokens):
    inputs = projection_inputs(3, hidden_tokens, 6, target_tokens, 5, device=device)
    assert_matches_reference(rf.repa_loss, inputs, backend=backend)
    # One aligned token: the manifold loss is exactly 0 (a single cosine, of a row with itself),
    # which no relative error can measure; it must come out as ~0 with ~0 gradients.
    alignment_only = lambda **kwargs: rf.urepa_loss(**kwargs)[0]
    assert_matches_reference(alignment_only, inputs, backend=backend)
    result = outputs_and_grads(lambda **kwargs: rf.urepa_loss(**kwargs)[1], inputs, PROJECTION_ARGS, backend=backend)
    for key, value in result.items():
        assert torch.isfinite(value).all() and value.abs().max() < 1e-5, key


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("fn", [rf.cosine_alignment_loss, rf.manifold_loss], ids=["cosine", "manifold"])
def test_one_feature_pair(backend, device, fn):
    """E = 1: every normalized row is +-1."""
    inputs = random_pair(2, 7, 1, device=device)
    loss = fn(**inputs, backend=backend)
    expected = fn(**cast(inputs, torch.float64), backend="torch")
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("hidden_dim", [1, 2])
def test_layer_norm_over_one_or_two_features(backend, device, hidden_dim):
    """Over D <= 2 features the LayerNorm output is locally constant (beta, or gamma * (+-1, -+1) +
    beta), and with D = 1 every token projects to the same row: the gradients w.r.t. hidden (and
    the manifold loss's) are exactly 0, leaving only rounding noise to compare; they must be finite.
    The rest is compared as usual."""
    inputs = projection_inputs(2, 9, hidden_dim, 4, 5, device=device)
    compared = ("ln_bias", "proj_weight", "proj_bias")
    assert_matches_reference(rf.repa_loss, inputs, backend=backend, grad_names=compared)
    alignment_only = lambda **kwargs: rf.urepa_loss(**kwargs)[0]
    assert_matches_reference(alignment_only, inputs, backend=backend, grad_names=compared)
    manifold = rf.urepa_loss(**inputs, backend=backend)[1]
    reference_manifold = rf.urepa_loss(**cast(inputs, torch.float64), backend="torch")[1]
    assert rel_err(manifold, reference_manifold) < 1e-5
    result = outputs_and_grads(rf.urepa_loss, inputs, PROJECTION_ARGS, backend=backend)
    assert all(torch.isfinite(value).all() for value in result.values())


@pytest.mark.parametrize("backend, device", CASES)
def test_no_gradient_needed(backend, device):
    """Evaluation, logging, a loss past its cutoff: no input requires grad, or grad mode is off."""
    inputs = projection_inputs(2, 9, 6, 4, 5, device=device)
    pair = random_pair(2, 4, 5, device=device)
    calls = {"repa": lambda: rf.repa_loss(**inputs, backend=backend),
             "urepa": lambda: torch.stack(rf.urepa_loss(**inputs, backend=backend)),
             "cosine": lambda: rf.cosine_alignment_loss(**pair, backend=backend),
             "manifold": lambda: rf.manifold_loss(**pair, backend=backend)}
    for name, call in calls.items():
        expected = call()
        with torch.no_grad():
            assert torch.equal(call(), expected), name
        with torch.inference_mode():
            assert torch.equal(call(), expected), name
        assert not expected.requires_grad, name


# ---------------------------------------------------------------- zero-norm rows

def _zero_rows(x, rows):
    x = x.clone()
    x[:, rows] = 0
    return x


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("fn", [rf.repa_loss, rf.urepa_loss], ids=["repa", "urepa"])
def test_zero_norm_rows_of_the_projection_and_the_target(backend, device, fn):
    """A zero hidden row with zero biases projects to a zero row: with F.normalize semantics its
    cosine is 0 and its gradient finite (large: 1 / eps)."""
    inputs = projection_inputs(2, 12, 8, 12, 6, device=device)
    inputs.update(hidden=_zero_rows(inputs["hidden"], [0, 5]), target=_zero_rows(inputs["target"], [5, 7]),
                  ln_bias=torch.zeros_like(inputs["ln_bias"]), proj_bias=torch.zeros_like(inputs["proj_bias"]))
    errors = assert_matches_reference(fn, inputs, backend=backend)
    assert all(math.isfinite(err) for err in errors.values())


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("fn", [rf.repa_loss, rf.urepa_loss], ids=["repa", "urepa"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("target_tokens", [16, 9, 25], ids=["same-count", "hidden-resampled", "target-resampled"])
def test_a_zero_token_keeps_the_other_rows_16_bit_gradients(backend, device, fn, dtype, target_tokens):
    """Issue 11: an exactly-zero hidden token with zero biases (padding, a bias-free projector)
    has |dL/dz| ~ 1e11 (F.normalize's clamp). It once set the one fp16 operand scale of every
    row, and the others flushed to 0 (|dW| 0.48 on torch, 0 on triton). Every gradient within
    the margin of the torch backend's in the same dtype; the zero token's own dL/dh overflows
    16 bits: non-finite exactly where the torch backend's is. A 2 x 2 corner of the 4 x 4 grid
    is zero, so the bilinear resampling to 3 x 3 keeps a zero row."""
    hidden = torch.randn(2, 16, 16, device=device)
    hidden[:, [0, 1, 4, 5]] = 0
    inputs = {"hidden": hidden.to(dtype), "target": torch.randn(2, target_tokens, 8, device=device).to(dtype),
              "ln_weight": torch.ones(16, device=device), "ln_bias": torch.zeros(16, device=device),
              "proj_weight": torch.randn(8, 16, device=device) / 4, "proj_bias": torch.zeros(8, device=device)}
    side = math.isqrt(target_tokens)
    inputs = correlated_target(inputs, (4, 4), (side, side))
    reference_result = outputs_and_grads(fn, cast(inputs, torch.float64), PROJECTION_ARGS, backend="torch")
    same_dtype_torch = outputs_and_grads(fn, inputs, PROJECTION_ARGS, backend="torch")
    result = outputs_and_grads(fn, inputs, PROJECTION_ARGS, backend=backend)
    for key, ref in reference_result.items():
        finite = torch.isfinite(same_dtype_torch[key])
        assert torch.equal(torch.isfinite(result[key]), finite), key
        err, torch_err = rel_err(result[key][finite], ref[finite]), rel_err(same_dtype_torch[key][finite], ref[finite])
        assert err <= torch_err + TOLERANCE[dtype], f"{backend} {key}: rel err {err:.3g}, torch {torch_err:.3g}"


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("fn", [rf.cosine_alignment_loss, rf.manifold_loss], ids=["cosine", "manifold"])
def test_zero_norm_rows_of_a_pair(backend, device, fn):
    inputs = {"projected": _zero_rows(torch.randn(2, 9, 5, device=device), [1, 4]),
              "target": _zero_rows(torch.randn(2, 9, 5, device=device), [4, 8])}
    assert_matches_reference(fn, inputs, backend=backend, grad_names=("projected",))


@pytest.mark.parametrize("backend, device", CASES)
def test_all_rows_zero(backend, device):
    inputs = {"projected": torch.zeros(2, 6, 5, device=device), "target": torch.randn(2, 6, 5, device=device)}
    for fn, expected in ((rf.cosine_alignment_loss, 0.0), (rf.manifold_loss, 1.0 / 6)):
        projected = inputs["projected"].clone().requires_grad_()
        loss = fn(projected, inputs["target"], backend=backend)
        loss.backward()
        # manifold: Zn Zn^T = 0, so the loss is mean (Tn Tn^T)^2, with its diagonal of ones.
        reference_value = expected if fn is rf.cosine_alignment_loss else \
            rf.manifold_loss(inputs["projected"].double(), inputs["target"].double(), backend="torch").item()
        assert loss.item() == pytest.approx(reference_value, rel=1e-5, abs=1e-7)
        assert torch.isfinite(projected.grad).all()


# ---------------------------------------------------------------- dtypes

def _mixed_dtype_cases():
    cases = []
    for backend, device in ((p.values[0], p.values[1]) for p in CASES):
        for half in half_dtypes(backend, device):
            for hidden, target, params in ((half, half, torch.float32), (half, half, half),
                                           (half, torch.float32, torch.float32), (torch.float32, half, torch.float32)):
                cases.append(pytest.param(backend, device, hidden, target, params,
                                   id=f"{backend}-{device}-{hidden}-{target}-{params}".replace("torch.", "")))
    return cases


@pytest.mark.parametrize("backend, device, hidden_dtype, target_dtype, param_dtype", _mixed_dtype_cases())
def test_mixed_parameter_and_activation_dtypes(backend, device, hidden_dtype, target_dtype, param_dtype):
    inputs = correlated_target(projection_inputs(2, 16, 12, 9, 10, device=device), (4, 4), (3, 3))
    inputs = {k: v.to(hidden_dtype if k == "hidden" else target_dtype if k == "target" else param_dtype)
              for k, v in inputs.items()}
    for fn in (rf.repa_loss, rf.urepa_loss):   # tolerance by hidden's dtype
        assert_matches_reference(fn, inputs, backend=backend)
    leaves = {k: v.clone().requires_grad_(k != "target") for k, v in inputs.items()}
    align, manifold = rf.urepa_loss(**leaves, backend=backend)
    assert align.dtype == manifold.dtype == torch.float32
    (align + manifold).backward()
    for name in PROJECTION_ARGS:
        assert leaves[name].grad.dtype == leaves[name].dtype, name


# ---------------------------------------------------------------- very large N (torch backend, chunked)

def test_very_large_n_never_allocates_b_n_n():
    """96 x 96 hidden tokens aligned to a 90 x 90 target: N = 8100, B*N*N = 131M elements."""
    hidden_grid, target_grid = (96, 96), (90, 90)
    inputs = correlated_target(projection_inputs(2, 96 * 96, 8, 90 * 90, 16), hidden_grid, target_grid)
    leaves = {k: v.clone().requires_grad_(k != "target") for k, v in inputs.items()}
    with LargestAllocation() as probe:
        align, manifold = rf.urepa_loss(**leaves, hidden_grid=hidden_grid, target_grid=target_grid, backend="torch")
        (align + manifold).backward()
    assert probe.numel < 2 * 8100 * 8100 // 100
    # F.interpolate computes its source positions in the input dtype: in float32 at a 90-token
    # side the tap weights are off by ~1e-5, so the float32 reference itself is ~2e-5 away here.
    assert_matches_reference(rf.urepa_loss, inputs, backend="torch", tolerance=1e-4, hidden_grid=hidden_grid,
                             target_grid=target_grid)


def test_large_n_direct_manifold_form_is_chunked(monkeypatch):
    """E > 0.6 N picks the direct form; with small chunks it never holds B x N x N."""
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 2 * 576 * 48)
    inputs = correlated_target(projection_inputs(2, 784, 8, 576, 400), (28, 28), (24, 24))
    assert not reference.use_gram_form(576, 400)
    leaves = {k: v.clone().requires_grad_(k != "target") for k, v in inputs.items()}
    with LargestAllocation() as probe:
        sum(rf.urepa_loss(**leaves, backend="torch")).backward()
    assert probe.numel < 2 * 576 * 576
    assert_matches_reference(rf.urepa_loss, inputs, backend="torch", tolerance=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fused_backends_never_allocate_b_n_n(backend):
    inputs = projection_inputs(2, 64 * 64, 256, 4096, 384, device="cuda", dtype=torch.bfloat16)
    leaves = {k: v.clone().requires_grad_(k != "target") for k, v in inputs.items()}
    with LargestAllocation() as probe:
        sum(rf.urepa_loss(**leaves, backend=backend)).backward()
    assert probe.numel < 2 * 4096 * 4096


# ---------------------------------------------------------------- non-finite input

NON_FINITE = [float("nan"), float("inf"), float("-inf")]
# The Triton interpreter computes with numpy, which warns about the NaN these tests put in.
numpy_nan_warnings = pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")


def _poisoned(inputs, name, value, index=0):
    inputs = dict(inputs)
    poisoned = inputs[name].clone()
    poisoned.view(-1)[index % poisoned.numel()] = value
    inputs[name] = poisoned
    return inputs


def _assert_nan_exactly_as_reference(fn, inputs, backend, grad_names, check_grads=True, **kwargs):
    reference_result = outputs_and_grads(fn, cast(inputs, torch.float64), grad_names, backend="torch", **kwargs)
    result = outputs_and_grads(fn, inputs, grad_names, backend=backend, **kwargs)
    for key, ref in reference_result.items():
        if "/" not in key:   # a loss: NaN exactly where the reference is NaN, else close to it
            assert torch.isnan(result[key]).item() == torch.isnan(ref).item(), (key, result[key], ref)
            if not torch.isnan(ref):
                torch.testing.assert_close(result[key].double(), ref, rtol=1e-4, atol=1e-5)
        elif check_grads:    # a gradient: non-finite somewhere exactly when the reference is
            assert torch.isfinite(result[key]).all().item() == torch.isfinite(ref).all().item(), key
    return reference_result


@numpy_nan_warnings
@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("fn", [rf.repa_loss, rf.urepa_loss], ids=["repa", "urepa"])
@pytest.mark.parametrize("name", ["hidden", "target", "ln_weight", "ln_bias", "proj_weight", "proj_bias"])
def test_non_finite_input_gives_nan_loss(backend, device, value, fn, name):
    inputs = _poisoned(projection_inputs(2, 9, 6, 9, 5, device=device), name, value, index=7)
    result = _assert_nan_exactly_as_reference(fn, inputs, backend, PROJECTION_ARGS)
    assert torch.isnan(result["out0"])


@numpy_nan_warnings
@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("fn", [rf.cosine_alignment_loss, rf.manifold_loss], ids=["cosine", "manifold"])
@pytest.mark.parametrize("name", ["projected", "target"])
def test_non_finite_pair_gives_nan_loss(backend, device, value, fn, name):
    inputs = random_pair(2, 6, 5, device=device)
    result = _assert_nan_exactly_as_reference(fn, _poisoned(inputs, name, value, index=11), backend, ("projected",))
    assert torch.isnan(result["out0"])


@numpy_nan_warnings
@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("row, poisons", [(0, False), (2, True)])
def test_nan_in_a_token_the_resampling_skips(backend, device, row, poisons):
    """9 -> 3 tokens (1-D): outputs read tokens (1, 2), (4, 5), (7, 8) with weights (1, 0), so a NaN
    in token 0 never reaches the loss, while one in token 2 does (0 * NaN = NaN), as in F.interpolate.
    Either way LayerNorm's ln_weight gradient sums dy * xhat over every token, so it is NaN (0 * NaN)
    and ln_bias's is finite, as in the reference."""
    inputs = projection_inputs(2, 9, 6, 3, 5, device=device)
    inputs["hidden"][1, row] = float("nan")
    for fn in (rf.repa_loss, rf.urepa_loss):
        result = _assert_nan_exactly_as_reference(fn, inputs, backend, PROJECTION_ARGS)
        assert torch.isnan(result["out0"]).item() == poisons
        assert torch.isnan(result["out0/ln_weight"]).any() and torch.isfinite(result["out0/ln_bias"]).all() != poisons


FUNCTIONS = {
    "repa_loss": (rf.repa_loss, lambda device: projection_inputs(2, 9, 6, 4, 5, device=device)),
    "urepa_loss": (rf.urepa_loss, lambda device: projection_inputs(2, 9, 6, 4, 5, device=device)),
    "cosine_alignment_loss": (rf.cosine_alignment_loss, lambda device: random_pair(2, 4, 5, device=device)),
    "manifold_loss": (rf.manifold_loss, lambda device: random_pair(2, 4, 5, device=device)),
    "align_tokens": (lambda a, b, backend: rf.align_tokens(a, b), lambda device: {
        "a": torch.randn(2, 9, 6, device=device), "b": torch.randn(2, 4, 5, device=device)}),
}


@numpy_nan_warnings
@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("function", list(FUNCTIONS))
def test_check_finite_names_the_tensor(backend, device, function, monkeypatch):
    fn, make_inputs = FUNCTIONS[function]
    inputs = make_inputs(device)
    for name, value in zip(inputs, NON_FINITE * 2):
        poisoned = _poisoned(inputs, name, value, index=3)
        monkeypatch.setenv("REPA_FAST_CHECK_FINITE", "1")
        match = f"{name} holds non-finite values (NaN or Inf), shape {tuple(inputs[name].shape)}"
        with pytest.raises(ValueError, match="^" + re.escape(match)):
            fn(**poisoned, backend=backend)
        monkeypatch.setenv("REPA_FAST_CHECK_FINITE", "0")   # off: the NaN goes through
        out = fn(**poisoned, backend=backend)
        assert any(not torch.isfinite(t).all() for t in (out if isinstance(out, tuple) else (out,)))
    monkeypatch.setenv("REPA_FAST_CHECK_FINITE", "1")
    fn(**inputs, backend=backend)   # finite input passes the check


@pytest.mark.parametrize("module_class", [rf.RepaLoss, rf.URepaLoss], ids=["RepaLoss", "URepaLoss"])
def test_loss_module_with_non_finite_input(module_class, monkeypatch):
    """The module's loss and logs carry the NaN (a grad scaler skips such a step); the schedule's
    similarity EMA ignores it; REPA_FAST_CHECK_FINITE=1 raises instead, naming the tensor."""
    module = module_class(6, 5, schedule=rf.LambdaSchedule(similarity_threshold=0.9))
    hidden, target = torch.randn(2, 9, 6), torch.randn(2, 4, 5)
    module(hidden, target)
    ema = module.schedule.similarity_ema
    loss, logs = module(hidden, _poisoned({"t": target}, "t", float("nan"))["t"])
    assert math.isnan(loss.item()) and math.isnan(logs["alignment"]) and math.isnan(logs["similarity"])
    assert module.schedule.similarity_ema == ema and module.step_count == 2
    monkeypatch.setenv("REPA_FAST_CHECK_FINITE", "1")
    with pytest.raises(ValueError, match=r"^hidden holds non-finite values"):
        module(_poisoned({"h": hidden}, "h", float("inf"))["h"], target)
    assert module.step_count == 2


@pytest.mark.parametrize("fn", [rf.repa_loss, rf.urepa_loss], ids=["repa", "urepa"])
def test_check_finite_skips_tensors_without_values(fn, monkeypatch):
    """Meta and fake tensors (shape propagation, torch.compile tracing) have no values to check."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    monkeypatch.setenv("REPA_FAST_CHECK_FINITE", "1")
    meta = {k: v.to("meta") for k, v in projection_inputs(2, 9, 6, 4, 5).items()}
    out = fn(**meta, backend="torch")
    assert all(o.device.type == "meta" and o.shape == () for o in (out if isinstance(out, tuple) else (out,)))
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) for k, v in projection_inputs(2, 9, 6, 4, 5).items()}
        out = fn(**fake, backend="torch")
    assert all(o.shape == () for o in (out if isinstance(out, tuple) else (out,)))
