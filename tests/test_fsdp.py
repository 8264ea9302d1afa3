"""FSDP2 (`torch.distributed.fsdp.fully_shard`): two CPU processes (gloo) get the gradients of one
process on the whole batch, for the model and the projector, with U-REPA on a UNet and REPA on a DiT.

As tests/test_ddp.py, with the model sharded per block (the captured mid block / transformer blocks
are FSDP units themselves, so the capture's forward hook sits on a sharded layer) and the
regularizer sharded as its own root, as accelerate's FSDP2 plugin does with each prepared
module. Gradients are DTensor shards, gathered with full_tensor() to compare. Steps past the
cutoff (regularizer returns None, no backward through it) run too.
"""
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)", allow_module_level=True)

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from distributed import gloo_group, spawn  # noqa: E402
from test_ddp import WORLD, assert_ranks_match_full_batch, train_shards  # noqa: E402


def shard_model(model, kind, mesh):
    """One FSDP unit per block that REPA reads (and the rest of the model in the root unit)."""
    blocks = [model.mid_block] if kind == "urepa" else list(model.transformer_blocks)
    for block in blocks:
        fsdp.fully_shard(block, mesh=mesh)
    fsdp.fully_shard(model, mesh=mesh)
    return blocks[0]


def full_gradients(model, reg):
    """Every gradient as a full tensor (a collective: every rank calls it in the same order)."""
    grads = {}
    for prefix, module in (("model.", model), ("projector.", reg)):
        for name, param in module.named_parameters():
            if param.grad is not None:
                grad = param.grad
                grads[prefix + name] = (grad.full_tensor() if isinstance(grad, DTensor) else grad).clone()
    return grads


def _worker(rank, world, port, out_dir):
    with gloo_group(rank, world, port):
        mesh = init_device_mesh("cpu", (world,))

        def wrap(model, reg, kind):
            sharded_block = shard_model(model, kind, mesh)
            fsdp.fully_shard(reg, mesh=mesh)
            assert isinstance(next(sharded_block.parameters()), DTensor)
            assert isinstance(next(reg.parameters()), DTensor)
            return model, reg

        train_shards(rank, world, out_dir, wrap, full_gradients)


def test_fsdp2_gradients_equal_single_process_full_batch(tmp_path):
    spawn(_worker, WORLD, tmp_path, 240)
    assert_ranks_match_full_batch(tmp_path)
