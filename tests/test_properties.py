"""Property tests (hypothesis): random tiny shapes, grids, layouts, dtypes and values; every
available backend against the float64 reference, losses and every gradient.

Examples are derandomized (the same ones on every run, no example database) and tiny, so the
Triton interpreter path stays within CI's budget.
"""
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import repa_fast as rf
from parity import PROJECTION_ARGS, TOLERANCE, cast, outputs_and_grads

BACKENDS = rf.available_backends("cpu")
# Each example runs every backend; the interpreter makes a Triton example cost ~100x a torch one.
EXAMPLES = 60 if BACKENDS == ["torch"] else 30
PROPERTY = settings(derandomize=True, database=None, deadline=None, max_examples=EXAMPLES,
                    suppress_health_check=[HealthCheck.too_slow])

sides = st.integers(1, 5)


def _dtypes(backend):
    """(hidden, target, parameter) dtype choices; bfloat16 only where the backend runs it here."""
    return (torch.float32, torch.float16) + ((torch.bfloat16,) if backend == "torch" else ())


@st.composite
def projection_cases(draw):
    hidden_grid, target_grid = (draw(sides), draw(sides)), (draw(sides), draw(sides))
    half = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    return {
        "batch": draw(st.integers(1, 3)),
        "hidden_grid": hidden_grid,
        "target_grid": target_grid,
        # feature map (B, D, H, W); tokens with their grid; tokens alone (square by count, or 1-D)
        "hidden_layout": draw(st.sampled_from(["feature_map", "grid", "tokens"])),
        "target_layout": draw(st.sampled_from(["grid", "tokens"])),
        "hidden_dim": draw(st.integers(3, 9)),   # D <= 2: test_edge_cases
        "encoder_dim": draw(st.integers(2, 9)),   # E = 1: test_edge_cases
        "hidden_dtype": half,
        "target_dtype": draw(st.sampled_from([torch.float32, half])),
        "param_dtype": draw(st.sampled_from([torch.float32, half])),
        "hidden_scale": draw(st.sampled_from([1e-2, 1.0, 1e2])),
        # zero hidden rows with zero biases project to zero rows (fp32 only: their 1/eps gradient
        # overflows half precision in every backend alike)
        "zero_rows": draw(st.integers(0, 2)) if half == torch.float32 else 0,
        "zero_target_rows": draw(st.integers(0, 2)),
        "spatial_align": draw(st.booleans()),
        "seed": draw(st.integers(0, 2 ** 31 - 1)),
    }


def _build_projection(case):
    g = torch.Generator().manual_seed(case["seed"])
    batch, d, e = case["batch"], case["hidden_dim"], case["encoder_dim"]
    (hh, hw), (th, tw) = case["hidden_grid"], case["target_grid"]
    hidden = torch.randn(batch, hh * hw, d, generator=g) * case["hidden_scale"]
    hidden[:, :case["zero_rows"]] = 0
    target = torch.randn(batch, th * tw, e, generator=g)
    target[:, target.shape[1] - case["zero_target_rows"]:] = 0
    zero_bias = case["zero_rows"] > 0
    inputs = {
        "hidden": hidden.to(case["hidden_dtype"]),
        "target": target.to(case["target_dtype"]),
        "ln_weight": (1.0 + 0.2 * torch.randn(d, generator=g)).to(case["param_dtype"]),
        "ln_bias": (0.0 if zero_bias else 0.1) * torch.randn(d, generator=g).to(case["param_dtype"]),
        "proj_weight": (torch.randn(e, d, generator=g) / math.sqrt(d)).to(case["param_dtype"]),
        "proj_bias": (0.0 if zero_bias else 0.1) * torch.randn(e, generator=g).to(case["param_dtype"]),
    }
    kwargs = {}
    if case["hidden_layout"] == "feature_map":
        inputs["hidden"] = inputs["hidden"].transpose(1, 2).reshape(batch, d, hh, hw)
    elif case["hidden_layout"] == "grid":
        kwargs["hidden_grid"] = (hh, hw)
    if case["target_layout"] == "grid":
        kwargs["target_grid"] = (th, tw)
    return inputs, kwargs


def _assert_close_to_reference(fn, inputs, grad_names, backends, **kwargs):
    """DESIGN.md §4 by relative error, with an absolute floor at each value's natural scale: 1
    for a loss (a mean of cosines, or of squared cosine differences) and for the gradient w.r.t.
    a parameter, 1 / ||x|| for the gradient w.r.t. an activation x (the losses do not change with
    its scale: LayerNorm, normalize). Without it an exactly-zero value (the manifold loss of one
    token, the gradient through normalize of one feature) compares rounding noise with rounding noise."""
    dtype = inputs["hidden" if "hidden" in inputs else "projected"].dtype
    tolerance = TOLERANCE[dtype]
    reference = outputs_and_grads(fn, cast(inputs, torch.float64), grad_names, backend="torch", **kwargs)
    same_dtype_torch = outputs_and_grads(fn, inputs, grad_names, backend="torch", **kwargs)
    for backend in backends:
        result = same_dtype_torch if backend == "torch" else outputs_and_grads(fn, inputs, grad_names,
                                                                               backend=backend, **kwargs)
        for key, ref in reference.items():
            name = key.partition("/")[2]
            norm = inputs[name].double().norm().item() if name in ("hidden", "projected") else 0.0
            floor = 1.0 / norm if norm > 0 else 1.0
            scale = max(ref.norm().item(), floor)
            out = result[key]
            assert out.shape == ref.shape and out.dtype == (inputs[name].dtype if name else torch.float32), key
            assert torch.isfinite(out).all(), f"{backend} {key}: not finite"
            err = (out.double() - ref).norm().item() / scale
            torch_err = (same_dtype_torch[key].double() - ref).norm().item() / scale
            assert err <= tolerance and err <= torch_err + tolerance, (
                f"{backend} {key}: error {err:.3g} (torch backend in {dtype}: {torch_err:.3g}, "
                f"tolerance {tolerance:g})")


@PROPERTY
@given(case=projection_cases())
def test_repa_and_urepa_match_the_float64_reference(case):
    backends = [b for b in BACKENDS if case["hidden_dtype"] in _dtypes(b)]
    inputs, kwargs = _build_projection(case)
    _assert_close_to_reference(rf.repa_loss, inputs, PROJECTION_ARGS, backends, spatial_align=case["spatial_align"],
                               **kwargs)
    _assert_close_to_reference(rf.urepa_loss, inputs, PROJECTION_ARGS, backends, **kwargs)


@st.composite
def pair_cases(draw):
    half = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    return {
        "shape": (draw(st.integers(1, 3)), draw(st.integers(1, 12)), draw(st.integers(1, 9))),
        "dtype": half,
        "target_dtype": draw(st.sampled_from([torch.float32, half])),
        "scale": draw(st.sampled_from([1e-3, 1.0, 1e3])),
        "zero_rows": draw(st.integers(0, 2)) if half == torch.float32 else 0,
        "transposed": draw(st.booleans()),
        "seed": draw(st.integers(0, 2 ** 31 - 1)),
    }


@PROPERTY
@given(case=pair_cases())
def test_cosine_and_manifold_match_the_float64_reference(case):
    backends = [b for b in BACKENDS if case["dtype"] in _dtypes(b)]
    g = torch.Generator().manual_seed(case["seed"])
    projected = torch.randn(case["shape"], generator=g) * case["scale"]
    projected[:, :case["zero_rows"]] = 0
    inputs = {"projected": projected.to(case["dtype"]),
              "target": torch.randn(case["shape"], generator=g).to(case["target_dtype"])}
    if case["transposed"]:   # the same values, read through a (B, E, N) buffer
        inputs = {k: v.transpose(1, 2).contiguous().transpose(1, 2) for k, v in inputs.items()}
    for fn in (rf.cosine_alignment_loss, rf.manifold_loss):
        _assert_close_to_reference(fn, inputs, ("projected",), backends)


@settings(derandomize=True, database=None, deadline=None, max_examples=60)
@given(a_side=st.tuples(sides, sides), b_side=st.tuples(sides, sides), a_grid=st.booleans(), b_grid=st.booleans(),
       spatial_align=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_align_tokens_shrinks_to_the_smaller_side_within_the_inputs_range(a_side, b_side, a_grid, b_grid,
                                                                           spatial_align, seed):
    g = torch.Generator().manual_seed(seed)
    n_a, n_b = math.prod(a_side), math.prod(b_side)
    a = torch.randn(2, n_a, 3, generator=g, dtype=torch.float64)
    b = torch.randn(2, n_b, 4, generator=g, dtype=torch.float64)
    a_out, b_out = rf.align_tokens(a, b, a_grid=a_side if a_grid else None, b_grid=b_side if b_grid else None,
                                   spatial_align=spatial_align)
    grids_differ = a_grid and b_grid and a_side != b_side
    if n_a == n_b and not grids_differ:
        expected = n_a
    elif not spatial_align:
        expected = 1
    else:
        expected = min(n_a, n_b)
    assert a_out.shape == (2, expected, 3) and b_out.shape == (2, expected, 4)
    # Linear resampling with weights >= 0 summing to one: every value within its input's range.
    for x, y in ((a, a_out), (b, b_out)):
        assert (y >= x.amin(1, keepdim=True) - 1e-12).all() and (y <= x.amax(1, keepdim=True) + 1e-12).all()
