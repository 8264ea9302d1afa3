"""Two CPU processes (gloo) under DistributedDataParallel get the gradients of one process on the
whole batch, for the model and the projector, with U-REPA on a UNet and REPA on a DiT.

The setup the README recommends: the model and the regularizer are wrapped separately
(`accelerator.prepare(model, regularizer, optimizer)` does the same). The losses are means
over the batch and DDP averages the ranks' gradients, so equal shards give the full-batch
gradient. Past the schedule's cutoff the regularizer returns None and its DDP wrapper simply
sees no backward, which DDP allows; the test runs such steps too.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import repa_fast as rf  # noqa: E402
from distributed import gloo_group, spawn  # noqa: E402
from test_capture import tiny_pixart, tiny_unet2d  # noqa: E402
from test_encoders import tiny_dinov2  # noqa: E402

WORLD = 2
BATCH = 4  # two per rank
CONFIGS = {
    "urepa": {"urepa_enabled": True, "urepa_lambda": 0.5, "urepa_manifold_weight": 3.0, "urepa_cutoff_step": 1},
    "repa": {"crepa_enabled": True, "crepa_block_index": 1, "crepa_lambda": 0.5, "crepa_cutoff_step": 1},
}


def build(kind):
    """Model, regularizer and a full batch, identical in every process."""
    torch.manual_seed(1234)
    model, inputs, *_ = tiny_unet2d() if kind == "urepa" else tiny_pixart()
    encoder = rf.VisionEncoder(tiny_dinov2(), image_size=28)
    cls = rf.URepaRegularizer if kind == "urepa" else rf.RepaRegularizer
    reg = cls.from_config(CONFIGS[kind], model, encoder=encoder)
    generator = torch.Generator().manual_seed(99)
    sample_key = "sample" if kind == "urepa" else "hidden_states"
    sample = inputs[sample_key]
    inputs[sample_key] = torch.randn(BATCH, *sample.shape[1:], generator=generator)
    inputs["timestep"] = torch.randint(0, 1000, (BATCH,), generator=generator)
    if kind == "repa":
        inputs["encoder_hidden_states"] = torch.randn(BATCH, 5, 12, generator=generator)
    target = torch.randn(BATCH, *sample.shape[1:], generator=generator)
    pixels = torch.rand(BATCH, 3, 28, 28, generator=generator)
    return model, reg, inputs, target, pixels


def shard(value, rank, world):
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == BATCH:
        per = BATCH // world
        return value[rank * per:(rank + 1) * per]
    return value


def train_step(model, reg, capture_owner, inputs, target, pixels, step):
    """One step: diffusion MSE plus the regularizer; returns whether the regularizer contributed."""
    with capture_owner.capture() as cap:
        out = model(**inputs).sample
    loss = F.mse_loss(out[:, :target.shape[1]], target)
    reg_loss, logs = reg(cap.output, pixels=pixels, hidden_grid=cap.grid, step=step)
    if reg_loss is not None:
        loss = loss + reg_loss
    loss.backward()
    return reg_loss is not None


def gradients(model, reg):
    grads = {f"model.{n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads.update({f"projector.{n}": p.grad.clone() for n, p in reg.named_parameters()})
    return grads


def train_shards(rank, world, out_dir, wrap, grads_of):
    """Each config's first step on this rank's shard of the batch, the gradients saved (by
    grads_of(model, reg)), then two steps past the cutoff; wrap(model, reg, kind) gives the modules
    the steps call (DDP wrappers, or the FSDP2-sharded modules themselves)."""
    for kind in CONFIGS:
        model, reg, inputs, target, pixels = build(kind)
        step_model, step_reg = wrap(model, reg, kind)
        inputs = {name: shard(value, rank, world) for name, value in inputs.items()}
        target, pixels = shard(target, rank, world), shard(pixels, rank, world)
        assert train_step(step_model, step_reg, reg, inputs, target, pixels, step=0)
        torch.save(grads_of(model, reg), os.path.join(out_dir, f"{kind}_rank{rank}.pt"))
        for step in (1, 2):  # past the cutoff: regularizer loss None, model still trained
            model.zero_grad()
            assert not train_step(step_model, step_reg, reg, inputs, target, pixels, step=step)
    dist.barrier()


def assert_ranks_match_full_batch(out_dir):
    """Every rank's saved gradients equal one process's on the whole batch."""
    for kind in CONFIGS:
        model, reg, inputs, target, pixels = build(kind)
        assert train_step(model, reg, reg, inputs, target, pixels, step=0)
        want = gradients(model, reg)
        assert any(name.startswith("projector.") for name in want) and len(want) > 10
        for rank in range(WORLD):
            assert_same_gradients(torch.load(out_dir / f"{kind}_rank{rank}.pt"), want, (kind, rank))


def _worker(rank, world, port, out_dir):
    with gloo_group(rank, world, port):
        train_shards(rank, world, out_dir, lambda model, reg, kind: (DDP(model), DDP(reg)), gradients)


def _threshold_worker(rank, world, port, out_dir):
    """Rank 0 sees aligned features (similarity ~1), rank 1 unrelated ones (~0): alone, rank 0
    would cross the 0.6 threshold and rank 1 would not."""
    with gloo_group(rank, world, port):
        torch.manual_seed(0)
        loss_module = rf.RepaLoss(8, 8, schedule=rf.LambdaSchedule(base=0.5, similarity_threshold=0.6))
        with torch.no_grad():
            loss_module.projector.linear.weight.copy_(torch.eye(8))
            loss_module.projector.linear.bias.zero_()
        hidden = torch.randn(2, 16, 8)
        projected = loss_module.projector(hidden).detach()
        target = projected if rank == 0 else torch.randn(2, 16, 8)
        weights = [loss_module(hidden, target)[1]["weight"] for _ in range(3)]
        torch.save(weights, os.path.join(out_dir, f"weights_rank{rank}.pt"))


def assert_same_gradients(got, want, label):
    """Each gradient within 1e-5 of its norm; gradients that are 0 in exact arithmetic (an
    attention key bias) are rounding noise, judged against the largest gradient instead."""
    assert got.keys() == want.keys(), label
    largest = max(grad.norm() for grad in want.values())
    for name, grad in want.items():
        error = (got[name] - grad).norm()
        assert error <= 1e-5 * grad.norm() + 1e-7 * largest, (label, name, error.item(), grad.norm().item())


def test_ddp_gradients_equal_single_process_full_batch(tmp_path):
    spawn(_worker, WORLD, tmp_path, 240)
    assert_ranks_match_full_batch(tmp_path)


def test_similarity_threshold_cuts_off_on_every_rank_together(tmp_path):
    spawn(_threshold_worker, WORLD, tmp_path, 240)
    weights = [torch.load(tmp_path / f"weights_rank{rank}.pt") for rank in range(WORLD)]
    assert weights[0] == weights[1] == [0.5, 0.5, 0.5]   # the global mean (~0.5) stays under 0.6
