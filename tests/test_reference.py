"""The torch backend against the literal formulas of DESIGN.md §1, in float64."""
import pytest
import torch
import torch.nn.functional as F

import repa_fast as rf
from repa_fast import reference
from parity import (LargestAllocation, interpolate_tokens, literal_cosine, literal_manifold, literal_projection,
                    projection_inputs, rel_err)

F64 = torch.float64


def _literal_aligned(inputs, hidden_grid, target_grid, target_dst):
    z = literal_projection(inputs["hidden"], inputs["ln_weight"], inputs["ln_bias"], inputs["proj_weight"],
                           inputs["proj_bias"])
    t = inputs["target"]
    if hidden_grid != target_dst:
        z = interpolate_tokens(z, hidden_grid, target_dst)
    if target_grid != target_dst:
        t = interpolate_tokens(t, target_grid, target_dst)
    return z, t


@pytest.mark.parametrize("hidden_grid, target_grid, target_dst", [
    ((6, 6), (5, 5), (5, 5)),      # hidden shrinks: resampled before the GEMM
    ((3, 3), (5, 5), (3, 3)),      # target shrinks
    ((4, 4), (4, 4), (4, 4)),      # nothing to do
    ((21,), (13,), (13,)),         # 1-D fallback
])
def test_repa_and_urepa_equal_the_literal_formulas(hidden_grid, target_grid, target_dst):
    n_hidden, n_target = torch.tensor(hidden_grid).prod().item(), torch.tensor(target_grid).prod().item()
    inputs = projection_inputs(2, n_hidden, 11, n_target, 7, dtype=F64, param_dtype=F64)
    z, t = _literal_aligned(inputs, hidden_grid, target_grid, target_dst)
    assert rel_err(rf.repa_loss(**inputs), literal_cosine(z, t)) < 1e-12
    align, manifold = rf.urepa_loss(**inputs)
    assert rel_err(align, literal_cosine(z, t)) < 1e-12
    assert rel_err(manifold, literal_manifold(z, t)) < 1e-12


def test_spatial_align_off_mean_pools_both_sides():
    inputs = projection_inputs(3, 20, 9, 12, 5, dtype=F64, param_dtype=F64)
    z = literal_projection(inputs["hidden"], inputs["ln_weight"], inputs["ln_bias"], inputs["proj_weight"],
                           inputs["proj_bias"]).mean(1, keepdim=True)
    expected = literal_cosine(z, inputs["target"].mean(1, keepdim=True))
    assert rel_err(rf.repa_loss(**inputs, spatial_align=False), expected) < 1e-12


def test_feature_map_equals_its_tokens_with_grid():
    inputs = projection_inputs(2, (5, 6), 8, 9, 4, dtype=F64, param_dtype=F64, feature_map=True)
    tokens = dict(inputs, hidden=inputs["hidden"].flatten(2).transpose(1, 2))
    assert rf.repa_loss(**inputs).item() == pytest.approx(rf.repa_loss(**tokens, hidden_grid=(5, 6)).item(), rel=1e-14)
    for x, y in zip(rf.urepa_loss(**inputs), rf.urepa_loss(**tokens, hidden_grid=(5, 6))):
        assert x.item() == pytest.approx(y.item(), rel=1e-14)


@pytest.mark.parametrize("tokens, dim", [(40, 30), (61, 5), (1, 3)])
def test_manifold_direct_and_gram_forms_equal_the_literal_formula(tokens, dim):
    z, t = torch.randn(3, tokens, dim, dtype=F64), torch.randn(3, tokens, dim, dtype=F64)
    zn, tn = F.normalize(z, dim=-1), F.normalize(t, dim=-1)
    direct = reference._DirectManifoldSum.apply(zn, tn) / (3 * tokens * tokens)
    gram = reference._GramManifoldSum.apply(zn, tn) / (3 * tokens * tokens)
    literal = literal_manifold(z, t)
    assert rel_err(direct, literal) < 1e-12
    # Near a zero loss (N = 1) the forms agree absolutely, not relatively.
    torch.testing.assert_close(gram, literal, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(rf.manifold_loss(z, t), literal, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("case", ["shared direction", "close rows"])
def test_fp32_gram_form_stays_accurate_where_the_textbook_identity_cancels(case):
    z = torch.randn(2, 2048, 64, dtype=F64)
    if case == "shared direction":
        direction = 4 * torch.randn(64, dtype=F64)
        z, t = z + direction, torch.randn_like(z) + direction
    else:
        t = z + 0.05 * torch.randn_like(z)
    zn, tn = F.normalize(z, dim=-1), F.normalize(t, dim=-1)
    assert rel_err(reference._GramManifoldSum.apply(zn.float(), tn.float()), literal_manifold(z, t) * 2 * 2048 ** 2) < 1e-6


def test_cosine_alignment_loss_equals_the_literal_formula():
    z, t = torch.randn(2, 13, 6, dtype=F64), torch.randn(2, 13, 6, dtype=F64)
    assert rel_err(rf.cosine_alignment_loss(z, t), literal_cosine(z, t)) < 1e-14


def test_form_choice_follows_the_flop_counts():
    assert not reference.use_gram_form(1369, 1536)
    assert reference.use_gram_form(16384, 1024)


def _gradcheck(fn, inputs, names):
    leaves = {k: v.detach().clone().requires_grad_(k in names) for k, v in inputs.items()}
    args = tuple(leaves[n] for n in names)

    def call(*xs):
        out = fn(**dict(leaves, **dict(zip(names, xs))))
        return out if isinstance(out, tuple) else (out,)
    assert torch.autograd.gradcheck(call, args)


PARAMS = ("hidden", "ln_weight", "ln_bias", "proj_weight", "proj_bias")


@pytest.mark.parametrize("hidden_tokens, target_tokens", [(16, 9), (9, 16), (7, 7), (1, 1)])
def test_gradcheck_repa_and_urepa(hidden_tokens, target_tokens):
    inputs = projection_inputs(2, hidden_tokens, 6, target_tokens, 5, dtype=F64, param_dtype=F64)
    _gradcheck(rf.repa_loss, inputs, PARAMS)
    _gradcheck(rf.urepa_loss, inputs, PARAMS)


@pytest.mark.parametrize("tokens, dim", [(12, 10), (25, 3)])   # direct form, Gram form
def test_gradcheck_manifold_and_cosine(tokens, dim):
    inputs = {"projected": torch.randn(2, tokens, dim, dtype=F64), "target": torch.randn(2, tokens, dim, dtype=F64)}
    _gradcheck(rf.manifold_loss, inputs, ("projected",))
    _gradcheck(rf.cosine_alignment_loss, inputs, ("projected",))


def test_direct_form_over_many_chunks_matches(monkeypatch):
    z, t = torch.randn(2, 37, 50, dtype=F64, requires_grad=True), torch.randn(2, 37, 50, dtype=F64)
    whole = torch.autograd.grad(rf.manifold_loss(z, t), z)[0]
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 2 * 37 * 4)   # 4 rows a chunk, the last one short
    loss = rf.manifold_loss(z, t)
    assert rel_err(loss, literal_manifold(z, t)) < 1e-12
    assert rel_err(torch.autograd.grad(loss, z)[0], whole) < 1e-12


@pytest.mark.parametrize("tokens, dim", [(600, 500), (1200, 40)])   # direct form, Gram form
def test_manifold_never_allocates_b_n_n(tokens, dim, monkeypatch):
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 2 * tokens * 64)
    z = torch.randn(2, tokens, dim, requires_grad=True)
    t = torch.randn(2, tokens, dim)
    with LargestAllocation() as probe:
        rf.manifold_loss(z, t).backward()
    assert probe.numel < 2 * tokens * tokens
    assert probe.numel >= z.numel()   # the probe saw the work


def test_manifold_runs_at_n_16384():
    z = torch.randn(2, 16384, 64, requires_grad=True)
    t = torch.randn(2, 16384, 64)
    loss = rf.manifold_loss(z, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    # One sample's value on a row subset against the literal formula, small enough to build.
    zs, ts = z[:1, :512].detach().double(), t[:1, :512].double()
    assert rel_err(rf.manifold_loss(zs, ts), literal_manifold(zs, ts)) < 1e-10


def test_half_inputs_are_computed_in_float32_and_grads_keep_their_dtype():
    inputs = projection_inputs(2, 9, 8, 4, 6, dtype=torch.bfloat16)
    hidden = inputs["hidden"].requires_grad_()
    loss = rf.repa_loss(**inputs)
    assert loss.dtype == torch.float32
    loss.backward()
    assert hidden.grad.dtype == torch.bfloat16


def test_target_receives_no_gradient():
    inputs = projection_inputs(1, 9, 4, 9, 3)
    inputs["target"].requires_grad_()
    inputs["hidden"].requires_grad_()
    align, manifold = rf.urepa_loss(**inputs)
    (align + manifold).backward()
    assert inputs["target"].grad is None and inputs["hidden"].grad is not None
