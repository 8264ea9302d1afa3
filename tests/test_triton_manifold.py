"""The triton backend's manifold loss and fused U-REPA head against the float64 reference
(DESIGN.md §4). Without a GPU the kernels run under the Triton interpreter (tests/conftest.py),
so the shapes stay tiny; the DESIGN.md §5 shapes run in bf16 only on a GPU."""
import importlib

import pytest
import torch

import repa_fast as rf
from parity import (LATE_TRAINING_NOISES, MLP_HEAD_ARGS, PROJECTION_ARGS, TOLERANCE, LargestAllocation,
                    assert_matches_reference, late_training_pair, literal_manifold, mlp_head_inputs, projection_inputs,
                    rel_err, without_layer_norm)
from repa_fast.backends import resolve_backend
from repa_fast.kernels import manifold

FORMS = ("direct", "gram")
INTERPRETER_DTYPES = (torch.float32, torch.float16)   # the interpreter has no bf16
GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"


@pytest.fixture
def force_form(monkeypatch):
    """force_form(name) makes every call take that form, whatever N and E."""
    def force(name):
        monkeypatch.setattr(manifold, "use_gram_form", lambda tokens, dim: name == "gram")
    return force


@pytest.fixture
def large_tiles(monkeypatch):
    """Makes the launchers take the first (largest) tile of each table: on the CPU, grids are tiny."""
    monkeypatch.setattr(manifold, "_num_sms", lambda device: 1)


def _pair(batch, tokens, dim, dtype=torch.float32):
    """The loss is scale-invariant and its gradient goes as 1 / |z|: small projections keep fp16
    gradients (about 4 sqrt(N) / (B N^2 E |z|)) out of fp16's subnormal range."""
    return {"projected": 0.01 * torch.randn(batch, tokens, dim, dtype=dtype, device=DEVICE),
            "target": torch.randn(batch, tokens, dim, dtype=dtype, device=DEVICE)}


def _aligned_pair(batch, tokens, dim, kind, dtype=torch.float32):
    """Inputs as after some training. "close": each projected row near its target row (noise
    0.05, cos ~ 0.999); "common": all rows near one direction (noise 0.3, pairwise cos ~ 0.92).
    The textbook Gram identity cancels catastrophically on both (fp32 loss errors 2e-5 and 1e-4)."""
    if kind == "close":
        target = torch.randn(batch, tokens, dim, dtype=torch.float64, device=DEVICE)
        projected = target + 0.05 * torch.randn_like(target)
    else:
        direction = torch.randn(batch, 1, dim, dtype=torch.float64, device=DEVICE)
        target = direction + 0.3 * torch.randn(batch, tokens, dim, dtype=torch.float64, device=DEVICE)
        projected = direction + 0.3 * torch.randn_like(target)
    return {"projected": (0.01 * projected).to(dtype), "target": target.to(dtype)}


def _assert_manifold_matches(inputs, tolerance=None):
    return assert_matches_reference(rf.manifold_loss, inputs, backend="triton", grad_names=("projected",),
                                    tolerance=tolerance)


# ---------------------------------------------------------------- parity, both forms

@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("batch, tokens, dim", [
    (2, 37, 13),      # N below one tile, E odd
    (3, 150, 21),     # N over several 64-tiles, not a multiple of one; two D-slab row chunks (direct)
])
def test_manifold_matches_reference(batch, tokens, dim, form, dtype, force_form):
    force_form(form)
    _assert_manifold_matches(_pair(batch, tokens, dim, dtype))


# DESIGN.md §4 for fp32; fp16 with a 4x margin under its 1e-2 (measured: 3-5e-4 on both forms).
# bf16 (GPU): the gradient's own bf16 rounding is 1.7e-3 of it, and a float64 emulation of the
# kernels' fp16 operands gives 1.7e-3 in all (the former bf16 ones 2e-3 direct, 7e-3 to 0.15 Gram).
ALIGNED_TOLERANCE = {torch.float32: TOLERANCE[torch.float32], torch.float16: 2.5e-3, torch.bfloat16: 3e-3}


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", ("close", "common"))
@pytest.mark.parametrize("batch, tokens, dim", [(2, 67, 21), (1, 131, 37)])
def test_aligned_inputs_match_reference(batch, tokens, dim, kind, form, dtype, force_form):
    """Projected rows close to the target rows, or all rows sharing a direction: the Gram form's
    S/D products and M minus its rank-one part keep both forms accurate."""
    force_form(form)
    _assert_manifold_matches(_aligned_pair(batch, tokens, dim, kind, dtype), ALIGNED_TOLERANCE[dtype])


@pytest.mark.parametrize("noise", LATE_TRAINING_NOISES)
@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
@pytest.mark.parametrize("form", FORMS)
def test_late_training_matches_torch(form, dtype, noise, force_form):
    """z -> t: no worse than the torch backend in the same dtype plus the DESIGN.md §4 margin."""
    force_form(form)
    assert_matches_reference(rf.manifold_loss, late_training_pair(2, 37, 61, noise, dtype=dtype, device=DEVICE),
                             backend="triton", grad_names=("projected",), ill_conditioned=True)


def _fused_head_manifold(projected, target, backend):
    """The fused head's manifold op as urepa_loss runs it with 16-bit activations: a fp32
    projection, a 16-bit target, fp16 operands."""
    if backend == "torch":
        return rf.manifold_loss(projected, target, backend="torch")
    return torch.ops.repa_fast.triton_manifold_loss(projected, target, projected.requires_grad, True)[0]


@pytest.mark.parametrize("noise", LATE_TRAINING_NOISES)
@pytest.mark.parametrize("form", FORMS)
def test_fused_head_operands_late_training_match_torch(form, noise, force_form):
    """The fp32 projection met by fp16 operands: the direct tiles multiply S = Zn + Tn and
    D = Zn - Tn, each rounded once, so D keeps its relative precision as z -> t (products of
    rounded Zn: 2e-1 at noise 0.001 against torch's 1.4e-4; now 4e-4, as the Gram form)."""
    force_form(form)
    inputs = late_training_pair(2, 37, 61, noise, target_dtype=torch.float16, device=DEVICE)
    assert_matches_reference(_fused_head_manifold, inputs, backend="triton", grad_names=("projected",),
                             tolerance=TOLERANCE[torch.float16], ill_conditioned=True)


def _urepa_manifold(**kwargs):
    return rf.urepa_loss(**kwargs)[1]


@pytest.mark.parametrize("form", FORMS)
def test_fused_head_operands_large_tiles(form, force_form, large_tiles):
    """The first (largest) tile of each table for a fp32 z with fp16 operands (the Gram gradient's
    own 128-wide tile, BLOCK_K 16), N and E spanning more than one."""
    force_form(form)
    inputs = late_training_pair(2, 133, 129, 0.05, target_dtype=torch.float16, device=DEVICE)
    assert_matches_reference(_fused_head_manifold, inputs, backend="triton", grad_names=("projected",),
                             tolerance=TOLERANCE[torch.float16])


@pytest.mark.parametrize("noise", LATE_TRAINING_NOISES[:2])
@pytest.mark.parametrize("form", FORMS)
def test_urepa_manifold_late_training_matches_torch(form, noise, force_form):
    """The fused head's manifold loss and all its gradients, fp32, as z -> t (hidden and target
    token counts equal: the target is the projection plus noise). Not held to it: noise 0.001,
    where the conditioning amplifies the fp32 projection's rounding past the absolute 1e-5 margin
    (LayerNorm parameter gradients 1.9e-4 against torch's 1.8e-4, both forms alike); the cosine
    term's gradients (1.5x torch's error)."""
    force_form(form)
    inputs = projection_inputs(2, 37, 24, 37, 61, noise=noise, device=DEVICE)
    assert_matches_reference(_urepa_manifold, inputs, backend="triton", ill_conditioned=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("tokens, target_tokens", [(9, 9), (36, 25)], ids=["same-count", "hidden-resampled"])
def test_urepa_without_layer_norm_matches_the_float64_reference(tokens, target_tokens, dtype):
    """The mlp head's last Linear fused with both losses (ln_weight = ln_bias = None): hidden, W, b."""
    inputs = mlp_head_inputs(2, tokens, 20, target_tokens, 13, dtype=dtype, device=DEVICE)
    assert_matches_reference(without_layer_norm("urepa_loss"), inputs, backend="triton", grad_names=MLP_HEAD_ARGS)


@pytest.mark.parametrize("noise", LATE_TRAINING_NOISES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_urepa_without_layer_norm_late_training_matches_torch(dtype, noise):
    """As z -> t, without LayerNorm: the projection stays fp32 (tf32x3 forward for 16-bit
    activations), so every gradient stays within the margin of torch's."""
    inputs = mlp_head_inputs(2, 37, 24, 37, 61, noise=noise, dtype=dtype, device=DEVICE)
    assert_matches_reference(without_layer_norm("urepa_loss"), inputs, backend="triton", grad_names=MLP_HEAD_ARGS,
                             ill_conditioned=True)


@pytest.mark.parametrize("noise", LATE_TRAINING_NOISES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("form", FORMS)
def test_urepa_16bit_late_training_matches_torch(form, dtype, noise, force_form):
    """The fused head with 16-bit activations as z -> t: both losses and all gradients within the
    margin of torch's (which projects in fp32). Its projection's forward GEMM multiplies fp32
    operands (tf32x3): with fp16 operands z was off by ~3e-4 of itself, 28% of z - t at noise
    0.001, and the LayerNorm weight's gradient 0.83 off (torch: 0.24)."""
    force_form(form)
    inputs = projection_inputs(2, 37, 24, 37, 61, noise=noise, dtype=dtype, device=DEVICE)
    assert_matches_reference(rf.urepa_loss, inputs, backend="triton", ill_conditioned=True)


def test_gram_m_scale_keeps_fp16_in_range():
    """|M - R| <= 4N: times m_scale its bound lies in (2 M_RANGE, 4 M_RANGE], below fp16's max."""
    for tokens in (1, 37, 1000, 4096, 8192, 16384, 100_000):
        bound = 4 * tokens * manifold.gram_m_scale(tokens)
        assert 2 * manifold.M_RANGE < bound <= 4 * manifold.M_RANGE < torch.finfo(torch.float16).max


@pytest.mark.parametrize("form", FORMS)
def test_manifold_large_tiles_match_reference(form, force_form, large_tiles):
    """The first (largest) half-precision tile of each table, with N and E spanning more than one."""
    force_form(form)
    _assert_manifold_matches(_pair(2, 133, 129, torch.float16))


@pytest.mark.parametrize("form", FORMS)
def test_many_row_chunks_match_reference(form, force_form, monkeypatch):
    """A small scratch budget: the direct form's D slab and the Gram form's g slab in many
    chunks of a few rows (partial tiles)."""
    force_form(form)
    monkeypatch.setattr(manifold, "SCRATCH_ELEMENTS", 1500)
    _assert_manifold_matches(_pair(2, 100, 21))


@pytest.mark.parametrize("form", FORMS)
def test_manifold_loss_only_matches_reference(form, force_form):
    """Without a gradient the direct form runs only the tiles J >= I."""
    force_form(form)
    inputs = _pair(2, 150, 21)
    with torch.no_grad():
        loss = rf.manifold_loss(inputs["projected"], inputs["target"], backend="triton")
    expected = literal_manifold(inputs["projected"].double(), inputs["target"].double())
    assert rel_err(loss, expected) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
def test_the_two_forms_agree_on_the_same_inputs(dtype, force_form):
    inputs = _pair(2, 70, 19, dtype)
    results = {}
    for form in FORMS:
        force_form(form)
        z = inputs["projected"].clone().requires_grad_()
        loss = manifold.manifold_loss(z, inputs["target"])
        loss.backward()
        results[form] = (loss, z.grad)
    (loss_d, grad_d), (loss_g, grad_g) = results["direct"], results["gram"]
    assert rel_err(loss_g, loss_d) <= TOLERANCE[dtype] and rel_err(grad_g, grad_d) <= TOLERANCE[dtype]


@pytest.mark.parametrize("form", FORMS)
def test_strided_views_match_reference(form, force_form):
    """Inputs read through their strides: (B, N, E) views of (B, E, N) tensors, no copy."""
    force_form(form)
    inputs = {k: v.transpose(1, 2).contiguous().transpose(1, 2) for k, v in _pair(2, 40, 13).items()}
    assert inputs["projected"].stride(-1) != 1
    _assert_manifold_matches(inputs)


def test_one_token_per_sample(force_form):
    """N = 1: D is |zn|^2 - |tn|^2, 1 where one side is a zero row; the gradient is zero."""
    inputs = _pair(3, 1, 7)
    inputs["target"][0] = 0.0
    inputs["projected"][1] = 0.0
    for form in FORMS:
        force_form(form)
        z = inputs["projected"].clone().requires_grad_()
        loss = manifold.manifold_loss(z, inputs["target"])
        loss.backward()
        assert loss.item() == pytest.approx(2.0 / 3.0, rel=1e-6)
        assert torch.isfinite(z.grad).all() and z.grad.abs().max().item() < 1e-5


@pytest.mark.parametrize("form", FORMS)
def test_zero_norm_rows(form, force_form):
    """F.normalize semantics: zero rows give finite losses and gradients, equal to the reference's."""
    force_form(form)
    inputs = _pair(2, 40, 13)
    inputs["projected"][0, [3, 17]] = 0.0
    inputs["target"][0, [5, 17]] = 0.0
    inputs["target"][1, 39] = 0.0
    _assert_manifold_matches(inputs)


# ---------------------------------------------------------------- fused U-REPA head

@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
@pytest.mark.parametrize("form", FORMS)
def test_urepa_matches_reference(form, dtype, force_form):
    force_form(form)
    inputs = projection_inputs(2, 36, 24, 25, 20, dtype=dtype)    # 6x6 hidden grid resampled to 5x5
    assert_matches_reference(rf.urepa_loss, inputs, backend="triton")


@pytest.mark.parametrize("form", FORMS)
def test_urepa_half_activations_keep_the_projection_fp32(form, force_form):
    """With 16-bit activations the projection stays fp32 into the op (its operands are made fp16
    there): its manifold gradient (SDXL U-REPA: median 1.2e-9) lies below fp16's smallest
    subnormal, 6e-8, and would flush to zero. A large projector brings this small case there."""
    force_form(form)
    inputs = projection_inputs(2, 36, 24, 25, 20, dtype=torch.float16)
    inputs["proj_weight"] *= 1e4
    inputs["proj_bias"] *= 1e4
    errors = assert_matches_reference(rf.urepa_loss, inputs, backend="triton")
    assert errors["out1/proj_weight"] <= TOLERANCE[torch.float16]


def test_urepa_feature_map_matches_reference():
    inputs = projection_inputs(2, (4, 5), 16, 20, 11, feature_map=True)
    assert_matches_reference(rf.urepa_loss, inputs, backend="triton")


# ---------------------------------------------------------------- determinism, memory, dispatch

@pytest.mark.parametrize("form", FORMS)
def test_bitwise_deterministic(form, force_form):
    force_form(form)
    inputs = projection_inputs(2, 70, 16, 70, 19)
    runs = []
    for _ in range(2):
        leaves = {k: v.clone().requires_grad_(k in PROJECTION_ARGS) for k, v in inputs.items()}
        align, manifold_value = rf.urepa_loss(**leaves, backend="triton")
        (align + 3.0 * manifold_value).backward()
        runs.append([align, manifold_value] + [leaves[k].grad for k in PROJECTION_ARGS])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("form", FORMS)
def test_no_allocation_of_b_n_n(form, force_form):
    """Forward and backward at a size where B x N x N dwarfs everything else. The op's own
    allocations happen below the dispatcher (a custom op is opaque to dispatch modes), so the
    implementation is also run directly under the probe."""
    force_form(form)
    batch, tokens, dim = 2, 200, 8
    z = torch.randn(batch, tokens, dim, device=DEVICE, requires_grad=True)
    t = torch.randn(batch, tokens, dim, device=DEVICE)
    with LargestAllocation() as probe:
        manifold.manifold_loss(z, t).backward()
        manifold._losses_and_grads(z.detach(), t, with_grad=True, with_align=True, half=False)
    assert z.numel() <= probe.numel < batch * tokens * tokens


def test_auto_backend_picks_triton_for_cuda_tensors(monkeypatch):
    """Dispatch looks only at the device type, so this runs without a GPU."""
    monkeypatch.delenv("REPA_FAST_BACKEND", raising=False)
    triton_backend = importlib.import_module("repa_fast.kernels.backend")
    assert resolve_backend(None, torch.device("cuda")) is triton_backend
    # wrapped only to send float64 inputs to the torch backend
    assert triton_backend.manifold_loss.__wrapped__ is manifold.manifold_loss
    assert triton_backend.urepa_loss.__wrapped__ is manifold.urepa_loss


def test_fp32_runs_after_tf32_is_set_through_the_new_api():
    """torch.get_float32_matmul_precision() raises once fp32_precision = "tf32" is set: the kernels
    must read the setting the way that works with both APIs."""
    z, t = torch.randn(2, 37, 13, device=DEVICE), torch.randn(2, 37, 13, device=DEVICE)
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        value = rf.manifold_loss(z, t, backend="triton")
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous
    assert rel_err(value, literal_manifold(z.double(), t.double())) <= 1e-3


def test_float64_is_refused():
    inputs = _pair(1, 5, 4, torch.float64)
    with pytest.raises(TypeError, match="float64"):
        manifold.manifold_loss(inputs["projected"], inputs["target"])


# ---------------------------------------------------------------- torch.library / torch.compile

def test_ops_pass_opcheck():
    z, t = torch.randn(2, 9, 6, device=DEVICE), torch.randn(2, 9, 6, device=DEVICE)
    for op in (torch.ops.repa_fast.triton_manifold_loss.default, torch.ops.repa_fast.triton_urepa_losses.default):
        for with_grad in (False, True):
            for half in (False, True):
                torch.library.opcheck(op, (z.clone().requires_grad_(with_grad), t.to(torch.float16), with_grad, half))
    t_affine = torch.ops.repa_fast.triton_target_zscore(t, 0.6)   # iREPA's z-score, on load
    for z, t in ((z, t), (torch.randn(2, 37, 6, device=DEVICE), torch.randn(2, 37, 6, device=DEVICE))):  # direct, Gram
        for with_grad in (False, True):
            torch.library.opcheck(torch.ops.repa_fast.triton_manifold_loss.default,
                                  (z.clone().requires_grad_(with_grad), t, with_grad, False, t_affine))


def test_torch_compile_fullgraph():
    inputs = projection_inputs(2, 25, 12, 25, 9, device=DEVICE)

    def losses(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias, projected):
        align, manifold_value = rf.urepa_loss(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias,
                                              backend="triton")
        return align + 3.0 * manifold_value + rf.manifold_loss(projected, target, backend="triton")

    compiled = torch.compile(losses, fullgraph=True, backend="inductor" if GPU else "aot_eager")
    inputs["projected"] = torch.randn(2, 25, 9, device=DEVICE)
    grad_names = PROJECTION_ARGS + ("projected",)
    results = []
    for fn in (losses, compiled):
        leaves = {k: v.clone().requires_grad_(k in grad_names) for k, v in inputs.items()}
        out = fn(**leaves)
        out.backward()
        results.append([out] + [leaves[k].grad for k in grad_names])
    for eager, traced in zip(*results):
        assert rel_err(traced, eager) <= 1e-6


# ---------------------------------------------------------------- GPU, bf16, DESIGN.md §5 shapes

@pytest.mark.gpu
@pytest.mark.parametrize("batch, tokens, dim", [(4, 1369, 1536), (16, 1024, 1536), (4, 4096, 1536), (2, 16384, 1024)])
def test_gpu_manifold_bf16_design_shapes(batch, tokens, dim):
    _assert_manifold_matches(_pair(batch, tokens, dim, torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", ("close", "common"))
@pytest.mark.parametrize("batch, tokens, dim", [(4, 1369, 1536), (2, 4096, 1024)])
def test_gpu_aligned_bf16_matches_reference(batch, tokens, dim, kind, form, force_form):
    """bf16 inputs as after training, with fp16 rounded operands (normalised rows, D, S, M)."""
    force_form(form)
    _assert_manifold_matches(_aligned_pair(batch, tokens, dim, kind, torch.bfloat16), ALIGNED_TOLERANCE[torch.bfloat16])


@pytest.mark.gpu
def test_gpu_urepa_bf16_gram_form():
    """The fused head in the Gram form (N = 4096 > 5E/3): fp32 projection, bf16 target, fp16 operands."""
    inputs = projection_inputs(2, (64, 64), 640, 64 * 64, 768, dtype=torch.bfloat16, device="cuda", feature_map=True)
    assert_matches_reference(rf.urepa_loss, inputs, backend="triton")


@pytest.mark.gpu
def test_gpu_urepa_bf16_sdxl_shape():
    inputs = projection_inputs(8, (32, 32), 1280, 37 * 37, 1536, dtype=torch.bfloat16, device="cuda",
                               feature_map=True)
    assert_matches_reference(rf.urepa_loss, inputs, backend="triton")


@pytest.mark.gpu
def test_gpu_n16384_peak_memory_and_determinism():
    """DESIGN.md §5: B2 N16384 E1024 under 200 MiB above the inputs, bitwise reproducible."""
    z = torch.randn(2, 16384, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(2, 16384, 1024, device="cuda", dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        z.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = rf.manifold_loss(z, t, backend="triton")
        loss.backward()
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() - base <= 200 * 2 ** 20
        runs.append((loss.detach().clone(), z.grad.clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
