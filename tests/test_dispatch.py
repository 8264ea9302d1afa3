"""Backend dispatch: auto, REPA_FAST_BACKEND, refusals with reasons, torch.compile through it."""
import pytest
import torch

import repa_fast as rf
from repa_fast import backends
from parity import projection_inputs


def test_torch_is_always_available_and_is_auto_on_cpu():
    assert "torch" in rf.available_backends("cpu")
    assert backends.resolve_backend(None, torch.device("cpu")).__name__ == "repa_fast.reference"


def test_unknown_backend_is_a_value_error_listing_the_valid_ones():
    inputs = projection_inputs(1, 4, 3, 4, 2)
    with pytest.raises(ValueError, match=r"backend must be one of torch, triton, cuda.*got 'tpu'"):
        rf.repa_loss(**inputs, backend="tpu")


def test_environment_variable_overrides_auto(monkeypatch):
    inputs = projection_inputs(1, 4, 3, 4, 2)
    monkeypatch.setenv("REPA_FAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        rf.repa_loss(**inputs)
    monkeypatch.setenv("REPA_FAST_BACKEND", "torch")
    assert torch.isfinite(rf.repa_loss(**inputs))


def test_cuda_backend_on_cpu_tensors_says_why():
    inputs = projection_inputs(1, 4, 3, 4, 2)
    with pytest.raises(rf.BackendUnavailableError, match="backend 'cuda' cannot run"):
        rf.repa_loss(**inputs, backend="cuda")


def test_triton_without_interpreter_on_cpu_says_how(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = backends._why_not("triton", torch.device("cpu"))
    assert "needs CUDA tensors" in reason and "TRITON_INTERPRET=1" in reason


def test_auto_prefers_triton_then_cuda_then_torch_on_cuda_devices(monkeypatch):
    """The order of DESIGN.md §2, checked without a GPU by stubbing which backends can run."""
    for runnable, expected in ((("triton", "cuda", "torch"), "triton"), (("cuda", "torch"), "cuda"),
                               (("torch",), "torch")):
        monkeypatch.setattr(backends, "_why_not", lambda name, device, ok=runnable: "" if name in ok else "no")
        assert backends._pick(None, "cuda") == expected
    assert backends._pick(None, "cpu") == "torch"


def test_torch_compile_fullgraph_traces_through_the_public_api():
    inputs = projection_inputs(2, 16, 8, 9, 5)
    hidden = inputs["hidden"].requires_grad_()
    compiled = torch.compile(lambda **kw: rf.urepa_loss(**kw, backend="torch"), fullgraph=True)
    align, manifold = compiled(**inputs)
    (align + manifold).backward()
    eager = rf.urepa_loss(**dict(inputs, hidden=hidden.detach()), backend="torch")
    torch.testing.assert_close(align, eager[0])
    torch.testing.assert_close(manifold, eager[1])
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
