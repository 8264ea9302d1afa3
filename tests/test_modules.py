"""RepaProjector, RepaLoss, URepaLoss: what a trainer's loop sees."""
import pytest
import torch
from torch import nn

import repa_fast as rf


def test_projector_keeps_the_sequential_checkpoint_layout():
    projector = rf.RepaProjector(12, 7)
    trainer_style = nn.Sequential(nn.LayerNorm(12), nn.Linear(12, 7))
    assert list(projector.state_dict()) == list(trainer_style.state_dict())
    projector.load_state_dict(trainer_style.state_dict())
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(projector(x), trainer_style(x))
    assert all(p.dtype == torch.float32 for p in projector.parameters())


def test_projector_reads_feature_maps_as_tokens():
    projector = rf.RepaProjector(6, 4)
    fmap = torch.randn(2, 6, 3, 5)
    torch.testing.assert_close(projector(fmap), projector(fmap.flatten(2).transpose(1, 2)))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_projector_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="hidden_dim"):
        rf.RepaProjector(bad, 4)


def test_repa_loss_module_scales_by_the_constant_lambda_and_logs_floats():
    module = rf.RepaLoss(10, 6)
    hidden, target = torch.randn(2, 16, 10), torch.randn(2, 9, 6)
    loss, logs = module(hidden, target)
    expected = rf.repa_loss(hidden, target, *module.projector.loss_args())
    torch.testing.assert_close(loss, 0.5 * expected)
    assert set(logs) == {"alignment", "similarity", "weight"}
    assert all(type(v) is float for v in logs.values())
    assert logs["alignment"] == pytest.approx(expected.item()) and logs["similarity"] == pytest.approx(-expected.item())
    assert logs["weight"] == 0.5


def test_urepa_loss_module_combines_the_terms_with_the_manifold_weight():
    module = rf.URepaLoss(8, 5, manifold_weight=2.0, schedule=0.25)
    fmap, target = torch.randn(2, 8, 4, 4), torch.randn(2, 9, 5)
    loss, logs = module(fmap, target)
    align, manifold = rf.urepa_loss(fmap, target, *module.projector.loss_args())
    torch.testing.assert_close(loss, 0.25 * (align + 2.0 * manifold))
    assert set(logs) == {"alignment", "manifold", "similarity", "weight"}
    loss.backward()
    assert all(p.grad is not None for p in module.parameters())


def test_step_counter_follows_training_calls_and_explicit_steps():
    module = rf.RepaLoss(4, 3, schedule=rf.LambdaSchedule(base=1.0, warmup_steps=4))
    hidden, target = torch.randn(1, 4, 4), torch.randn(1, 4, 3)
    weights = [module(hidden, target)[1]["weight"] for _ in range(3)]
    assert weights == [0.0, 0.25, 0.5]
    assert module(hidden, target, step=10)[1]["weight"] == 1.0
    assert module.step_count == 11
    module.eval()
    module(hidden, target)
    assert module.step_count == 11


def test_past_the_cutoff_the_loss_is_zero_without_a_graph_but_still_logged():
    module = rf.URepaLoss(4, 3, schedule=rf.LambdaSchedule(base=0.5, cutoff_step=5))
    hidden, target = torch.randn(2, 4, 4, requires_grad=True), torch.randn(2, 4, 3)
    on, _ = module(hidden, target, step=4)
    assert on.requires_grad
    off, logs = module(hidden, target, step=5)
    assert off.item() == 0.0 and not off.requires_grad
    assert logs["weight"] == 0.0 and logs["manifold"] > 0.0


def test_similarity_threshold_switches_the_loss_off_permanently():
    schedule = rf.LambdaSchedule(base=1.0, similarity_threshold=-1.0)   # any similarity reaches it
    module = rf.RepaLoss(4, 3, schedule=schedule)
    hidden, target = torch.randn(2, 4, 4), torch.randn(2, 4, 3)
    assert module(hidden, target)[1]["weight"] == 0.0
    assert schedule.is_off(module.step_count)


def test_modules_reject_bad_schedules_and_weights():
    with pytest.raises(TypeError, match="schedule"):
        rf.RepaLoss(4, 3, schedule="cosine")
    with pytest.raises(ValueError, match="manifold_weight"):
        rf.URepaLoss(4, 3, manifold_weight=float("nan"))
