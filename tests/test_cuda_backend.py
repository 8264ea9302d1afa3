"""The cuda backend against the float64 reference (DESIGN.md §4), every loss and every gradient.

Two devices run the same tests:
- "cuda" (@pytest.mark.gpu, run by benchmarks/gpu_check.sh): the compiled extension on a GPU;
- "host" (CPU machines): csrc/ops.cpp built for the CPU with csrc/host_launchers.cpp standing in
  for the kernels, so the glue (GEMMs, strides, taps, dtype handling), the op registration, the
  Python custom ops, autograd and torch.compile are exercised here; the kernels' own numerics need
  the GPU run.
"""
import contextlib
import functools
import itertools

import pytest
import torch
import torch.nn.functional as F

import repa_fast as rf
from repa_fast import backends, cuda_backend
from repa_fast.alignment import Resample, plan_alignment, resample_tokens
from repa_fast.validation import as_tokens
from test_projectors import _case as projector_case
from parity import (LATE_TRAINING_NOISES, PROJECTION_ARGS, TOLERANCE, assert_matches_reference, cast,
                    interpolate_tokens, late_training_pair, literal_manifold, literal_projection, outputs_and_grads,
                    projection_inputs, rel_err)

HOST_SKIP = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the compiled kernels instead")


def build_host_emulation() -> str:
    """csrc/ops.cpp with CPU launchers, as a torch library (cached by torch like any JIT build)."""
    from torch.utils import cpp_extension
    build = cuda_backend._build_description()
    # Built per checkout (build/ is ignored): torch's shared extension cache would let two
    # checkouts of different csrc/ overwrite each other's build.
    directory = build.CSRC.parent / "build" / "host_emulation"
    directory.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(name="repa_fast_host_emulation", build_directory=str(directory),
                              sources=[str(build.CSRC / s) for s in build.HOST_EMULATION_SOURCES],
                              extra_cflags=["-O1", "-DREPA_FAST_DISPATCH_KEY=CPU"], is_python_module=False)


@contextlib.contextmanager
def cuda_backend_on_host():
    """backend="cuda" taking CPU tensors, run by the host emulation build, while in the block."""
    cuda_backend.load_library(build_host_emulation())
    original = backends._why_not
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backends, "_why_not", lambda name, dev: "" if name == "cuda" else original(name, dev))
        patch.setitem(backends._loaded, "cuda", (cuda_backend, ""))
        yield


@pytest.fixture(scope="module", params=[pytest.param("cuda", marks=pytest.mark.gpu),
                                        pytest.param("cpu", id="host", marks=HOST_SKIP)])
def device(request):
    if request.param == "cuda":
        reason = cuda_backend.unavailable_reason()
        assert not reason, f"the cuda backend must run on this GPU machine: {reason}"
        yield "cuda"
        return
    with cuda_backend_on_host():
        yield "cpu"


DTYPES = [torch.float32, torch.bfloat16]


def csr_gather(x, offsets, index, weight):
    """What the gather_rows kernel computes, in torch."""
    rows = torch.repeat_interleave(torch.arange(len(offsets) - 1), offsets.diff())
    out = x.new_zeros(x.shape[0], len(offsets) - 1, x.shape[2])
    return out.index_add_(1, rows, x[:, index] * weight[:, None].to(x.dtype))


@pytest.mark.parametrize("step", [Resample("linear", (50,), (37,)), Resample("bilinear", (8, 8), (6, 6)),
                                  Resample("bilinear", (16, 4), (8, 8)), Resample("bilinear", (37, 37), (32, 32)),
                                  Resample("mean", (20,), (1,))], ids=str)
def test_taps_are_the_resampling_and_their_transpose_its_adjoint(step):
    """Forward taps gather what F.interpolate computes; transposed taps gather its gradient."""
    code, cpu = cuda_backend._encode(step), torch.device("cpu")
    x = torch.randn(2, step.src_tokens, 3, dtype=torch.float64, requires_grad=True)
    expected = resample_tokens(x, step)
    assert rel_err(csr_gather(x.detach(), *cuda_backend._taps(code, cpu, False)), expected) < 1e-7
    grad_out = torch.randn_like(expected)
    (adjoint,) = torch.autograd.grad(expected, x, grad_out)
    assert rel_err(csr_gather(grad_out, *cuda_backend._taps(code, cpu, True)), adjoint) < 1e-7


# (batch, hidden tokens or (h, w) of a feature map, D, target tokens, E, keyword arguments)
PROJECTION_CASES = {
    "same-count": (2, 37, 50, 37, 13, {}),
    "single-token": (3, 1, 17, 1, 9, {}),
    "linear": (2, 50, 24, 37, 20, {}),
    "bilinear-hidden": (2, 64, 40, 36, 24, {}),
    "bilinear-target": (2, 25, 16, 49, 24, {}),
    "regrid-same-count": (1, 64, 20, 64, 12, {"hidden_grid": (16, 4), "target_grid": (8, 8)}),
    "feature-map": (2, (6, 5), 24, 30, 18, {}),
    "feature-map-bilinear": (2, (8, 8), 24, 36, 40, {}),
    # SimpleTuner's rule: the non-square side resampled as a flat sequence (target, then hidden).
    "sequence-rule": (2, (6, 4), 24, 49, 18, {"token_alignment": "sequence"}),
    "sequence-rule-hidden-shrinks": (2, (10, 6), 24, 49, 18, {"token_alignment": "sequence"}),
}


def shared_direction(dim, device):
    """Added to every row of both sides, as real features share a direction: cosines are O(1), so
    relative errors mean something, and the textbook Gram identity cancels (what the stable form is for)."""
    return 2.0 * torch.randn(dim, device=device)


def make_inputs(case, dtype, device, param_dtype=torch.float32):
    batch, tokens, dim, target_tokens, out_dim, kwargs = PROJECTION_CASES[case]
    inputs = projection_inputs(batch, tokens, dim, target_tokens, out_dim, dtype=dtype, param_dtype=param_dtype,
                               device=device, feature_map=isinstance(tokens, tuple))
    direction = shared_direction(out_dim, device)
    inputs["proj_bias"] = direction.to(param_dtype)
    inputs["target"] = (inputs["target"].float() + direction).to(dtype)
    return inputs, kwargs


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16], ids=str)
@pytest.mark.parametrize("case", PROJECTION_CASES)
def test_repa_loss(device, case, dtype):
    inputs, kwargs = make_inputs(case, dtype, device)
    assert_matches_reference(rf.repa_loss, inputs, backend="cuda", **kwargs)


def test_repa_loss_mean_pooled(device):
    inputs = projection_inputs(2, 20, 24, 13, 16, device=device)
    inputs["target"] += inputs["proj_bias"] * 20.0
    assert_matches_reference(rf.repa_loss, inputs, backend="cuda", spatial_align=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["same-count", "bilinear-hidden", "bilinear-target", "feature-map-bilinear",
                                  "sequence-rule-hidden-shrinks"])
def test_urepa_loss(device, case, dtype):
    inputs, kwargs = make_inputs(case, dtype, device)
    assert_matches_reference(rf.urepa_loss, inputs, backend="cuda", **kwargs)


def test_half_precision_parameters(device):
    inputs, kwargs = make_inputs("bilinear-hidden", torch.bfloat16, device, param_dtype=torch.bfloat16)
    assert_matches_reference(rf.urepa_loss, inputs, backend="cuda", **kwargs)


# ---------------------------------------------------------------- a Linear head without LayerNorm

def head_losses(hidden, target, proj_weight, proj_bias, backend, ln_weight=None, ln_bias=None, manifold=False,
                hidden_grid=None, token_alignment="grid"):
    """The backend's repa_loss (urepa_loss with `manifold`) called as repa_fast.projectors calls it:
    ln_weight = ln_bias = None is a Linear head without LayerNorm (an MLP head's last layer)."""
    tokens, grid = as_tokens("hidden", hidden, hidden_grid)
    plan = plan_alignment(tokens.shape[1], target.shape[1], grid, None, True, token_alignment)
    module = backends.resolve_backend(backend, hidden.device)
    args = (tokens, target, ln_weight, ln_bias, proj_weight, proj_bias, plan, 1e-5)
    return module.urepa_loss(*args) if manifold else module.repa_loss(*args)


LINEAR_HEAD_ARGS = ("hidden", "proj_weight", "proj_bias")


def linear_head_inputs(case, dtype, device, noise=0.4):
    """make_inputs' case without the LayerNorm parameters, the target near the Linear's own z."""
    inputs, kwargs = make_inputs(case, dtype, device)
    inputs = {k: v for k, v in inputs.items() if not k.startswith("ln_")}
    tokens, _ = as_tokens("hidden", inputs["hidden"].double(), None)
    z = F.linear(tokens, inputs["proj_weight"].double(), inputs["proj_bias"].double())
    z = interpolate_tokens(z, (z.shape[1],), (inputs["target"].shape[1],))
    inputs["target"] = (z + noise * z.std() * torch.randn_like(z)).to(dtype)
    return inputs, kwargs


# Not resampled (same count; a feature map read in place, strided), the hidden side resampled
# (bilinear, sequence rule), the target side resampled (hidden not: the GEMM reads hidden itself).
LINEAR_HEAD_CASES = ["same-count", "feature-map", "bilinear-hidden", "feature-map-bilinear",
                     "sequence-rule-hidden-shrinks", "bilinear-target"]


@pytest.mark.parametrize("manifold", [False, True], ids=["repa", "urepa"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LINEAR_HEAD_CASES)
def test_linear_head_without_layer_norm(device, case, dtype, manifold):
    inputs, kwargs = linear_head_inputs(case, dtype, device)
    assert_matches_reference(functools.partial(head_losses, manifold=manifold, **kwargs), inputs, backend="cuda",
                             grad_names=LINEAR_HEAD_ARGS)


@pytest.mark.parametrize("noise", LATE_TRAINING_NOISES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_linear_head_urepa_16bit_late_training_matches_torch(device, dtype, noise):
    """Without LayerNorm too, the fused U-REPA head projects 16-bit activations with float32
    operands: as z -> t, within the margin of torch's."""
    inputs, kwargs = linear_head_inputs("same-count", dtype, device, noise=noise)
    assert_matches_reference(functools.partial(head_losses, manifold=True, **kwargs), inputs, backend="cuda",
                             grad_names=LINEAR_HEAD_ARGS, ill_conditioned=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("manifold", [False, True], ids=["repa", "urepa"])
@pytest.mark.parametrize("case", ["mlp-same-count", "mlp-hidden-shrinks", "mlp-target-shrinks-1d"])
def test_mlp_projector(device, case, manifold, dtype):
    """repa_fast.projectors' "mlp" head on the cuda backend: its last Linear fused with the loss
    (tests/test_projectors.py's cases and dtypes; its BACKENDS are those that run without this
    build). The layers before it run in the activations' dtype on the fused backends (in bfloat16
    the first layer's bias gradient is ~1.5e-2 off there, torch 2e-3: test_projectors has no bf16)."""
    fn, inputs = projector_case(case, None, manifold)
    inputs = {k: v.to(dtype) for k, v in inputs.items()}
    assert_matches_reference(fn, inputs, backend="cuda", grad_names=[k for k in inputs if k != "target"])


def zero_token_inputs(dtype, resampled, layer_norm):
    """Issue 11 item 9's case: hidden tokens that are exactly zero (padding) with zero biases, so
    that z's first row is 0 (resampled 16 -> 8 tokens: tokens 0 and 1 make row 0)."""
    tokens = 16 if resampled else 8
    hidden = 2.0 * torch.randn(1, tokens, 16, dtype=torch.float64) + 0.5
    hidden[0, :2] = 0.0
    params = {"ln_weight": 1.0 + 0.2 * torch.randn(16, dtype=torch.float64),
              "ln_bias": torch.zeros(16, dtype=torch.float64)} if layer_norm else {}
    weight, bias = torch.randn(8, 16, dtype=torch.float64) / 4, torch.zeros(8, dtype=torch.float64)
    z = literal_projection(hidden, *params.values(), weight, bias) if layer_norm else F.linear(hidden, weight, bias)
    z = interpolate_tokens(z, (tokens,), (8,))
    target = z + 0.4 * z.std() * torch.randn_like(z)
    inputs = {"hidden": hidden, "target": target, **params, "proj_weight": weight, "proj_bias": bias}
    return {k: v.to(dtype if k in ("hidden", "target") else torch.float32) for k, v in inputs.items()}


@pytest.mark.parametrize("layer_norm", [True, False], ids=["layernorm", "no-layernorm"])
@pytest.mark.parametrize("resampled", [False, True], ids=["same-count", "resampled"])
@pytest.mark.parametrize("manifold", [False, True], ids=["repa", "urepa"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_a_zero_token_keeps_the_other_tokens_gradients(device, dtype, manifold, resampled, layer_norm):
    """Issue 11 item 9: z's zero row has |dL/dz| ~ 1e11 (F.normalize's 1e-12 clamp); scaled by one
    power of two for all rows, dL/dz of the others flushed to 0 in the float16 operand (|dW| 0 where
    torch has 0.5). Each row is scaled by its own now: every gradient within the margin of torch's
    against float64, non-finite exactly where torch's is (the zero tokens' dL/dhidden overflows
    float16 in both), the zero tokens' rows of dL/dhidden compared apart from the others'."""
    inputs = zero_token_inputs(dtype, resampled, layer_norm)
    names = [k for k in inputs if k != "target"]
    fn = functools.partial(head_losses, manifold=manifold)
    reference = outputs_and_grads(fn, cast(inputs, torch.float64), names, backend="torch")
    same_dtype_torch = outputs_and_grads(fn, inputs, names, backend="torch")
    result = outputs_and_grads(fn, inputs, names, backend="cuda")
    for key, ref in reference.items():
        parts = [slice(None, 2), slice(2, None)] if key.endswith("/hidden") else [slice(None)]
        for part in parts:
            got, want, torch_got = (x[:, part] if x.dim() == 3 else x for x in (result[key], ref, same_dtype_torch[key]))
            finite = torch.isfinite(torch_got)
            assert torch.equal(torch.isfinite(got), finite), f"{key}[{part}]: non-finite where torch's is not, or not"
            err, torch_err = rel_err(got[finite], want[finite]), rel_err(torch_got[finite], want[finite])
            assert err <= torch_err + TOLERANCE[dtype], f"{key}[{part}]: rel err {err:.3g} (torch {torch_err:.3g})"


# (batch, tokens, features). Direct manifold form (3 N <= 5 E): the tiled kernel for half-precision
# rows, chunked GEMMs for float32 ones. Gram form (3 N > 5 E), in its stable sum/difference form.
DIRECT_SHAPES = [(2, 37, 50), (2, 150, 130)]
if torch.cuda.is_available():
    DIRECT_SHAPES += [(2, 200, 136), (1, 1100, 1024)]  # several row blocks and column tiles; a wide strip
GRAM_SHAPES = [(3, 129, 13), (3, 60, 13)]


def pair_inputs(shape, dtype, device):
    """Rows sharing a direction, as real features do, and a target close to the projection, as after
    training: the cases where the textbook Gram identity cancels."""
    projected = torch.randn(*shape, device=device) + shared_direction(shape[-1], device)
    target = projected + 0.5 * torch.randn(*shape, device=device)
    return {"projected": projected.to(dtype), "target": target.to(dtype)}


# float16 gradients of a mean over N^2 pairs underflow past N ~ 100 (in every backend): small N only.
MANIFOLD_CASES = [(shape, dtype) for shape in DIRECT_SHAPES + GRAM_SHAPES[:1] for dtype in DTYPES]
MANIFOLD_CASES += [((2, 37, 50), torch.float16), ((3, 60, 13), torch.float16)]


@pytest.mark.parametrize("shape, dtype", MANIFOLD_CASES, ids=str)
def test_manifold_loss(device, shape, dtype):
    inputs = pair_inputs(shape, dtype, device)
    assert_matches_reference(rf.manifold_loss, inputs, backend="cuda", grad_names=("projected",))


@pytest.mark.parametrize("noise", LATE_TRAINING_NOISES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 37, 61), (3, 129, 13)], ids=["direct", "gram"])
def test_manifold_late_training_matches_torch(device, shape, dtype, noise):
    """z -> t: both forms multiply the rows S = Zn + Tn and D = Zn - Tn, each rounded once, so D
    keeps its relative precision (the direct form's products of rounded Zn and Tn erred by 0.27 at
    noise 0.001 in float16, torch 5e-3). No worse than torch in the same dtype plus the margin."""
    assert_matches_reference(rf.manifold_loss, late_training_pair(*shape, noise, dtype=dtype, device=device),
                             backend="cuda", grad_names=("projected",), ill_conditioned=True)


@pytest.mark.parametrize("noise", LATE_TRAINING_NOISES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_urepa_16bit_late_training_matches_torch(device, dtype, noise):
    """The fused head with 16-bit activations as z -> t (hidden tokens = target tokens): both losses
    and all gradients within the margin of torch's. Its projection multiplies float32 operands with
    TF32 off; with float16 ones the LayerNorm weight's gradient was 0.89 off at noise 0.001 (torch 0.24)."""
    inputs = projection_inputs(2, 37, 24, 37, 61, noise=noise, dtype=dtype, device=device)
    assert_matches_reference(rf.urepa_loss, inputs, backend="cuda", ill_conditioned=True)


@pytest.mark.gpu
def test_manifold_gradient_survives_the_chunked_fallback(device):
    """A row strip too wide for the tiled kernel's shared memory (N ~ 6000 on an H100) takes the
    chunked cuBLAS path with float16 rows: the 4 / (B N^2)-scaled gradient must not flush to 0."""
    inputs = pair_inputs((1, 6144, 3690), torch.bfloat16, device)   # 3 N <= 5 E: the direct form
    assert_matches_reference(rf.manifold_loss, inputs, backend="cuda", grad_names=("projected",))


def test_manifold_loss_of_one_token_is_zero(device):
    projected = torch.randn(2, 1, 9, device=device, requires_grad=True)
    value = rf.manifold_loss(projected, torch.randn(2, 1, 9, device=device), backend="cuda")
    value.backward()
    assert abs(value.item()) < 1e-6 and torch.isfinite(projected.grad).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 37, 50), (3, 129, 13), (1, 1, 7)], ids=str)
def test_cosine_alignment_loss(device, shape, dtype):
    assert_matches_reference(rf.cosine_alignment_loss, pair_inputs(shape, dtype, device), backend="cuda",
                             grad_names=("projected",))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16], ids=str)
def test_manifold_loss_without_gradient_counts_each_pair_once(device, dtype):
    """No gradient wanted: the kernel computes only the tiles j >= i and doubles them."""
    inputs = pair_inputs((2, 150, 130), dtype, device)
    with torch.no_grad():
        value = rf.manifold_loss(**inputs, backend="cuda")
    expected = literal_manifold(inputs["projected"].double(), inputs["target"].double())
    assert rel_err(value, expected) <= (1e-5 if dtype == torch.float32 else 1e-2)


def test_zero_rows_give_finite_losses_and_gradients(device):
    inputs = pair_inputs((2, 37, 50), torch.float32, device)
    inputs["projected"][0, :3] = 0.0
    assert_matches_reference(rf.manifold_loss, inputs, backend="cuda", grad_names=("projected",))
    assert_matches_reference(rf.cosine_alignment_loss, inputs, backend="cuda", grad_names=("projected",))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_parameter_gradients_scale_exactly_with_the_loss(device, dtype):
    """Half-precision GEMMs take dL/dz scaled by a power of two chosen from its magnitude: a tiny loss
    weight or a loss scaler's 2^16 scales the parameter gradients exactly (nothing flushed to zero or
    overflowing in float16)."""
    inputs, kwargs = make_inputs("bilinear-hidden", dtype, device)
    params = PROJECTION_ARGS[1:]

    def grads(scale):
        leaves = {k: v.clone().requires_grad_(k in params) for k, v in inputs.items()}
        align, manifold = rf.urepa_loss(**leaves, backend="cuda", **kwargs)
        return torch.autograd.grad(scale * (align + 3.0 * manifold), [leaves[n] for n in params])

    unscaled = grads(1.0)
    for scale in (2.0 ** -24, 2.0 ** 16):
        assert all(torch.equal(got / scale, want) for got, want in zip(grads(scale), unscaled))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16], ids=str)
def test_ops_match_their_fake_implementations(device, dtype):
    """torch.library.opcheck: the fake implementations torch.compile traces with give the real ops'
    shapes and dtypes (the projection's GEMM operand y is float16 for half-precision activations,
    float32 for the fused U-REPA head's fp32_gemm; without LayerNorm and resampling it is empty, as
    are the statistics without LayerNorm)."""
    inputs, _ = make_inputs("bilinear-hidden", dtype, device)
    args = [inputs[name] for name in PROJECTION_ARGS]
    hidden, ln_weight, _, proj_weight, _ = args
    for layer_norm, step, fp32_gemm in itertools.product((True, False), (None, Resample("bilinear", (8, 8), (6, 6))),
                                                         (False, True)):  # z of the last one resampled: 6 x 6
        head = args if layer_norm else [hidden, None, None, *args[3:]]
        code = cuda_backend._encode(step)
        torch.library.opcheck(cuda_backend._project,
                              (*(a if a is None else a.clone().requires_grad_() for a in head), code, 1e-5, fp32_gemm))
        z, y, mean, rstd = cuda_backend._project(*head, code, 1e-5, fp32_gemm)
        assert y.dtype == (torch.float32 if dtype == torch.float32 or fp32_gemm else torch.float16)
        needs = [True] * 5 if layer_norm else [True, False, False, True, True]
        torch.library.opcheck(cuda_backend._project_grads,
                              (torch.randn_like(z), hidden, head[1], proj_weight, y, mean, rstd, code, needs))
    target = inputs["target"]
    torch.library.opcheck(cuda_backend._resample_tokens,
                          (target, cuda_backend._encode(Resample("bilinear", (6, 6), (5, 5)))))
    for gram in (False, True):
        torch.library.opcheck(torch.ops.repa_fast.cuda_alignment_terms,
                              (z.detach().requires_grad_(), target, True, gram, True, dtype != torch.float32))


def test_float64_goes_to_the_reference(device):
    inputs, kwargs = make_inputs("bilinear-hidden", torch.float64, device, param_dtype=torch.float64)
    assert_matches_reference(rf.urepa_loss, inputs, backend="cuda", **kwargs)


def test_results_are_deterministic(device):
    inputs, kwargs = make_inputs("feature-map-bilinear", torch.bfloat16, device)
    first, second = (torch.autograd.grad(sum(rf.urepa_loss(**leaves, backend="cuda", **kwargs)),
                                         [leaves[n] for n in PROJECTION_ARGS])
                     for leaves in ({k: v.clone().requires_grad_(k in PROJECTION_ARGS) for k, v in inputs.items()}
                                    for _ in range(2)))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("layer_norm", [True, False], ids=["layernorm", "no-layernorm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_compile_fullgraph(device, dtype, layer_norm):
    if layer_norm:
        inputs, kwargs = make_inputs("feature-map-bilinear", dtype, device)
        loss, names = functools.partial(rf.urepa_loss, backend="cuda", **kwargs), PROJECTION_ARGS
    else:
        inputs, kwargs = linear_head_inputs("feature-map-bilinear", dtype, device)
        loss, names = functools.partial(head_losses, backend="cuda", manifold=True, **kwargs), LINEAR_HEAD_ARGS
    compiled = torch.compile(loss, fullgraph=True)

    def run(fn):
        leaves = {k: v.clone().requires_grad_(k in names) for k, v in inputs.items()}
        align, manifold = fn(**leaves)
        grads = torch.autograd.grad(align + 3.0 * manifold, [leaves[n] for n in names])
        return (align, manifold, *grads)

    eager = run(loss)
    for got, want in zip(run(compiled), eager):
        assert got.dtype == want.dtype and rel_err(got, want) <= 1e-6
