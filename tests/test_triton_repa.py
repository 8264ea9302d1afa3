"""The triton backend of repa_loss and of the projection half of urepa_loss
(kernels/projection.py) against the float64 torch reference (DESIGN.md §4).

Without a GPU the kernels run under the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1): fp32, fp16 and bf16, tiny odd shapes. The interpreter cannot multiply bf16
tiles, but it loads bf16 exactly and stores it truncated (not rounded, so a little worse than a
GPU): bf16 activations run here because their GEMM operands are fp16 (a bf16 `tl.dot` would give
garbage and fail these tests). `@pytest.mark.gpu` tests add model-sized shapes where CUDA exists.
"""
import pytest
import torch

pytest.importorskip("triton")

import repa_fast as rf  # noqa: E402
from repa_fast import reference  # noqa: E402
from repa_fast.alignment import plan_alignment, resample_taps  # noqa: E402
from repa_fast.kernels import projection  # noqa: E402
from parity import (LATE_TRAINING_NOISES, MLP_HEAD_ARGS, LargestAllocation, PROJECTION_ARGS, TOLERANCE,  # noqa: E402
                    assert_matches_reference, mlp_head_inputs, outputs_and_grads, projection_inputs, rel_err,
                    without_layer_norm)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


# id: (batch, hidden tokens or feature-map grid, D, target tokens, E, keyword arguments)
CASES = {
    "same-count": (2, 7, 20, 7, 13, {}),
    "one-token": (3, 1, 19, 1, 11, {}),
    "square-grids-hidden-shrinks": (2, 36, 20, 25, 13, {}),   # bilinear before the GEMM
    "square-grids-target-shrinks": (2, 9, 20, 25, 13, {}),
    "non-square-grids": (2, 24, 18, 15, 10, {"hidden_grid": (4, 6), "target_grid": (3, 5)}),
    "equal-counts-grids-differ": (1, 24, 18, 24, 10, {"hidden_grid": (4, 6), "target_grid": (6, 4)}),
    "1d-fallback-hidden-shrinks": (2, 21, 20, 13, 13, {}),
    "1d-fallback-target-shrinks": (2, 13, 20, 21, 13, {}),
    "spatial-align-off": (2, 20, 20, 12, 13, {"spatial_align": False}),
    "feature-map": (2, (5, 6), 17, 30, 9, {}),
    "feature-map-resampled": (2, (5, 6), 17, 20, 9, {"target_grid": (4, 5)}),
    "multi-tile": (2, 70, 130, 70, 130, {}),                  # several row, E and D tiles
    "row-split": (2, 300, 20, 300, 13, {}),                   # the weight gradient split over rows
}
DTYPES = {"fp32": (F32, F32), "fp16": (F16, F32), "fp16-params-fp16": (F16, F16), "bf16": (BF16, F32)}


def _case_inputs(case, dtype, param_dtype):
    batch, hidden, dim, target, encoder_dim, kwargs = CASES[case]
    inputs = projection_inputs(batch, hidden, dim, target, encoder_dim, dtype=dtype, param_dtype=param_dtype,
                               feature_map=isinstance(hidden, tuple), device=DEVICE)
    return inputs, kwargs


@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_repa_loss_and_gradients_match_the_float64_reference(case, dtypes):
    dtype, param_dtype = DTYPES[dtypes]
    inputs, kwargs = _case_inputs(case, dtype, param_dtype)
    assert_matches_reference(rf.repa_loss, inputs, backend="triton", **kwargs)


# fp16 gradients of a mean over this many rows fall into fp16's subnormals (the torch backend's own
# then err ~1.3e-2 for hidden): trainers scale the loss (torch.amp.GradScaler), and so does this test.
LOSS_SCALE = 2.0 ** 12


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("target_tokens", [256, 144], ids=["same-count", "hidden-resampled"])
def test_16bit_errors_stay_well_inside_the_tolerance_at_a_model_like_size(dtype, target_tokens):
    """fp16 GEMM operands and saved z for both 16-bit dtypes: every error at most half of the 1e-2
    tolerance on a trained-like projection (with bf16 operands a float64 emulation of this shape
    reaches 1.2e-2 for ln_weight)."""
    inputs = projection_inputs(2, 256, 384, target_tokens, 192, dtype=dtype, device=DEVICE)
    errors = assert_matches_reference(lambda **kw: rf.repa_loss(**kw) * LOSS_SCALE, inputs, backend="triton")
    assert max(errors.values()) <= 0.5 * TOLERANCE[dtype], errors


@pytest.mark.filterwarnings("ignore:(overflow|invalid value):RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
def test_projection_beyond_the_fp16_range_gives_a_nan_loss(dtype):
    """16-bit activations keep z in fp16: |z| >= 65504 (absurd weights) must show in the loss, not
    only as inf gradients behind a finite loss."""
    inputs = projection_inputs(2, 7, 20, 7, 13, dtype=dtype, device=DEVICE)
    inputs["proj_weight"] *= 1e5
    with torch.no_grad():
        assert torch.isnan(rf.repa_loss(**inputs, backend="triton"))



@pytest.mark.parametrize("target_dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["same-count", "square-grids-target-shrinks"])
def test_a_target_in_another_dtype_keeps_its_precision(case, target_dtype):
    """fp16 hidden, a 1e-8-scale target in fp32 or bf16: read as fp32 (exactly), never cast to
    fp16, where it would vanish (the loss was -1.4e-4 instead of -5.8e-2)."""
    inputs, kwargs = _case_inputs(case, F16, F32)
    inputs["target"] = (inputs["target"].double() * 1e-8).to(target_dtype)
    assert_matches_reference(rf.repa_loss, inputs, backend="triton", **kwargs)


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("gamma", [1e-2, 1e-3])
def test_small_layernorm_weight_with_a_large_bias(dtype, gamma):
    """|b| ~ 10 >> |gamma|: the LayerNorm backward's z - bf is kept bias-free from the forward on
    (it cancelled: dL/dh rel. err. fp32 6e-5, bf16 0.3 at gamma 1e-3, torch 1.6e-3)."""
    inputs = projection_inputs(2, 7, 20, 7, 13, dtype=dtype, device=DEVICE)
    inputs["ln_weight"] = torch.full_like(inputs["ln_weight"], gamma)
    inputs["ln_bias"] = torch.randn_like(inputs["ln_bias"]) * 10
    # loss-scaled as a trainer does: dL/dh ~ gamma / rows lies in fp16's subnormals
    assert_matches_reference(lambda **kw: rf.repa_loss(**kw) * LOSS_SCALE, inputs, backend="triton")

# ---------------------------------------------------------------- no LayerNorm (the mlp head's last Linear)

# id: (batch, hidden tokens, D, target tokens, E); the grids are square
MLP_HEAD_CASES = {"same-count": (2, 9, 20, 9, 13), "hidden-resampled": (2, 36, 20, 25, 13),
                  "target-resampled": (2, 9, 20, 25, 13),
                  "row-split": (2, 300, 20, 300, 13)}  # the weight gradient split over rows


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", MLP_HEAD_CASES)
def test_repa_loss_without_layer_norm_matches_the_float64_reference(case, dtype):
    """ln_weight = ln_bias = None: z = align(x W^T + b) on SiLU activations; hidden, W, b."""
    inputs = mlp_head_inputs(*MLP_HEAD_CASES[case], dtype=dtype, device=DEVICE)
    assert_matches_reference(without_layer_norm("repa_loss"), inputs, backend="triton", grad_names=MLP_HEAD_ARGS)


@pytest.mark.parametrize("noise", LATE_TRAINING_NOISES)
@pytest.mark.parametrize("case", ["same-count", "hidden-resampled"])
def test_repa_loss_without_layer_norm_late_training_matches_torch(case, noise):
    """z -> t: the cosine's gradient alpha t + beta z cancels, and its conditioning (~1 / noise)
    scales every rounding, torch's too (fp32 at 0.001: 1e-4): within a margin of the torch
    backend's error that scales with it. fp32 only: repa_loss keeps z in fp16 from fp16 operands
    for 16-bit activations, with or without LayerNorm, and as z -> t its gradients err far more
    than torch's, which projects in fp32 (no LayerNorm, measured: noise 0.05 up to 1.4e-2 against
    torch's 2e-3, 0.01 2-3e-2 against 3e-4 to 2e-3, 0.001 0.1-0.35 against 2e-3 to 7e-3)."""
    dtype = F32
    inputs = mlp_head_inputs(*MLP_HEAD_CASES[case], dtype=dtype, device=DEVICE, noise=noise)
    assert_matches_reference(without_layer_norm("repa_loss"), inputs, backend="triton", grad_names=MLP_HEAD_ARGS,
                             tolerance=TOLERANCE[dtype] * max(1.0, 1e-2 / noise), ill_conditioned=True)


def test_without_layer_norm_there_are_no_layer_norm_gradients_and_no_layer_norm_work(monkeypatch):
    """The autograd returns None for ln_weight and ln_bias; no statistics, fold, dgamma or
    dbeta kernel runs."""
    inputs = mlp_head_inputs(*MLP_HEAD_CASES["hidden-resampled"], dtype=F16, device=DEVICE)
    launched = []
    for name in ("_ln_stats_kernel", "_fold_params_kernel", "_weight_t_vec_kernel"):
        monkeypatch.setattr(projection, name, _Forbidden(name, launched))
    leaves = [inputs[name].requires_grad_() for name in MLP_HEAD_ARGS]
    plan = plan_alignment(36, 25)
    args = (leaves[0], inputs["target"], None, None, *leaves[1:], plan, 0.0)
    loss = projection.repa_loss(*args)
    z, _ = projection.aligned_projection(*args)
    grads = torch.autograd.grad(loss + z.sum(), leaves)
    assert not launched and all(torch.isfinite(grad).all() for grad in grads)
    for op in (torch.ops.repa_fast.triton_repa_loss, torch.ops.repa_fast.triton_aligned_projection):
        schema = str(op.default._schema)
        assert "Tensor? ln_weight" in schema and "Tensor? ln_bias" in schema, schema


class _Forbidden:
    def __init__(self, name, launched):
        self.name, self.launched = name, launched

    def __getitem__(self, grid):
        self.launched.append(self.name)
        raise AssertionError(f"{self.name} launched without LayerNorm")


def test_row_split_and_tile_counts_are_exercised():
    """The cases above reach the split weight-gradient path and multi-tile grids."""
    batch, tokens, dim, _, encoder_dim, _ = CASES["row-split"]
    config = projection.GEMM_CONFIGS["dw", projection.operand_class(F32)]
    _, splits = projection.dw_split(batch * tokens, encoder_dim, dim, config, torch.device(DEVICE))
    assert splits > 1
    batch, tokens, _, _, encoder_dim, _ = CASES["multi-tile"]
    fwd = projection.GEMM_CONFIGS["fwd", projection.operand_class(F32)]
    assert batch * tokens > fwd.block_m and encoder_dim > fwd.block_n


def _probe_projection(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias, *, backend, plan, probe):
    """<aligned_projection's z, probe>: its gradient hands z's backward an arbitrary dL/dz."""
    module = reference if backend == "torch" else projection
    if hidden.dim() == 4:
        hidden = hidden.flatten(2).transpose(1, 2)
    z, t = module.aligned_projection(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias, plan, 1e-5)
    return (z.double() * probe).sum() + (t.double() * probe).sum()


@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", ["same-count", "square-grids-hidden-shrinks", "square-grids-target-shrinks",
                                  "spatial-align-off", "feature-map", "multi-tile"])
def test_aligned_projection_backward_takes_any_grad(case, dtype):
    inputs, kwargs = _case_inputs(case, dtype, F32)
    hidden = inputs["hidden"]
    grid = tuple(hidden.shape[2:]) if hidden.dim() == 4 else None
    tokens = hidden.shape[2] * hidden.shape[3] if grid else hidden.shape[1]
    plan = plan_alignment(tokens, inputs["target"].shape[1], kwargs.get("hidden_grid", grid),
                          kwargs.get("target_grid"), kwargs.get("spatial_align", True))
    probe = torch.randn(hidden.shape[0], plan.tokens, inputs["target"].shape[2], dtype=torch.float64, device=DEVICE)
    assert_matches_reference(_probe_projection, inputs, backend="triton", plan=plan, probe=probe)


def test_aligned_projection_returns_fp32_z_and_the_target_in_its_dtype():
    inputs = projection_inputs(2, 36, 20, 25, 13, dtype=F16, device=DEVICE)
    plan = plan_alignment(36, 25)
    z, t = projection.aligned_projection(*(inputs[k] for k in ("hidden", "target", "ln_weight", "ln_bias",
                                                               "proj_weight", "proj_bias")), plan, 1e-5)
    assert z.dtype == F32 and z.shape == (2, 25, 13)
    assert t is inputs["target"] or t.data_ptr() == inputs["target"].data_ptr()
    assert not t.requires_grad


COSINE_DTYPES = {"fp32": (F32, F32), "fp16": (F16, F16), "fp32-z-fp16-t": (F32, F16)}


@pytest.mark.parametrize("dtypes", COSINE_DTYPES)
@pytest.mark.parametrize("shape", [(2, 13, 37), (1, 1, 5), (3, 40, 300)], ids=str)
def test_cosine_alignment_loss_matches_the_float64_reference(shape, dtypes):
    z_dtype, t_dtype = COSINE_DTYPES[dtypes]
    z = torch.randn(*shape, device=DEVICE)
    inputs = {"projected": z.to(z_dtype), "target": (z + 0.5 * torch.randn_like(z)).to(t_dtype)}
    assert_matches_reference(rf.cosine_alignment_loss, inputs, backend="triton", grad_names=("projected",))


def test_zero_norm_rows_give_finite_loss_and_gradients():
    z, t = torch.randn(2, 9, 11, device=DEVICE), torch.randn(2, 9, 11, device=DEVICE)
    z[0, 3] = 0.0
    t[1, 4] = 0.0
    assert_matches_reference(rf.cosine_alignment_loss, {"projected": z, "target": t}, backend="triton",
                             grad_names=("projected",))
    inputs = projection_inputs(2, 7, 20, 7, 13, device=DEVICE)
    inputs["ln_bias"].zero_()
    inputs["proj_bias"].zero_()
    inputs["hidden"][1, 2] = 3.0  # a constant row: LayerNorm output 0, so z = 0 there
    assert_matches_reference(rf.repa_loss, inputs, backend="triton")


def _assert_bitwise_reproducible(inputs, **kwargs):
    """Two identical repa_loss calls give the same loss and gradients, bit for bit."""
    first, second = (outputs_and_grads(rf.repa_loss, inputs, PROJECTION_ARGS, backend="triton", **kwargs)
                     for _ in range(2))
    assert all(torch.equal(first[key], second[key]) for key in first)


@pytest.mark.parametrize("case", ["row-split", "square-grids-hidden-shrinks"])
def test_results_are_bitwise_reproducible(case):
    inputs, kwargs = _case_inputs(case, F32, F32)
    _assert_bitwise_reproducible(inputs, **kwargs)


class LargestNewStorage(LargestAllocation):
    """LargestAllocation counting only outputs in new storage: the Triton interpreter re-wraps each
    argument's storage (set_) around every launch, which allocates nothing."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {a.untyped_storage().data_ptr() if isinstance(a, torch.Tensor) else a.data_ptr()
                 for a in list(args) + list((kwargs or {}).values())
                 if isinstance(a, (torch.Tensor, torch.UntypedStorage))}
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("resampled", [False, True])
def test_forward_reads_a_feature_map_in_place_and_writes_no_layernorm_output(resampled, monkeypatch):
    """The transposed token view of a (B, C, H, W) map reaches the kernels as it is (no copy), and
    the forward allocates nothing of the hidden's size (E < D: z is smaller; no LayerNorm output)."""
    inputs = projection_inputs(2, (6, 6), 24, 25 if resampled else 36, 8, feature_map=True, device=DEVICE)
    feature_map = inputs["hidden"]
    seen = []
    ln_stats = projection._ln_stats
    monkeypatch.setattr(projection, "_ln_stats", lambda hidden, eps: seen.append(hidden) or ln_stats(hidden, eps))
    with torch.no_grad():
        loss = rf.repa_loss(**inputs, backend="triton")
    assert torch.isfinite(loss)
    (hidden,) = seen
    assert hidden.data_ptr() == feature_map.data_ptr() and not hidden.is_contiguous()
    plan = plan_alignment(36, inputs["target"].shape[1], (6, 6))
    params = [inputs[k] for k in PROJECTION_ARGS[1:]]
    with torch.no_grad(), LargestNewStorage() as probe:  # the forward's steps, outside the op
        stats, xa, w_folded, folded = projection._forward_common(hidden, *params, plan.a, 1e-5, hidden.dtype)
        x, x_stats = projection._projected_rows(hidden, stats, xa)
        projection._projection_forward(x, x_stats, w_folded, folded, inputs["target"], hidden.dtype,
                                       projection.operand_class(hidden.dtype))
    assert 0 < probe.numel < feature_map.numel()


@pytest.mark.parametrize("dtype", [F32, F16])
def test_urepa_on_a_feature_map_in_place_takes_its_own_tiles(dtype, monkeypatch):
    """A (B, C, h, w) map not resampled (U-REPA at the target's grid): the forward and the fused dx
    GEMM read it in place with FEATURE_MAP_GEMM_CONFIGS' tiles, and match the float64 reference."""
    inputs = projection_inputs(2, (4, 5), 24, 20, 8, dtype=dtype, feature_map=True, device=DEVICE)
    asked = []
    gemm_config = projection.gemm_config
    monkeypatch.setattr(projection, "gemm_config",
                        lambda kind, operands, feature_map: asked.append((kind, feature_map))
                        or gemm_config(kind, operands, feature_map))
    assert_matches_reference(rf.urepa_loss, inputs, backend="triton")
    assert {("fwd", True), ("dx", True)} <= set(asked)


def test_torch_compile_fullgraph_traces_the_ops():
    """The custom ops (fake impls, autograd) under torch.compile(fullgraph=True): repa_loss, and
    aligned_projection + cosine_alignment_loss as U-REPA uses them; same values as eager."""
    inputs = projection_inputs(2, 36, 20, 25, 13, device=DEVICE)
    plan = plan_alignment(36, 25)

    def losses(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias):
        repa = rf.repa_loss(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias, backend="triton")
        z, t = projection.aligned_projection(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias, plan, 1e-5)
        return repa + 0.5 * projection.cosine_alignment_loss(z, t)

    compiled = torch.compile(losses, fullgraph=True)
    args = ("hidden", "target") + PROJECTION_ARGS[1:]
    eager = outputs_and_grads(lambda **kw: losses(*(kw[k] for k in args)), inputs, PROJECTION_ARGS)
    traced = outputs_and_grads(lambda **kw: compiled(*(kw[k] for k in args)), inputs, PROJECTION_ARGS)
    for key, value in eager.items():
        assert rel_err(traced[key], value) < 1e-6, key


def test_torch_compile_fullgraph_traces_the_ops_without_layer_norm():
    """The mlp head's call (ln_weight = ln_bias = None) under torch.compile(fullgraph=True):
    repa_loss and urepa_loss, same values and gradients as eager."""
    inputs = mlp_head_inputs(*MLP_HEAD_CASES["hidden-resampled"], device=DEVICE)
    repa, urepa = without_layer_norm("repa_loss"), without_layer_norm("urepa_loss")

    def losses(hidden, target, proj_weight, proj_bias):
        align, manifold_term = urepa(hidden, target, proj_weight, proj_bias, backend="triton")
        return repa(hidden, target, proj_weight, proj_bias, backend="triton") + align + manifold_term

    compiled = torch.compile(losses, fullgraph=True)
    args = ("hidden", "target", "proj_weight", "proj_bias")
    eager = outputs_and_grads(lambda **kw: losses(*(kw[k] for k in args)), inputs, MLP_HEAD_ARGS)
    traced = outputs_and_grads(lambda **kw: compiled(*(kw[k] for k in args)), inputs, MLP_HEAD_ARGS)
    for key, value in eager.items():
        assert rel_err(traced[key], value) < 1e-6, key


@pytest.mark.parametrize("resampled", [False, True], ids=["same-count", "resampled"])
def test_ops_pass_opcheck_without_layer_norm(resampled):
    """The ops with ln_weight = ln_bias = None (Tensor? in their schemas), fp16 activations."""
    inputs = mlp_head_inputs(2, 16, 10, 9 if resampled else 16, 7, dtype=F16, device=DEVICE)
    hidden = inputs["hidden"].requires_grad_()
    params = [None, None, inputs["proj_weight"].requires_grad_(), inputs["proj_bias"].requires_grad_()]
    step = ["bilinear", [4, 4], [3, 3]] if resampled else ["none", [], []]
    ops = torch.ops.repa_fast
    _, z, stats, xa, row_terms, w_folded, folded = ops.triton_repa_loss(hidden, inputs["target"], *params, *step, 0.0)
    aligned_z = ops.triton_aligned_projection(hidden, *params, *step, 0.0)[0].detach()
    saved = [x.detach() if isinstance(x, torch.Tensor) else x
             for x in (hidden, stats, xa, *params[:3], w_folded, folded, *step)]
    z, row_terms = z.detach(), row_terms.detach()
    cases = [
        (ops.triton_repa_loss.default, (hidden, inputs["target"], *params, *step, 0.0)),
        (ops.triton_aligned_projection.default, (hidden, *params, *step, 0.0)),
        (ops.triton_projection_backward.default, (None, z, inputs["target"], row_terms, torch.ones(()), *saved)),
        (ops.triton_projection_backward.default, (torch.randn_like(aligned_z), aligned_z, None, None, None, *saved)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("dtype,resampled", [(F32, False), (F32, True), (BF16, True)],
                         ids=["fp32", "fp32-resampled", "bf16-resampled"])
def test_ops_pass_opcheck(dtype, resampled):
    """Schema, fake impls (shapes, dtypes — fp16 operand buffers for bf16 —, strides) and autograd
    registration of every op."""
    inputs = projection_inputs(2, (4, 4), 10, 9 if resampled else 16, 7, dtype=dtype, feature_map=True,
                               device=DEVICE)
    hidden = inputs["hidden"].flatten(2).transpose(1, 2).requires_grad_()
    params = [inputs[k].requires_grad_() for k in PROJECTION_ARGS[1:]]
    step = ["bilinear", [4, 4], [3, 3]] if resampled else ["none", [], []]
    ops = torch.ops.repa_fast
    _, z, stats, xa, row_terms, w_folded, folded = ops.triton_repa_loss(hidden, inputs["target"], *params, *step,
                                                                        1e-5)
    aligned_z = ops.triton_aligned_projection(hidden, *params, *step, 1e-5)[0]
    saved = [x.detach() if isinstance(x, torch.Tensor) else x
             for x in (hidden, stats, xa, *params[:3], w_folded, folded, *step)]  # backward ops: no double backward
    z, row_terms, aligned_z = z.detach(), row_terms.detach(), aligned_z.detach()
    cases = [
        (ops.triton_repa_loss.default, (hidden, inputs["target"], *params, *step, 1e-5)),
        (ops.triton_aligned_projection.default, (hidden, *params, *step, 1e-5)),
        (ops.triton_projection_backward.default, (None, z, inputs["target"], row_terms, torch.ones(()), *saved)),
        (ops.triton_projection_backward.default, (torch.randn_like(aligned_z), aligned_z, None, None, None, *saved)),
        (ops.triton_target_zscore.default, (inputs["target"], 0.6)),
    ]
    for t_affine in (None, ops.triton_target_zscore(inputs["target"], 0.6)):  # iREPA's z-score on load, or none
        cases += [(ops.triton_cosine_alignment.default, (z.clone().requires_grad_(), inputs["target"], t_affine)),
                  (ops.triton_cosine_alignment_backward.default, (z, inputs["target"], t_affine, row_terms,
                                                                  torch.ones(())))]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_backend_dispatch_and_dtype_errors():
    assert "triton" in rf.available_backends(DEVICE)
    inputs = projection_inputs(2, 7, 20, 7, 13, device=DEVICE)
    plan = plan_alignment(7, 7)
    direct = projection.repa_loss(*(inputs[k] for k in ("hidden", "target") + PROJECTION_ARGS[1:]), plan, 1e-5)
    assert torch.equal(rf.repa_loss(**inputs, backend="triton"), direct)
    doubles = {k: v.double() for k, v in inputs.items()}
    with pytest.raises(TypeError, match="float64"):   # the kernels themselves take fp32/fp16/bf16 only
        projection.repa_loss(*(doubles[k] for k in ("hidden", "target") + PROJECTION_ARGS[1:]), plan, 1e-5)


@pytest.mark.parametrize("fn, pair", [(rf.repa_loss, False), (rf.urepa_loss, False),
                                      (rf.cosine_alignment_loss, True), (rf.manifold_loss, True)],
                         ids=["repa", "urepa", "cosine", "manifold"])
def test_float64_inputs_go_to_the_torch_backend(fn, pair):
    """As on the cuda backend: every backend gives the same answer to the same input."""
    inputs = projection_inputs(2, 9, 6, 4, 5, dtype=torch.float64, param_dtype=torch.float64, device=DEVICE)
    if pair:
        inputs = {"projected": torch.randn(2, 4, 5, dtype=torch.float64, device=DEVICE), "target": inputs["target"]}
    grad_names = ("projected",) if pair else PROJECTION_ARGS
    expected = outputs_and_grads(fn, inputs, grad_names, backend="torch")
    result = outputs_and_grads(fn, inputs, grad_names, backend="triton")
    for key, value in expected.items():
        assert result[key].dtype == torch.float64 and torch.equal(result[key], value), key


def _dense_taps(index, weight, columns):
    """The (rows, columns) float64 matrix of per-row taps: row r sums weight[r, k] at index[r, k]."""
    dense = torch.zeros(index.shape[0], columns, dtype=torch.float64)
    dense.index_put_((torch.arange(index.shape[0]).repeat_interleave(index.shape[1]), index.flatten()),
                     weight.double().flatten(), accumulate=True)
    return dense


def test_adjoint_taps_transpose_the_resampling():
    """The backward's per-source taps are the exact transpose of the forward's gather taps."""
    for plan in (plan_alignment(36, 25), plan_alignment(21, 13), plan_alignment(24, 24, (4, 6), (6, 4)),
                 plan_alignment(20, 12, spatial_align=False), plan_alignment(64 * 64, 37 * 37)):
        step = plan.a
        dense = _dense_taps(*resample_taps(step), step.src_tokens)
        adjoint = _dense_taps(*projection._adjoint_taps_cpu(step), step.dst_tokens)
        torch.testing.assert_close(adjoint, dense.t(), rtol=0, atol=1e-7)


# ---------------------------------------------------------------- GPU only

# DESIGN.md §5's repa_loss cases (the U-REPA one is test_gpu_bf16_aligned_projection_of_a_feature_map).
GPU_CASES = {
    "flux-1024px": (4, 4096, 3072, 4096, 1536, {}),
    "sit-xl-256px": (256, 256, 1152, 256, 768, {}),          # the weight gradient split over rows
    "flux-aligned-to-37x37": (4, 64 * 64, 3072, 37 * 37, 1536, {}),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_bf16_model_sizes_match_the_reference(case):
    batch, hidden, dim, target, encoder_dim, kwargs = GPU_CASES[case]
    inputs = projection_inputs(batch, hidden, dim, target, encoder_dim, dtype=torch.bfloat16,
                               feature_map=isinstance(hidden, tuple), device=DEVICE)
    assert_matches_reference(rf.repa_loss, inputs, backend="triton", **kwargs)
    _assert_bitwise_reproducible(inputs, **kwargs)


@pytest.mark.gpu
def test_gpu_bf16_aligned_projection_of_a_feature_map():
    inputs = projection_inputs(8, (32, 32), 1280, 37 * 37, 1536, dtype=torch.bfloat16, feature_map=True,
                               device=DEVICE)
    plan = plan_alignment(32 * 32, 37 * 37, (32, 32))
    probe = torch.randn(8, plan.tokens, 1536, dtype=torch.float64, device=DEVICE)
    assert_matches_reference(_probe_projection, inputs, backend="triton", plan=plan, probe=probe)


@pytest.mark.gpu
def test_gpu_fp32_uses_tf32_only_when_allowed():
    inputs = projection_inputs(4, 1024, 1152, 1024, 768, device=DEVICE)
    assert projection.operand_class(F32) == "ieee"
    assert_matches_reference(rf.repa_loss, inputs, backend="triton")
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        assert projection.operand_class(F32) == "tf32"
        assert_matches_reference(rf.repa_loss, inputs, backend="triton", tolerance=1e-3)
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous


@pytest.mark.gpu
def test_gpu_bf16_cosine_alignment_loss():
    z = torch.randn(8, 1024, 1536, device=DEVICE)
    inputs = {"projected": z.to(torch.bfloat16), "target": (z + torch.randn_like(z)).to(torch.bfloat16)}
    assert_matches_reference(rf.cosine_alignment_loss, inputs, backend="triton", grad_names=("projected",))
