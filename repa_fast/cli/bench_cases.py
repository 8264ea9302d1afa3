"""The benchmark case table, shared by `repa-fast bench` and the pytest-benchmark suite in
benchmarks/: what is measured (one forward + backward of a loss), on which shapes, and the
unavoidable GEMM work of each case (the floor).

Shapes are named after real models. Hidden states: SD1.5 512px and SDXL 1024px UNet mid blocks
(1280 channels on 8x8 and 32x32: SDXL's latent is 128x128, downsampled twice; SimpleTuner's REPA page says
16x16, DESIGN.md §5 uses 32x32, and 32x32 is what the SDXL UNet produces), Flux 1024px (64x64
tokens x 3072), SD3-medium 512px (32x32 tokens x 1536) and SiT-XL/2 256px (16x16 tokens x 1152).
Targets: DINOv2 ViT-S/B/L/G (384/768/1024/1536 wide) at 224px (16x16 patch tokens) and 518px
(37x37). The `design` preset is DESIGN.md §5's table, case for case.

Beside repa-fast's backends every case runs `torch.compile` of the torch backend and the
baseline a trainer decides from: `simpletuner`, SimpleTuner's (the seed system's) math as
trainers run it today, written here in plain torch, and `simpletuner.compile`, torch.compile of it.
"""
from __future__ import annotations

import fnmatch
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import functional as rf
from ..alignment import plan_alignment, resample_tokens
from ..backends import available_backends

COMPILED = "torch.compile"  # torch.compile of the torch backend, benchmarked beside the backends
BASELINE = "simpletuner"  # SimpleTuner's math as trainers run it, plain autograd: every row's speedup is against it
BASELINE_COMPILED = "simpletuner.compile"
# Rows that are not repa-fast backends: the loss each one runs, and whether torch.compile wraps it.
EXTRA_ROWS: Dict[str, Tuple[str, bool]] = {BASELINE: (BASELINE, False), BASELINE_COMPILED: (BASELINE, True),
                                           COMPILED: ("torch", True)}
ROWS = (BASELINE, BASELINE_COMPILED, "torch", "triton", "cuda", COMPILED)  # every row a case can have, in table order
MLP_WIDTH, IREPA_KERNEL, IREPA_ALPHA = 2048, 3, 0.6   # REPA's projector_dim; SimpleTuner's iREPA defaults
UREPA_LAMBDA, UREPA_MANIFOLD_WEIGHT = 0.5, 3.0  # SimpleTuner's defaults; DESIGN §5's U-REPA case


@dataclass(frozen=True)
class Case:
    """One loss call. repa / urepa: hidden (batch, tokens, dim) — for a UNet mid block a
    (batch, dim, h, w) feature map — against encoder tokens (batch, target_tokens, target_dim).
    manifold: projected and target both (batch, tokens, dim)."""

    name: str
    op: str
    batch: int
    tokens: int
    dim: int
    target_tokens: int
    target_dim: int
    feature_map: bool = False
    about: str = ""
    # The head: SimpleTuner's LayerNorm + Linear, "mlp" (REPA's, 3 layers of width 2048) or
    # "irepa" (a 3x3 conv and the target's spatial z-score); `encoders` targets of the same shape.
    projector: str = "layernorm_linear"
    encoders: int = 1

    @property
    def shape(self) -> str:
        if self.op == "manifold":
            return f"B{self.batch} N{self.tokens} E{self.dim}"
        side = math.isqrt(self.tokens)
        hidden = f"{self.dim}x{side}x{side}" if self.feature_map else f"S{self.tokens} D{self.dim}"
        head = "" if self.projector == "layernorm_linear" else f" {self.projector}"
        encoders = f" x{self.encoders}" if self.encoders > 1 else ""
        return f"B{self.batch} {hidden} ->{head} N{self.target_tokens} E{self.target_dim}{encoders}"

    def gemm_flops(self) -> int:
        """Flops of the unavoidable GEMMs of forward + backward (DESIGN.md §5's floor).

        Projection: forward, input gradient and weight gradient, 3 x 2 x rows x D x E, on the
        rows left after aligning (resampling is linear, so a shrinking resample goes first).
        Manifold: the cheaper of the direct form (6 N^2 E) and the Gram form (10 N E^2), per sample.
        """
        if self.op == "manifold":
            return self.batch * _manifold_flops(self.tokens, self.dim)
        side = math.isqrt(self.tokens)
        plan = plan_alignment(self.tokens, self.target_tokens, (side, side) if self.feature_map else None, None)
        flops = 6 * self.batch * min(self.tokens, plan.tokens) * self.dim * self.target_dim
        if self.projector == "mlp":   # D -> W -> W on every token, W -> E on the aligned rows
            width = MLP_WIDTH
            flops = 6 * self.batch * (self.tokens * (self.dim + width) * width
                                      + min(self.tokens, plan.tokens) * width * self.target_dim)
        elif self.projector == "irepa":   # the conv runs on every token of the grid
            flops = 6 * self.batch * self.tokens * self.dim * self.target_dim * IREPA_KERNEL ** 2
        flops *= self.encoders
        if self.op == "urepa":
            flops += self.batch * _manifold_flops(plan.tokens, self.target_dim)
        return flops


def _manifold_flops(tokens: int, dim: int) -> int:
    return min(6 * tokens * tokens * dim, 10 * tokens * dim * dim)


# Hidden side: (name, op, tokens, width, feature map, batch on a GPU).
MODELS = (
    ("sd15-512", "urepa", 8 * 8, 1280, True, 16),
    ("sdxl-1024", "urepa", 32 * 32, 1280, True, 8),
    ("flux-1024", "repa", 64 * 64, 3072, False, 4),
    ("sd3-512", "repa", 32 * 32, 1536, False, 16),
    ("sit-xl-256", "repa", 16 * 16, 1152, False, 256),
)
# Target side: DINOv2 patch tokens (patch 14) at 224px and 518px.
ENCODERS = tuple((f"dinov2-{size}-{px}", (px // 14) ** 2, width)
                 for px in (224, 518) for size, width in (("s", 384), ("b", 768), ("l", 1024), ("g", 1536)))


def _model_cases(batch: Optional[int], encoders: Sequence[str] = ()) -> List[Case]:
    """Every model against every encoder (or those named), plus the manifold loss of each UNet
    pair (U-REPA's second term, on the aligned tokens); `batch=None` takes each model's GPU batch."""
    cases: Dict[str, Case] = {}
    for model, op, tokens, dim, feature_map, model_batch in MODELS:
        b = model_batch if batch is None else batch
        for encoder, target_tokens, target_dim in ENCODERS:
            if encoders and encoder not in encoders:
                continue
            about = f"{model} x {encoder}"
            name = f"{op}.{model}.{encoder}.b{b}"
            cases[name] = Case(name, op, b, tokens, dim, target_tokens, target_dim, feature_map, about)
            if op == "urepa":
                aligned = min(tokens, target_tokens)
                manifold = f"manifold.n{aligned}-e{target_dim}.b{b}"  # both resolutions may align alike
                cases.setdefault(manifold, Case(manifold, "manifold", b, aligned, target_dim, aligned, target_dim,
                                                about=f"U-REPA manifold term of {about}"))
    return list(cases.values())


def _design_cases() -> List[Case]:
    """DESIGN.md §5, row by row (GPU sizes)."""
    return [
        Case("repa.flux-1024.n4096-e1536.b4", "repa", 4, 4096, 3072, 4096, 1536, about="Flux 1024px, equal counts"),
        Case("repa.sit-xl-256.dinov2-b-224.b256", "repa", 256, 256, 1152, 256, 768, about="SiT-XL 256px (REPA)"),
        Case("repa.flux-1024.dinov2-g-518.b4", "repa", 4, 4096, 3072, 1369, 1536,
             about="Flux 1024px, 64x64 aligned to 37x37"),
        Case("urepa.sdxl-1024.dinov2-g-518.b8", "urepa", 8, 1024, 1280, 1369, 1536, feature_map=True,
             about="SDXL 1024px mid block vs 37x37"),
        Case("manifold.n1369-e1536.b4", "manifold", 4, 1369, 1536, 1369, 1536, about="37x37 DINOv2-G tokens"),
        Case("manifold.n1024-e1536.b16", "manifold", 16, 1024, 1536, 1024, 1536, about="SDXL 1024px, B16"),
        Case("manifold.n4096-e1536.b4", "manifold", 4, 4096, 1536, 4096, 1536, about="4096 tokens"),
        Case("manifold.n16384-e1024.b2", "manifold", 2, 16384, 1024, 16384, 1024, about="16384 tokens"),
    ]


def _projector_cases(batch: Optional[int]) -> List[Case]:
    """The other heads (issue 14): SiT-XL/2 with REPA's MLP against two DINOv2-B 224 encoders,
    Flux with iREPA against DINOv2-G 518, SD1.5's mid block with iREPA (U-REPA) against DINOv2-S 224;
    `batch=None` takes each model's GPU batch."""
    models = {model: (op, tokens, dim, fmap, model_batch) for model, op, tokens, dim, fmap, model_batch in MODELS}
    encoders = {name: (tokens, width) for name, tokens, width in ENCODERS}
    cases = []
    for model, encoder, projector, count in (("sit-xl-256", "dinov2-b-224", "mlp", 2),
                                              ("flux-1024", "dinov2-g-518", "irepa", 1),
                                              ("sd15-512", "dinov2-s-224", "irepa", 1)):
        op, tokens, dim, fmap, model_batch = models[model]
        b = model_batch if batch is None else batch
        times = f"x{count}" if count > 1 else ""
        name = f"{op}.{model}.{projector}.{encoder}{times}.b{b}"
        cases.append(Case(name, op, b, tokens, dim, *encoders[encoder], fmap, f"{model} x {encoder}{times}, "
                          f"{projector} head", projector, count))
    return cases


def _cpu_cases() -> List[Case]:
    """CPU-sized: batch 1, every model against SimpleTuner's default encoder (DINOv2-G at 518px)
    and its low-memory suggestion (DINOv2-S at 224px)."""
    return _model_cases(batch=1, encoders=("dinov2-s-224", "dinov2-g-518")) + [
        c for c in _projector_cases(batch=1) if not c.name.startswith("repa.flux")]   # Flux's conv: ~1 TFLOP


def _quick_cases() -> List[Case]:
    """Small cases covering each op and path: U-REPA on a feature map, REPA with equal counts and
    with the hidden side resampled first, the manifold loss in its direct and its Gram form."""
    wanted = ("urepa.sd15-512.dinov2-s-224.b1", "repa.sit-xl-256.dinov2-b-224.b1", "repa.sd3-512.dinov2-s-224.b1",
              "manifold.n64-e384.b1", "manifold.n1024-e384.b1")
    by_name = {c.name: c for c in _model_cases(batch=1)} | {c.name: c for c in _projector_cases(batch=1)}
    return [by_name[name] for name in wanted + ("urepa.sd15-512.irepa.dinov2-s-224.b1",)]


PRESETS: Dict[str, Callable[[], List[Case]]] = {
    "quick": _quick_cases,
    "cpu": _cpu_cases,
    "design": _design_cases,
    "models": lambda: _model_cases(batch=None),
    "projectors": lambda: _projector_cases(batch=None),
    "gpu": lambda: _design_cases() + _model_cases(batch=None) + _projector_cases(batch=None),
}


def all_cases() -> List[Case]:
    return list({c.name: c for preset in PRESETS.values() for c in preset()}.values())


def default_preset(device: torch.device, quick: bool = False) -> str:
    if quick:
        return "quick"
    return "design" if device.type == "cuda" else "cpu"


def select_cases(spec: str) -> List[Case]:
    """`spec`: comma-separated preset names, case names or shell patterns over case names
    (e.g. "design", "quick,manifold.*", "repa.flux-1024.*.b4"), in order, without repeats."""
    known = all_cases()
    chosen: Dict[str, Case] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        matched = PRESETS[item]() if item in PRESETS else [c for c in known if fnmatch.fnmatchcase(c.name, item)]
        if not matched:
            raise ValueError(f"--cases: {item!r} is neither a preset ({', '.join(PRESETS)}) nor matches a case "
                             f"name (see `repa-fast bench --list`)")
        chosen.update((c.name, c) for c in matched)
    return list(chosen.values())


def bench_backends(device: torch.device, requested: Optional[Sequence[str]] = None) -> List[str]:
    """The rows to measure per case: every backend that runs on `device`, torch.compile of the
    torch backend and the SimpleTuner baselines. On CPU the triton backend runs only under the
    Triton interpreter, whose timings mean nothing: it is measured there only when asked for by name."""
    runnable = [b for b in ROWS if b in EXTRA_ROWS or b in available_backends(device)]
    if requested is None:
        return [b for b in runnable if not (device.type == "cpu" and b == "triton")]
    unknown = [b for b in requested if b not in ROWS]
    if unknown:
        raise ValueError(f"--backends: unknown {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    return list(requested)


def _inputs(case: Case, device: torch.device, dtype: torch.dtype) -> Tuple[Tuple[torch.Tensor, ...], List[torch.Tensor]]:
    """The loss's tensor arguments and the leaves that get gradients. Activations are in `dtype`
    (bf16 on a GPU, as a trainer's autocast gives them), projector parameters fp32 (master
    weights), the encoder's target detached."""
    def leaf(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dt).requires_grad_()

    target = torch.randn(case.batch, case.target_tokens, case.target_dim, device=device, dtype=dtype)
    if case.op == "manifold":
        projected = leaf(case.batch, case.tokens, case.dim)
        return (projected, target), [projected]
    if case.feature_map:
        side = math.isqrt(case.tokens)
        hidden = leaf(case.batch, case.dim, side, side)
    else:
        hidden = leaf(case.batch, case.tokens, case.dim)
    params = [leaf(case.dim, scale=0.1, dt=torch.float32), leaf(case.dim, scale=0.1, dt=torch.float32),
              leaf(case.target_dim, case.dim, scale=case.dim ** -0.5, dt=torch.float32),
              leaf(case.target_dim, scale=0.1, dt=torch.float32)]
    return (hidden, target, *params), [hidden, *params]


# ---------------------------------------------------------------------------- the SimpleTuner baseline
# SimpleTuner's REPA / U-REPA math as its regularizers run it (DESIGN.md §5's "trainer's eager"):
# an fp32 LayerNorm + Linear projector on the hidden states cast to fp32, project and then
# resample both sides to the smaller token count, normalize, and the manifold loss through the two
# B x N x N similarity matrices; plain autograd. Its encoder runs in fp32, so the target is fp32.

def simpletuner_projection(hidden, target, ln_weight, ln_bias, proj_weight, proj_bias):
    """(z, t): normalized projected tokens and encoder tokens, aligned, in fp32."""
    if hidden.dim() == 4:  # a UNet mid block (B, C, H, W) read as (B, H*W, C) tokens
        hidden = hidden.flatten(2).transpose(1, 2)
    z = F.linear(F.layer_norm(hidden.float(), (hidden.shape[-1],), ln_weight, ln_bias, 1e-5), proj_weight, proj_bias)
    plan = plan_alignment(z.shape[1], target.shape[1])
    return (F.normalize(resample_tokens(z, plan.a), dim=-1),
            F.normalize(resample_tokens(target.float(), plan.b), dim=-1))


def simpletuner_cosine(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return -(z * t).sum(-1).mean(-1).mean()


def simpletuner_manifold(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (torch.bmm(z, z.transpose(1, 2)) - torch.bmm(t, t.transpose(1, 2))).square().mean()


def simpletuner_loss(op: str, *args: torch.Tensor) -> torch.Tensor:
    """The baseline's version of what `_loss_fn(op, backend)` computes."""
    if op == "manifold":
        projected, target = args
        return simpletuner_manifold(F.normalize(projected.float(), dim=-1), F.normalize(target.float(), dim=-1))
    if op not in ("repa", "urepa"):
        raise ValueError(f"no {BASELINE} baseline for op {op!r}: add it here beside the case")
    z, t = simpletuner_projection(*args)
    if op == "repa":
        return simpletuner_cosine(z, t)
    return UREPA_LAMBDA * (simpletuner_cosine(z, t) + UREPA_MANIFOLD_WEIGHT * simpletuner_manifold(z, t))


def _loss_fn(op: str, backend: str) -> Callable[..., torch.Tensor]:
    """The scalar a trainer backpropagates: through the public API, or the SimpleTuner baseline."""
    if backend == BASELINE:
        return lambda *args: simpletuner_loss(op, *args)
    if op == "repa":
        return lambda *args: rf.repa_loss(*args, backend=backend)
    if op == "urepa":
        def urepa_total(*args):
            align, manifold = rf.urepa_loss(*args, backend=backend)
            return UREPA_LAMBDA * (align + UREPA_MANIFOLD_WEIGHT * manifold)
        return urepa_total
    return lambda *args: rf.manifold_loss(*args, backend=backend)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Workload:
    """`run()`: one forward + backward, gradients written fresh (as after zero_grad(set_to_none=True)).
    `clear()` drops the gradients, so a memory probe can start from the inputs alone.
    `compile_s`: seconds of the compiling warm-up step of a torch.compile row (None otherwise)."""

    run: Callable[[], None]
    clear: Callable[[], None]
    compile_s: Optional[float] = None

    def step(self) -> None:
        self.clear()
        self.run()


def compile_count() -> int:
    """Graphs torch.compile has compiled in this process: Dynamo's captured graphs plus Inductor's
    compiles (forward and the lazily compiled backward, cache hits included). A change across
    timed steps means they timed a recompile, not the compiled step."""
    from torch._dynamo.utils import counters

    inductor = sum(n for key, n in counters["inductor"].items() if key.startswith("fxgraph_cache_"))
    return counters["stats"]["unique_graphs"] + inductor


def _projector_inputs_and_loss(case: Case, backend: str, device: torch.device, dtype: torch.dtype):
    """(args, leaves, loss_fn) of a case with another head: the hidden states and the targets,
    the leaves hidden and the projectors' fp32 parameters; the loss the mean over encoders
    (U-REPA: lambda * (alignment + manifold_weight * manifold)). The SimpleTuner baseline of these
    heads is the torch backend: plain PyTorch, SimpleTuner's math (iREPA checked against its
    crepa.py in tests/test_projectors.py)."""
    from ..modules import RepaProjector
    from ..projectors import projector_losses

    backend = "torch" if backend == BASELINE else backend
    kind, alpha = ("conv", IREPA_ALPHA) if case.projector == "irepa" else ("mlp", None)
    projectors = [RepaProjector(case.dim, case.target_dim, kind, mlp_width=MLP_WIDTH, kernel_size=IREPA_KERNEL,
                                device=device) for _ in range(case.encoders)]
    side = math.isqrt(case.tokens)
    shape = (case.batch, case.dim, side, side) if case.feature_map else (case.batch, case.tokens, case.dim)
    hidden = torch.randn(*shape, device=device, dtype=torch.float32).to(dtype).requires_grad_()
    targets = [torch.randn(case.batch, case.target_tokens, case.target_dim, device=device, dtype=dtype)
               for _ in projectors]
    urepa = case.op == "urepa"

    def loss_fn(hidden, *targets):
        terms = [projector_losses(p, hidden, t, target_zscore_alpha=alpha, manifold=urepa, backend=backend)
                 for p, t in zip(projectors, targets)]
        total = [UREPA_LAMBDA * (align + UREPA_MANIFOLD_WEIGHT * manifold) for align, manifold in terms] if urepa \
            else [align for align, in terms]
        return sum(total) / len(total)
    return (hidden, *targets), [hidden, *(p for projector in projectors for p in projector.parameters())], loss_fn


def make_workload(case: Case, backend: str, device: torch.device, dtype: torch.dtype) -> Workload:
    """Inputs on `device`, and the fwd+bwd of `case.op` on `backend` (a repa-fast backend or one
    of EXTRA_ROWS); a torch.compile row is compiled here, by one warm-up step whose seconds are
    kept as `compile_s`."""
    loss_backend, compiled = EXTRA_ROWS.get(backend, (backend, False))
    if case.projector != "layernorm_linear":
        args, leaves, loss_fn = _projector_inputs_and_loss(case, loss_backend, device, dtype)
    else:
        args, leaves = _inputs(case, device, dtype)
        loss_fn = _loss_fn(case.op, loss_backend)
    if compiled:
        torch._dynamo.reset()  # fresh compile per case: never hit the recompile limit and fall back to eager
        loss_fn = torch.compile(loss_fn, dynamic=False)

    def run():
        loss_fn(*args).backward()

    def clear():
        for t in leaves:
            t.grad = None

    workload = Workload(run, clear)
    if compiled:
        start = time.perf_counter()
        workload.step()
        synchronize(device)
        workload.compile_s = time.perf_counter() - start
    return workload
