"""iREPA's target z-score fused with the alignment terms (the "conv" projector kind): every
backend's `target_zscore` (the (shift, scale) affine map, one pass over the target) and the conv
head's losses with the affine applied where the loss kernels load the target, against the float64
reference (DESIGN.md §4): loss and every gradient, alpha 0.6 / 0 / 1, one token, a target whose
mean is far above its std, resampled and not, fp32 / fp16 / bf16."""
import pytest
import torch

from repa_fast import backends, reference
from parity import TOLERANCE, assert_matches_reference, rel_err
from test_cuda_backend import HOST_SKIP, cuda_backend_on_host
from test_projectors import _as_function, _projector, _target_near

F64 = torch.float64
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=["torch", "triton", pytest.param("cuda", id="cuda-host", marks=HOST_SKIP)])
def backend(request):
    """A backend name; "cuda" runs csrc/ops.cpp with the CPU stand-ins of its kernels (see
    tests/test_cuda_backend.py)."""
    if request.param != "cuda":
        yield request.param
        return
    with cuda_backend_on_host():
        yield "cuda"


def _zscored(target: torch.Tensor, t_affine: torch.Tensor) -> torch.Tensor:
    return reference.apply_target_affine(target.double(), t_affine.double())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("alpha", [0.6, 0.0, 1.0])
@pytest.mark.parametrize("tokens, offset, strided", [(1, 0.0, False), (37, 0.0, False), (37, 0.0, True),
                                                     (150, 1e3, False)],
                         ids=["one-token", "37", "37-strided", "150-offset-1e3"])
def test_target_zscore_matches_the_float64_reference(backend, tokens, offset, strided, alpha, dtype):
    """The target z-scored through each backend's affine map against spatial_zscore in float64
    on the same values. A 1e3 offset on unit noise: fp32 holds the mean to 6e-5 of the std, the
    shift the map stores inherits that (the torch backend's in fp32 too)."""
    module = backends.resolve_backend(backend, torch.device("cpu"))
    target = (torch.randn(2, 21, tokens) if strided else torch.randn(2, tokens, 21)) * 0.7 + offset
    target = (target.transpose(1, 2) if strided else target).to(dtype)
    t_affine = module.target_zscore(target, alpha)
    assert t_affine.shape == (2, 2, 21) and t_affine.dtype == torch.float32
    expected = reference.spatial_zscore(target.double(), alpha)
    err = rel_err(_zscored(target, t_affine), expected)
    torch_err = rel_err(_zscored(target, reference.target_zscore(target, alpha)), expected)
    tolerance = 1e-6 if offset == 0 else 1e-4   # the fp32 affine map's own precision
    assert err <= tolerance and err <= torch_err + 1e-6, (err, torch_err)
    # float64 targets: a float64 map, the torch backend's
    assert torch.equal(module.target_zscore(target.double(), alpha), reference.target_zscore(target.double(), alpha))


# id: (batch, hidden tokens, hidden grid, D, target tokens, target grid, E, kernel size)
CONV_CASES = {
    "same-grid": (2, 20, (4, 5), 10, 20, (4, 5), 7, 3),          # no resampling; the manifold's Gram form
    "hidden-shrinks": (2, 35, (5, 7), 10, 9, None, 7, 5),        # z resampled; the manifold's direct form
    "target-shrinks": (2, 9, None, 10, 16, None, 7, 1),          # the target resampled
    "one-token": (3, 1, (1, 1), 10, 1, (1, 1), 7, 3),            # N == 1: std 0, scale 1e6
}


def _conv_case(case, alpha, manifold, offset):
    batch, tokens, grid, dim, target_tokens, target_grid, encoder_dim, kernel_size = CONV_CASES[case]
    projector = _projector("conv", dim, encoder_dim, kernel_size=kernel_size)
    hidden = 2.0 * torch.randn(batch, tokens, dim, dtype=F64) + 0.5
    with torch.no_grad():
        z = projector(hidden, grid)
    target = _target_near(z, target_tokens)
    if target_tokens > 1:   # correlated with z after the z-score
        target = target * target.std(1, keepdim=True) + target.mean(1, keepdim=True) * 0.5
    fn, params = _as_function(projector, hidden_grid=grid, target_grid=target_grid, target_zscore_alpha=alpha,
                              manifold=manifold)
    return fn, {"hidden": hidden, "target": target + offset, **params}


# The manifold term of one token is 0 up to rounding: no relative error to compare there.
LOSS_CASES = [pytest.param(case, manifold, id=f"{case}-{'urepa' if manifold else 'repa'}")
              for case in CONV_CASES for manifold in (False, True) if not (manifold and case == "one-token")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case, manifold", LOSS_CASES)
def test_conv_losses_with_the_fused_zscore_match_the_float64_reference(backend, case, manifold, dtype):
    """iREPA's alpha 0.6: loss and every gradient (hidden, conv weight and bias)."""
    fn, inputs = _conv_case(case, 0.6, manifold, 0.0)
    inputs = {k: v.to(dtype) for k, v in inputs.items()}
    assert_matches_reference(fn, inputs, backend=backend, grad_names=[k for k in inputs if k != "target"])


@pytest.mark.parametrize("activations", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize("case", ["same-grid", "target-shrinks"])
def test_conv_losses_with_a_large_target_mean_match_the_float64_reference(backend, case, alpha, activations):
    """A fp32 target with a 1e3 offset on a std of ~1 (alpha 1 removes it, alpha 0 keeps it),
    fp32 or bf16 activations. The target is read as it is and z-scored in fp32 on load; resampled,
    it is resampled in fp32 first. fp32's own rounding of the mean is 6e-5 of the std, so the
    torch backend in fp32 errs by ~3e-5 too: the DESIGN.md §4 margin over it applies (a 16-bit
    target this far from zero holds no variation to compare)."""
    fn, inputs = _conv_case(case, alpha, True, 1e3)
    inputs = {k: v.to(torch.float32 if k == "target" else activations) for k, v in inputs.items()}
    assert_matches_reference(fn, inputs, backend=backend, grad_names=[k for k in inputs if k != "target"],
                             ill_conditioned=activations == torch.float32)


def test_the_affine_map_is_applied_where_the_target_is_loaded():
    """The triton kernels on a raw target and its map give the losses of the z-scored target."""
    from repa_fast.kernels import backend as triton_backend
    z, target = torch.randn(2, 30, 9), torch.randn(2, 30, 9) * 3 + 5
    t_affine = triton_backend.target_zscore(target, 0.6)
    zscored = reference.apply_target_affine(target, t_affine)
    for name in ("cosine_alignment_loss", "manifold_loss"):
        fused = getattr(triton_backend, name)(z, target, t_affine)
        assert rel_err(fused, getattr(triton_backend, name)(z, zscored)) <= TOLERANCE[torch.float32], name


def test_conv_losses_with_the_fused_zscore_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) traces the conv head, the z-score op and the loss ops (their
    fakes and autograd): the same losses and gradients as eager."""
    fn, inputs = _conv_case("target-shrinks", 0.6, True, 0.0)
    inputs = {k: v.float() for k, v in inputs.items()}

    def losses(**kw):
        align, manifold = fn(**kw, backend=backend)
        return align + 3.0 * manifold

    compiled = torch.compile(losses, fullgraph=True, backend="aot_eager")
    grad_names = [k for k in inputs if k != "target"]
    results = []
    for run in (losses, compiled):
        leaves = {k: v.clone().requires_grad_(k in grad_names) for k, v in inputs.items()}
        out = run(**leaves)
        results.append([out, *torch.autograd.grad(out, [leaves[k] for k in grad_names])])
    for eager, traced in zip(*results):
        assert rel_err(traced, eager) <= 1e-6


# ---------------------------------------------------------------- on a GPU (benchmarks/gpu_check.sh)

@pytest.mark.gpu
@pytest.mark.parametrize("name", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, offset", [((3, 1, 70), 0.0), ((2, 4097, 1536), 0.0), ((2, 4097, 1536), 1e3)],
                         ids=["one-token", "4097x1536", "4097x1536-offset-1e3"])
def test_gpu_target_zscore_matches_the_float64_reference(name, shape, offset, dtype):
    """The compiled statistics kernels: many token blocks merged, a large mean."""
    module = backends.resolve_backend(name, torch.device("cuda"))
    target = (torch.randn(shape, device="cuda") * 0.7 + offset).to(dtype)
    expected = reference.spatial_zscore(target.double(), 0.6)
    err = rel_err(_zscored(target, module.target_zscore(target, 0.6)), expected)
    torch_err = rel_err(_zscored(target, reference.target_zscore(target, 0.6)), expected)
    assert err <= (1e-6 if offset == 0 else 1e-4) and err <= torch_err + 1e-6, (err, torch_err)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case, manifold", LOSS_CASES)
def test_gpu_conv_losses_with_the_fused_zscore_match_the_float64_reference(name, case, manifold, dtype):
    """The compiled loss kernels with the affine applied on load."""
    fn, inputs = _conv_case(case, 0.6, manifold, 0.0)
    inputs = {k: v.to("cuda", dtype) for k, v in inputs.items()}
    assert_matches_reference(fn, inputs, backend=name, grad_names=[k for k in inputs if k != "target"])
