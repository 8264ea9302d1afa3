"""Every backend is bitwise reproducible run to run (for fused backends, whose reductions could
depend on scheduling, this is the property that matters), and never writes into its inputs."""
import pytest
import torch

import repa_fast as rf
from parity import PROJECTION_ARGS, outputs_and_grads, projection_inputs
from test_state import train_steps

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
CASES = [pytest.param(backend, device, id=f"{backend}-{device}")
         for device in DEVICES for backend in rf.available_backends(device)]


def _resamples(backend, device):
    """F.interpolate's CUDA backward adds with atomics: the torch backend on a GPU is reproducible
    only when nothing is resampled."""
    return not (backend == "torch" and device != "cpu")


def _projection_inputs(backend, device):
    # Under the interpreter: tiny, but several programs per kernel (odd sizes, a resampled side).
    # On a GPU: large enough for split reductions and many blocks, in bfloat16.
    if device == "cpu":
        return projection_inputs(2, 49, 24, 36, 40, device=device)
    hidden_tokens = 64 * 64 if _resamples(backend, device) else 37 * 37
    return projection_inputs(4, hidden_tokens, 1152, 37 * 37, 768, device=device, dtype=torch.bfloat16)


def _pair_inputs(device):
    shape, dtype = ((2, 37, 50), torch.float32) if device == "cpu" else ((4, 1369, 1536), torch.bfloat16)
    return {"projected": torch.randn(shape, device=device, dtype=dtype),
            "target": torch.randn(shape, device=device, dtype=dtype)}


def _assert_bitwise_equal(first, second):
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), f"{key} differs between two identical calls"


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("fn", [rf.repa_loss, rf.urepa_loss], ids=["repa", "urepa"])
def test_projection_losses_are_bitwise_reproducible(backend, device, fn):
    inputs = _projection_inputs(backend, device)
    runs = [outputs_and_grads(fn, inputs, PROJECTION_ARGS, backend=backend) for _ in range(3)]
    _assert_bitwise_equal(runs[0], runs[1])
    _assert_bitwise_equal(runs[0], runs[2])


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("fn", [rf.cosine_alignment_loss, rf.manifold_loss], ids=["cosine", "manifold"])
def test_pair_losses_are_bitwise_reproducible(backend, device, fn):
    inputs = _pair_inputs(device)
    runs = [outputs_and_grads(fn, inputs, ("projected",), backend=backend) for _ in range(3)]
    _assert_bitwise_equal(runs[0], runs[1])
    _assert_bitwise_equal(runs[0], runs[2])


@pytest.mark.parametrize("backend, device", CASES)
def test_inputs_are_never_written(backend, device):
    inputs = _projection_inputs(backend, device)
    leaves = {k: v.clone().requires_grad_(k != "target") for k, v in inputs.items()}
    pair = _pair_inputs(device)
    pair_leaves = {"projected": pair["projected"].clone().requires_grad_(), "target": pair["target"].clone()}
    for fn in (rf.repa_loss, rf.urepa_loss):
        out = fn(**leaves, backend=backend)
        sum(out if isinstance(out, tuple) else (out,)).backward()
    for fn in (rf.cosine_alignment_loss, rf.manifold_loss):
        fn(**pair_leaves, backend=backend).backward()
    for name in inputs:
        assert torch.equal(leaves[name].detach(), inputs[name]), name
    for name in pair:
        assert torch.equal(pair_leaves[name].detach(), pair[name]), name


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("module_class", [rf.RepaLoss, rf.URepaLoss], ids=["RepaLoss", "URepaLoss"])
def test_training_steps_are_bitwise_reproducible(backend, device, module_class):
    """Two runs of a few optimizer steps from the same seed end with identical weights and logs."""
    target_tokens = 9 if _resamples(backend, device) else 16
    batches = [(torch.randn(2, 16, 12, device=device), torch.randn(2, target_tokens, 10, device=device))
               for _ in range(3)]

    def run():
        torch.manual_seed(0)
        module = module_class(12, 10, backend=backend).to(device)
        optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
        logs = train_steps(module, optimizer, batches)
        return module.state_dict(), logs

    (state_a, logs_a), (state_b, logs_b) = run(), run()
    assert logs_a == logs_b
    for key, value in state_a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, state_b[key]), key
        else:
            assert value == state_b[key], key
