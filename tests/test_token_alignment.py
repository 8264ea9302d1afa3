"""token_alignment="grid" | "sequence" (DESIGN.md §2 additions): "sequence" is SimpleTuner 4.10.1's
rule exactly, checked against SimpleTuner's own alignment methods (loaded from its wheel), and it
reaches every backend through the alignment plan (torch; triton under the interpreter; the cuda
backend's host emulation is covered by its PROJECTION_CASES in tests/test_cuda_backend.py)."""
import itertools
import math

import pytest
import torch

import repa_fast as rf
from repa_fast.alignment import plan_alignment
from parity import assert_matches_reference, literal_cosine, literal_manifold, literal_projection, projection_inputs, rel_err
from simpletuner_code import load_crepa


def simpletuner_align(a, b, *, spatial_align=True):
    """(a, b) tokens as SimpleTuner's own regularizers align them (image mode, no iREPA)."""
    crepa = load_crepa()
    urepa = object.__new__(crepa.UrepaRegularizer)
    repa = object.__new__(crepa.CrepaRegularizer)
    repa.spatial_align = spatial_align
    # CREPA works on (B, T, N, C): one frame for an image model.
    repa_a, repa_b = repa._maybe_align_tokens(a.unsqueeze(1), b.unsqueeze(1))
    if spatial_align:
        urepa_a, urepa_b = urepa._align_spatial(a, b)
        assert torch.equal(urepa_a, repa_a.squeeze(1)) and torch.equal(urepa_b, repa_b.squeeze(1))
    return repa_a.squeeze(1), repa_b.squeeze(1)


COUNTS = [1, 4, 6, 9, 12, 16, 24, 25, 30, 36, 49, 60]


@pytest.mark.parametrize("spatial_align", [True, False])
def test_sequence_rule_is_simpletuners_for_every_pair_of_counts(spatial_align):
    for n_a, n_b in itertools.product(COUNTS, repeat=2):
        a, b = torch.randn(2, n_a, 3, dtype=torch.float64), torch.randn(2, n_b, 5, dtype=torch.float64)
        want_a, want_b = simpletuner_align(a, b, spatial_align=spatial_align)
        # Grids given or not, "sequence" ignores them, as SimpleTuner never sees one.
        grid_a = (n_a // 2, 2) if n_a % 2 == 0 else None
        for a_grid in (None, grid_a):
            got_a, got_b = rf.align_tokens(a, b, a_grid=a_grid, spatial_align=spatial_align,
                                           token_alignment="sequence")
            assert torch.allclose(got_a, want_a, atol=1e-12) and torch.allclose(got_b, want_b, atol=1e-12), \
                (n_a, n_b, a_grid)


def test_without_grids_the_two_rules_are_the_same_plan():
    for n_a, n_b in itertools.product(COUNTS, repeat=2):
        assert plan_alignment(n_a, n_b) == plan_alignment(n_a, n_b, token_alignment="sequence")


def test_the_rules_differ_on_a_non_square_feature_map():
    """SDXL-like: a 6 x 4 mid block against a 7 x 7 encoder grid. "grid" resamples the target
    bilinearly onto 6 x 4; SimpleTuner resamples the 49 tokens as a flat sequence."""
    grid = plan_alignment(24, 49, (6, 4), None)
    sequence = plan_alignment(24, 49, (6, 4), None, token_alignment="sequence")
    assert (grid.a, grid.b.kind, grid.b.dst) == (None, "bilinear", (6, 4))
    assert (sequence.a, sequence.b.kind, sequence.b.dst) == (None, "linear", (24,))
    # Equal counts on different grids: "grid" resamples to the target's grid, SimpleTuner keeps both.
    assert plan_alignment(24, 24, (4, 6), (6, 4), token_alignment="sequence").b is None
    assert plan_alignment(24, 24, (4, 6), (6, 4)).a is not None


def test_bad_token_alignment_is_rejected_everywhere():
    inputs = projection_inputs(1, 4, 6, 4, 5)
    with pytest.raises(ValueError, match="token_alignment must be one of 'grid', 'sequence', got 'bilinear'"):
        rf.repa_loss(**inputs, token_alignment="bilinear")
    with pytest.raises(ValueError, match="token_alignment"):
        rf.urepa_loss(**inputs, token_alignment=None)
    with pytest.raises(ValueError, match="token_alignment"):
        rf.align_tokens(inputs["hidden"], inputs["target"], token_alignment="flat")
    with pytest.raises(ValueError, match="token_alignment"):
        rf.RepaLoss(6, 5, token_alignment="Grid")
    with pytest.raises(ValueError, match="crepa_token_alignment must be one of 'grid', 'sequence'"):
        rf.RepaConfig.from_dict({"crepa_token_alignment": "linear"})


# (hidden feature map (h, w), target tokens): the hidden side kept, shrunk first (the fused paths
# resample LayerNorm(h) before the GEMM) or grown.
FEATURE_MAPS = {"target-resampled": ((6, 4), 49), "hidden-shrinks": ((10, 6), 49), "equal-counts": ((4, 6), 24)}


def literal_simpletuner(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias):
    """SimpleTuner's U-REPA numbers, written out: project, align with its own code, then the losses."""
    tokens = hidden.flatten(2).transpose(1, 2)
    z, t = simpletuner_align(literal_projection(tokens, ln_weight, ln_bias, proj_weight, proj_bias), target)
    return literal_cosine(z, t), literal_manifold(z, t)


@pytest.mark.parametrize("case", FEATURE_MAPS)
def test_torch_backend_gives_simpletuners_numbers(case):
    grid, target_tokens = FEATURE_MAPS[case]
    inputs = projection_inputs(2, grid, 7, target_tokens, 5, dtype=torch.float64, param_dtype=torch.float64,
                               feature_map=True)
    align, manifold = rf.urepa_loss(**inputs, backend="torch", token_alignment="sequence")
    want_align, want_manifold = literal_simpletuner(**inputs)
    assert rel_err(align, want_align) < 1e-12 and rel_err(manifold, want_manifold) < 1e-12
    repa = rf.repa_loss(**inputs, backend="torch", token_alignment="sequence")
    assert rel_err(repa, want_align) < 1e-12
    grid_align = rf.repa_loss(**inputs, backend="torch")
    if case == "equal-counts":   # a feature map against as many tokens: no resampling either way
        assert rel_err(grid_align, repa) < 1e-12
    else:
        assert rel_err(grid_align, repa) > 1e-4


@pytest.mark.parametrize("loss", [rf.repa_loss, rf.urepa_loss], ids=["repa", "urepa"])
@pytest.mark.parametrize("case", FEATURE_MAPS)
def test_triton_backend_follows_the_sequence_rule(case, loss):
    pytest.importorskip("triton")
    grid, target_tokens = FEATURE_MAPS[case]
    inputs = projection_inputs(2, grid, 9, target_tokens, 7, feature_map=True)
    assert_matches_reference(loss, inputs, backend="triton", token_alignment="sequence")


@pytest.mark.parametrize("module", ["RepaLoss", "URepaLoss"])
def test_modules_and_configs_carry_the_option(module):
    inputs = projection_inputs(2, (6, 4), 7, 49, 5, feature_map=True)
    cls = getattr(rf, module)
    losses = {}
    for rule in ("grid", "sequence"):
        loss_module = cls(7, 5, token_alignment=rule)
        with torch.no_grad():
            for param, value in zip(loss_module.projector.loss_args(), list(inputs.values())[2:]):
                param.copy_(value)
        losses[rule], _ = loss_module(inputs["hidden"], inputs["target"], step=0)
        expected = (rf.repa_loss if module == "RepaLoss" else rf.urepa_loss)(**inputs, token_alignment=rule)
        expected = expected if module == "RepaLoss" else expected[0] + 3.0 * expected[1]
        assert rel_err(losses[rule], 0.5 * expected) < 1e-6
    assert not math.isclose(losses["grid"].item(), losses["sequence"].item(), rel_tol=1e-4)
    assert rf.URepaConfig.from_dict({"urepa_token_alignment": "sequence"}).token_alignment == "sequence"
    assert rf.RepaConfig.from_dict({"crepa_token_alignment": None}).token_alignment == "grid"
