"""align_tokens and the alignment plan against F.interpolate (DESIGN.md §1 "Token alignment")."""
import pytest
import torch

import repa_fast as rf
from repa_fast.alignment import Resample, plan_alignment, resample_taps, resample_tokens
from parity import interpolate_tokens


def test_square_grids_resample_the_larger_side_bilinearly():
    a, b = torch.randn(2, 64, 5), torch.randn(2, 25, 3)
    a2, b2 = rf.align_tokens(a, b)
    torch.testing.assert_close(a2, interpolate_tokens(a, (8, 8), (5, 5)), rtol=0, atol=0)
    torch.testing.assert_close(b2, b, rtol=0, atol=0)


def test_smaller_hidden_side_is_kept_and_the_target_shrinks():
    a, b = torch.randn(3, 16, 7), torch.randn(3, 49, 4)
    a2, b2 = rf.align_tokens(a, b)
    torch.testing.assert_close(a2, a, rtol=0, atol=0)
    torch.testing.assert_close(b2, interpolate_tokens(b, (7, 7), (4, 4)), rtol=0, atol=0)


def test_explicit_non_square_grids():
    a, b = torch.randn(2, 6 * 10, 5), torch.randn(2, 4 * 7, 3)
    a2, b2 = rf.align_tokens(a, b, a_grid=(6, 10), b_grid=(4, 7))
    torch.testing.assert_close(a2, interpolate_tokens(a, (6, 10), (4, 7)), rtol=0, atol=0)
    torch.testing.assert_close(b2, b, rtol=0, atol=0)


def test_grids_that_upsample_one_axis():
    # (3, 12) has fewer tokens than (6, 7): a goes down in rows, b goes up in rows.
    a, b = torch.randn(1, 42, 5), torch.randn(1, 36, 5)
    a2, b2 = rf.align_tokens(a, b, a_grid=(6, 7), b_grid=(3, 12))
    torch.testing.assert_close(a2, interpolate_tokens(a, (6, 7), (3, 12)), rtol=0, atol=0)
    torch.testing.assert_close(b2, b, rtol=0, atol=0)


def test_equal_counts_with_different_grids_go_to_the_target_grid():
    a, b = torch.randn(2, 16, 3), torch.randn(2, 16, 3)
    a2, b2 = rf.align_tokens(a, b, a_grid=(2, 8), b_grid=(4, 4))
    torch.testing.assert_close(a2, interpolate_tokens(a, (2, 8), (4, 4)), rtol=0, atol=0)
    torch.testing.assert_close(b2, b, rtol=0, atol=0)


def test_one_dimensional_fallback_when_a_count_is_not_square():
    a, b = torch.randn(2, 30, 5), torch.randn(2, 16, 3)
    a2, b2 = rf.align_tokens(a, b)
    torch.testing.assert_close(a2, interpolate_tokens(a, (30,), (16,)), rtol=0, atol=0)
    torch.testing.assert_close(b2, b, rtol=0, atol=0)
    a3, b3 = rf.align_tokens(torch.randn(2, 10, 5), b)
    torch.testing.assert_close(b3, interpolate_tokens(b, (16,), (10,)), rtol=0, atol=0)


def test_mean_pooling_when_spatial_align_is_off():
    a, b = torch.randn(2, 30, 5), torch.randn(2, 16, 3)
    a2, b2 = rf.align_tokens(a, b, spatial_align=False)
    torch.testing.assert_close(a2, a.mean(1, keepdim=True))
    torch.testing.assert_close(b2, b.mean(1, keepdim=True))


def test_equal_counts_are_left_alone_even_without_spatial_align():
    a, b = torch.randn(2, 9, 5), torch.randn(2, 9, 3)
    for spatial in (True, False):
        a2, b2 = rf.align_tokens(a, b, spatial_align=spatial)
        assert a2 is a and b2 is b


def test_feature_map_is_read_as_row_major_tokens():
    fmap = torch.randn(2, 5, 6, 4)
    tokens = fmap.flatten(2).transpose(1, 2)
    b = torch.randn(2, 9, 3)
    from_map = rf.align_tokens(fmap, b)
    from_tokens = rf.align_tokens(tokens, b, a_grid=(6, 4))
    for x, y in zip(from_map, from_tokens):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    torch.testing.assert_close(from_map[0], interpolate_tokens(tokens, (6, 4), (3, 3)), rtol=0, atol=0)


def test_plan_is_pure_shape_logic():
    assert plan_alignment(64, 25) == rf.AlignmentPlan(Resample("bilinear", (8, 8), (5, 5)), None, 25)
    assert plan_alignment(30, 20) == rf.AlignmentPlan(Resample("linear", (30,), (20,)), None, 20)
    assert plan_alignment(7, 7).a is None


@pytest.mark.parametrize("step", [Resample("bilinear", (8, 8), (5, 5)), Resample("bilinear", (5, 7), (9, 4)),
                                  Resample("bilinear", (3, 3), (3, 3)), Resample("linear", (30,), (13,)),
                                  Resample("linear", (5,), (11,)), Resample("bilinear", (1, 1), (2, 3)),
                                  Resample("mean", (20,), (1,))])
def test_taps_reproduce_interpolate(step):
    x = torch.randn(2, step.src_tokens, 6, dtype=torch.float64)
    index, weight = resample_taps(step)
    assert torch.allclose(weight.sum(1), torch.ones(step.dst_tokens))
    gathered = (x[:, index] * weight.double()[None, :, :, None]).sum(2)
    torch.testing.assert_close(gathered, resample_tokens(x, step), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("grid", [(3,), (2, 3, 4), (0, 4), (2.0, 2), "44"])
def test_bad_grid_is_rejected(grid):
    with pytest.raises(ValueError, match="a_grid"):
        rf.align_tokens(torch.randn(1, 24, 3), torch.randn(1, 9, 3), a_grid=grid)


def test_grid_that_does_not_cover_the_tokens_is_rejected():
    with pytest.raises(ValueError, match=r"b_grid=\(3, 4\) has 12 cells but there are 9 tokens"):
        rf.align_tokens(torch.randn(1, 24, 3), torch.randn(1, 9, 3), b_grid=(3, 4))


def test_feature_map_grid_conflict_is_rejected():
    with pytest.raises(ValueError, match="feature map of grid"):
        rf.align_tokens(torch.randn(1, 3, 4, 4), torch.randn(1, 9, 3), a_grid=(2, 8))
