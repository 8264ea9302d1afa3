"""The CUDA extension's ops against what repa_fast/cuda_backend.py expects of them: every
`repa_fast::cuda_*` op it calls is registered (and every one registered is called), with the schema
its fake implementations, its autograd formula and its call sites expect. The expected ops are read
from cuda_backend.py itself, never listed here.

Under a CUDA torch (`make cuda-extension`: setup.py builds repa_fast._cuda with nvcc, no GPU
needed) the library checked is that build; under a CPU torch (`make test`) it is csrc/ops.cpp built
with the host launchers (same op definitions, CPU kernels; tests/test_cuda_backend.py).
"""
import importlib.util
import inspect
import re
from types import SimpleNamespace

import pytest
import torch
from torch._library.custom_ops import CustomOpDef
from torch.utils._python_dispatch import TorchDispatchMode

from repa_fast import cuda_backend
from repa_fast.alignment import Resample

SOURCE = inspect.getsource(cuda_backend)
# Ops defined in Python (torch.library.custom_op) around the library's ones.
PYTHON_OPS = {v._name for v in vars(cuda_backend).values() if isinstance(v, CustomOpDef)}
LIBRARY_OPS = (set(re.findall(r"torch\.ops\.repa_fast\.(cuda_\w+)", SOURCE))
               | set(re.findall(r'"repa_fast::(cuda_\w+)"', SOURCE))) - PYTHON_OPS


@pytest.fixture(scope="module")
def dispatch_key():
    """Load the library; the dispatch key its kernels are registered for."""
    if torch.version.cuda is None:
        from test_cuda_backend import build_host_emulation
        cuda_backend.load_library(build_host_emulation())
        return "CPU"
    spec = importlib.util.find_spec(cuda_backend.PREBUILT)
    assert spec is not None and spec.origin, (f"{cuda_backend.PREBUILT} is not built: `make cuda-extension` builds it "
                                              "(setup.py with REPA_FAST_BUILD_CUDA=1)")
    cuda_backend.load_library(spec.origin)
    return "CUDA"


def schema(op: str):
    return getattr(torch.ops.repa_fast, op).default._schema


def test_the_ops_called_are_the_ops_registered(dispatch_key):
    assert LIBRARY_OPS, "no repa_fast::cuda_* op found in cuda_backend.py"
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("repa_fast::cuda_")} - PYTHON_OPS
    assert registered == LIBRARY_OPS, f"registered {sorted(registered)}, cuda_backend.py calls {sorted(LIBRARY_OPS)}"
    for op in LIBRARY_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"repa_fast::{op}", dispatch_key), f"{op}: no {dispatch_key} kernel"


def test_fake_and_autograd_registrations_take_the_schema_arguments(dispatch_key):
    fakes = re.findall(r'register_fake\("repa_fast::(cuda_\w+)", (\w+)\)', SOURCE)
    autograds = re.findall(r'register_autograd\("repa_fast::(cuda_\w+)", (\w+),\s*setup_context=(\w+)\)', SOURCE)
    assert fakes and autograds, "cuda_backend.py registers no fake or autograd for the library's ops"
    for op, fake in fakes:
        parameters = list(inspect.signature(getattr(cuda_backend, fake)).parameters)
        assert parameters == [a.name for a in schema(op).arguments], f"{fake} takes {parameters}, {op} is {schema(op)}"
    for op, backward, _ in autograds:  # backward(ctx, *one gradient per output)
        outputs = list(inspect.signature(getattr(cuda_backend, backward)).parameters)[1:]
        assert len(outputs) == len(schema(op).returns), f"{backward} takes {outputs}, {op} is {schema(op)}"


@pytest.mark.parametrize("manifold", [False, True])
def test_alignment_terms_forward_and_backward_through_the_registrations(dispatch_key, manifold):
    """Meta tensors: the dispatcher runs the fakes and the autograd formula against the schemas."""
    z = torch.randn(2, 5, 8, device="meta", requires_grad=True)
    t = torch.randn(2, 5, 8, device="meta")
    for t_affine in (None, torch.ops.repa_fast.cuda_target_zscore(t, 0.6)):   # iREPA's z-score on load, or none
        z.grad = None
        align, manifold_value, manifold_grad = torch.ops.repa_fast.cuda_alignment_terms(z, t, manifold, False, True,
                                                                                        False, t_affine)
        assert align.shape == manifold_value.shape == ()
        (align + manifold_value).backward()
        assert z.grad.shape == z.shape


class LibraryCalls(TorchDispatchMode):
    """Records every call of the library's ops (bound to their schemas by the dispatcher) and
    answers it with empty tensors, one per output: nothing runs, no GPU needed."""

    def __init__(self):
        super().__init__()
        self.called = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, name = func.name().split("::")
        if namespace == "repa_fast" and name in LIBRARY_OPS:
            self.called.add(name)
            outputs = tuple(torch.empty(0) for _ in func._schema.returns)
            return outputs[0] if len(outputs) == 1 else outputs
        return func(*args, **(kwargs or {}))


def test_every_call_site_binds_to_its_schema(dispatch_key):
    """cuda_backend.py's code that calls the library, each path once: a call that does not match
    its op's schema (arguments or outputs) raises here."""
    batch, tokens, dim, out_dim = 2, 16, 6, 4
    hidden = torch.randn(batch, tokens, dim)
    params = (torch.ones(dim), torch.zeros(dim), torch.randn(out_dim, dim), torch.zeros(out_dim))
    stats = torch.ones(batch * tokens)
    no_layer_norm = (None, None, *params[2:])  # an MLP head's last Linear
    with LibraryCalls() as calls:
        for step in (None, Resample("bilinear", (4, 4), (3, 3))):
            code = cuda_backend._encode(step)
            for fp32_gemm in (False, True):  # repa_loss's operands; the fused U-REPA head's fp32 GEMM
                for head in (params, no_layer_norm):
                    cuda_backend._project._init_fn(hidden, *head, code, 1e-5, fp32_gemm)
            rows = tokens if step is None else step.dst_tokens
            grad_z, y = torch.randn(batch, rows, out_dim), torch.randn(batch, rows, dim)
            grads = cuda_backend._project_grads._init_fn(grad_z, hidden, params[0], params[2], y, stats, stats, code,
                                                         [True] * 5)
            assert len(grads) == 5
            grads = cuda_backend._project_grads._init_fn(grad_z, hidden, None, params[2], y, stats[:0], stats[:0], code,
                                                         [True, False, False, True, True])
            assert len(grads) == 3
        cuda_backend._resample_tokens._init_fn(hidden, cuda_backend._encode(Resample("linear", (tokens,), (9,))))
        z, t = torch.randn(batch, tokens, out_dim), torch.randn(batch, tokens, out_dim)
        cuda_backend.target_zscore(t, 0.6)
        for affine in ((), (torch.randn(2, batch, out_dim),)):   # the target as it is, or z-scored on load
            cuda_backend._alignment_terms(z, t, True, torch.bfloat16, *affine)
            saved = SimpleNamespace(saved_tensors=(z, t, torch.randn(batch, tokens, out_dim), *affine))
            cuda_backend._alignment_terms_backward(saved, torch.ones(()), torch.ones(()), None)
    assert calls.called == LIBRARY_OPS
