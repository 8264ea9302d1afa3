"""End-to-end cost of one regularizer step: VAE decode + DINOv2 encode + loss forward and backward,
uncached and read from a feature cache, per part, with peak memory and counted flops.

`repa-fast bench --cases e2e-cpu` (scaled down: under a minute on 2 idle cores) or `--cases e2e-gpu`
(real sizes); `--device meta` counts each part's flops (torch's FlopCounterMode on meta
tensors) without running anything. Models are built from their real configurations with random
weights, nothing is downloaded: diffusers AutoencoderKL with SDXL's (and SD's, for SiT) and
Flux's VAE configs and AutoencoderTiny (taesdxl), transformers DINOv2 base and giant. The loss
is the public functional API (U-REPA's total 0.5 * (align + 3 * manifold), REPA's alignment) on
hidden states of the model's shape; timing and memory are bench.py's.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

from .bench import (UNRELIABLE, Row, _dtype_name, _ms, _version, device_name, peak_memory_bytes, resolve_dtype,
                    timed, write_results)
from .bench_cases import UREPA_LAMBDA, UREPA_MANIFOLD_WEIGHT, Workload

# diffusers configs as published (config.json of each repository), written out here.
_KL_COMMON = dict(act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, in_channels=3, out_channels=3, layers_per_block=2,
                  norm_num_groups=32, force_upcast=True)
VAE_CONFIGS = {
    "sdxl-vae": ("AutoencoderKL", dict(_KL_COMMON, latent_channels=4, sample_size=1024, scaling_factor=0.13025)),
    "sd-vae": ("AutoencoderKL", dict(_KL_COMMON, latent_channels=4, sample_size=256, scaling_factor=0.18215)),
    "flux-vae": ("AutoencoderKL", dict(_KL_COMMON, latent_channels=16, sample_size=1024, scaling_factor=0.3611,
                                       shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
                                       mid_block_add_attention=True)),
    "taesdxl": ("AutoencoderTiny", dict(in_channels=3, out_channels=3, encoder_block_out_channels=[64] * 4,
                                        decoder_block_out_channels=[64] * 4, act_fn="relu", latent_channels=4,
                                        upsampling_scaling_factor=2, num_encoder_blocks=[1, 3, 3, 3],
                                        num_decoder_blocks=[3, 3, 3, 1], latent_magnitude=3, latent_shift=0.5,
                                        scaling_factor=1.0)),
}
# transformers Dinov2Config of facebook/dinov2-base and facebook/dinov2-giant.
ENCODER_CONFIGS = {
    "dinov2-b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, patch_size=14),
    "dinov2-g": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4, patch_size=14,
                     use_swiglu_ffn=True),
}
PARTS = ("decode", "encode", "loss fwd+bwd", "uncached step", "cache read", "cached step")


@dataclass(frozen=True)
class E2ECase:
    """One regularizer step: `batch` latents (latent_channels, latent_side, latent_side) decoded
    by `vae` (8x upsampling), encoded by `encoder` at `image_size`, and the loss of hidden
    states (batch, tokens, dim) — a (batch, dim, side, side) feature map for U-REPA."""

    name: str
    op: str  # "repa" or "urepa"
    batch: int
    vae: str
    latent_side: int
    encoder: str
    image_size: int
    tokens: int
    dim: int
    about: str = ""

    @property
    def latent_shape(self) -> Tuple[int, int, int]:
        return VAE_CONFIGS[self.vae][1]["latent_channels"], self.latent_side, self.latent_side

    @property
    def shape(self) -> str:
        side = int(self.tokens ** 0.5)
        hidden = f"{self.dim}x{side}x{side}" if self.op == "urepa" else f"S{self.tokens} D{self.dim}"
        c, h, w = self.latent_shape
        return (f"B{self.batch} {self.vae} {c}x{h}x{w} ({8 * h}px) -> {self.encoder} {self.image_size}px, "
                f"{self.op} {hidden}")


E2E_PRESETS: Dict[str, List[E2ECase]] = {
    "e2e-gpu": [
        E2ECase("e2e.sdxl-1024.dinov2-g-518.b8", "urepa", 8, "sdxl-vae", 128, "dinov2-g", 518, 32 * 32, 1280,
                "SDXL 1024px U-REPA, the seed's default encoder"),
        E2ECase("e2e.sdxl-1024-tae.dinov2-g-518.b8", "urepa", 8, "taesdxl", 128, "dinov2-g", 518, 32 * 32, 1280,
                "as above with urepa_use_tae (AutoencoderTiny)"),
        E2ECase("e2e.flux-1024.dinov2-g-518.b4", "repa", 4, "flux-vae", 128, "dinov2-g", 518, 64 * 64, 3072,
                "Flux 1024px REPA"),
        E2ECase("e2e.sit-xl-256.dinov2-b-224.b256", "repa", 256, "sd-vae", 32, "dinov2-b", 224, 16 * 16, 1152,
                "SiT-XL/2 256px REPA (the REPA paper's setting)"),
    ],
    # Scaled down to run on 2 CPU cores: the same VAE and DINOv2-B architectures on 32px images
    # (4x4 latents) and a 56px (4x4 tokens) encoder input.
    "e2e-cpu": [
        E2ECase("e2e.sdxl-32.dinov2-b-56.b1", "urepa", 1, "sdxl-vae", 4, "dinov2-b", 56, 2 * 2, 1280,
                "SDXL VAE + U-REPA, scaled down"),
        E2ECase("e2e.sdxl-32-tae.dinov2-b-56.b1", "urepa", 1, "taesdxl", 4, "dinov2-b", 56, 2 * 2, 1280,
                "the same with AutoencoderTiny"),
        E2ECase("e2e.flux-32.dinov2-b-56.b1", "repa", 1, "flux-vae", 4, "dinov2-b", 56, 2 * 2, 3072,
                "Flux VAE + REPA, scaled down"),
    ],
}


def build_models(case: E2ECase, device: torch.device, dtype: torch.dtype):
    """(vae, VisionEncoder) with random weights on `device` (meta: no memory) in `dtype`."""
    import diffusers
    from transformers import Dinov2Config, Dinov2Model

    from ..integrations.encoders import VisionEncoder

    kind, config = VAE_CONFIGS[case.vae]
    with torch.device(device):
        vae = getattr(diffusers, kind)(**config).to(dtype).eval().requires_grad_(False)
        model = Dinov2Model(Dinov2Config(image_size=case.image_size, **ENCODER_CONFIGS[case.encoder]))
        encoder = VisionEncoder(model, case.image_size, dtype=dtype)
    return vae, encoder.to(device)


class Step:
    """The parts of one regularizer step on fixed random inputs."""

    def __init__(self, case: E2ECase, device: torch.device, dtype: torch.dtype):
        from .. import RepaProjector
        from ..integrations.encoders import pixels_from_latents

        self.case, self.device = case, device
        self.vae, self.encoder = build_models(case, device, dtype)
        self.decode = lambda: pixels_from_latents(self.vae, self.latents)
        self.latents = torch.randn(case.batch, *case.latent_shape, device=device)
        side = int(case.tokens ** 0.5)
        shape = (case.batch, case.dim, side, side) if case.op == "urepa" else (case.batch, case.tokens, case.dim)
        self.hidden = torch.randn(shape, device=device, dtype=dtype).requires_grad_()
        with torch.device(device):
            self.projector = RepaProjector(case.dim, self.encoder.dim)
        self.leaves = [self.hidden, *self.projector.parameters()]

    def encode(self, pixels: torch.Tensor):
        return self.encoder(pixels)

    def loss_backward(self, tokens: torch.Tensor, grid) -> None:
        from .. import functional as F
        args = (self.hidden, tokens.to(self.device), *self.projector.loss_args())
        if self.case.op == "urepa":
            align, manifold = F.urepa_loss(*args, target_grid=grid)
            loss = UREPA_LAMBDA * (align + UREPA_MANIFOLD_WEIGHT * manifold)
        else:
            loss = F.repa_loss(*args, target_grid=grid)
        loss.backward()

    def clear(self) -> None:
        for leaf in self.leaves:
            leaf.grad = None

    def uncached(self) -> None:
        self.loss_backward(*self.encode(self.decode()))


def count_flops(case: E2ECase, dtype: torch.dtype) -> Dict[str, float]:
    """Flops of decode, encode and loss fwd+bwd, counted on meta tensors (nothing runs)."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = torch.device("meta")
    step = Step(case, meta, dtype)
    counts = {}
    with FlopCounterMode(display=False) as counter:
        pixels = step.decode()
    counts["decode"] = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        tokens, grid = step.encode(pixels)
    counts["encode"] = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        step.loss_backward(tokens, grid)
    counts["loss fwd+bwd"] = counter.get_total_flops()
    counts["uncached step"] = counts["decode"] + counts["encode"] + counts["loss fwd+bwd"]
    counts["cached step"] = counts["loss fwd+bwd"]
    return counts


def measure_case(case: E2ECase, device: torch.device, dtype: torch.dtype, quick: bool) -> List[Row]:
    """One row per part: decode, encode, loss, the uncached step, reading the batch's tokens
    from a full cache on disk, and the cached step (read + loss)."""
    rows = _measure_parts(case, Step(case, device, dtype), device, dtype, quick)
    if device.type == "cuda":  # the step's models and buffers are gone with _measure_parts' frame
        torch.cuda.empty_cache()
    return rows


def _measure_parts(case: E2ECase, step: Step, device: torch.device, dtype: torch.dtype, quick: bool) -> List[Row]:
    from ..integrations.feature_cache import FeatureCache, producer_of

    pixels = step.decode()
    tokens, grid = step.encode(pixels)
    keys = [f"sample/{i}" for i in range(case.batch)]
    with tempfile.TemporaryDirectory(prefix="repa-fast-e2e-") as folder:
        cache = FeatureCache(folder)
        cache.bind(producer_of(step.encoder, step.vae, step.encoder.dtype))
        cache.targets(keys, step.latents, lambda x: (tokens, grid))  # filled
        read = lambda: cache.targets(keys, step.latents, lambda x: (tokens, grid))  # noqa: E731 - all hits
        parts: Dict[str, Callable[[], object]] = {
            "decode": step.decode,
            "encode": lambda: step.encode(pixels),
            "loss fwd+bwd": lambda: step.loss_backward(tokens, grid),
            "uncached step": step.uncached,
            "cache read": read,
            "cached step": lambda: step.loss_backward(*read()),
        }
        rows = []
        for part, run in parts.items():
            row = Row(case.name, part, "e2e", _dtype_name(dtype), case.shape)
            try:
                workload = Workload(lambda run=run: run(), step.clear)
                timing = timed(workload, device, quick)
                row.samples, row.other_cores_busy = len(timing.samples), timing.other_cores_busy
                row.median_ms, row.p20_ms, row.p80_ms = (timing.quantile(q) for q in (0.5, 0.2, 0.8))
                problems = timing.problems(device)
                row.warning = f"{UNRELIABLE}: {'; '.join(problems)}" if problems else ""
                row.peak_mib = peak_memory_bytes(workload, device) / 2 ** 20
            except Exception as err:  # noqa: BLE001 - a part that fails is a result to report
                row.error = f"{type(err).__name__}: {str(err).strip()[:200]}"
            rows.append(row)
            print(f"  {case.name} [{part}]: {row.error or f'{_ms(row.median_ms)} ms, {row.peak_mib:.1f} MiB'}",
                  file=sys.stderr, flush=True)
        assert cache.stats["misses"] == case.batch, cache.stats  # every timed read was a hit
    return rows


def markdown_table(rows: List[Row], flops: Dict[Tuple[str, str], float]) -> str:
    lines = ["| case | part | median ms | p20-p80 ms | peak MiB | GFLOP | share of uncached | note |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    uncached = {r.case: r.median_ms for r in rows if r.op == "uncached step" and r.median_ms}
    for r in rows:
        spread = f"{_ms(r.p20_ms)}-{_ms(r.p80_ms)}" if r.median_ms else ""
        share = f"{r.median_ms / uncached[r.case]:.1%}" if r.median_ms and r.case in uncached else ""
        gflop = flops.get((r.case, r.op))
        lines.append(f"| {r.case} | {r.op} | {_ms(r.median_ms) if r.median_ms else r.error} | {spread} | "
                     f"{'' if r.peak_mib is None else f'{r.peak_mib:.1f}'} | "
                     f"{'' if gflop is None else f'{gflop / 1e9:.4g}'} | {share} | {r.warning} |")
    return "\n".join(lines)


def flops_table(cases: List[E2ECase], dtype: torch.dtype) -> str:
    lines = ["| case | shape | decode TFLOP | encode TFLOP | loss fwd+bwd TFLOP | loss share |",
             "|---|---|---:|---:|---:|---:|"]
    for case in cases:
        counts = count_flops(case, dtype)
        lines.append(f"| {case.name} | {case.shape} | {counts['decode'] / 1e12:.4g} | {counts['encode'] / 1e12:.4g} | "
                     f"{counts['loss fwd+bwd'] / 1e12:.4g} | "
                     f"{counts['loss fwd+bwd'] / counts['uncached step']:.2%} |")
    return "\n".join(lines)


def run_e2e(args: argparse.Namespace) -> int:
    """`repa-fast bench --cases e2e-cpu|e2e-gpu [--device cpu|cuda|meta]`."""
    names = [part.strip() for part in args.cases.split(",") if part.strip()]
    unknown = [name for name in names if name not in E2E_PRESETS]
    if unknown:
        print(f"repa-fast bench: e2e presets are {', '.join(E2E_PRESETS)}, got {', '.join(unknown)} "
              f"(they do not mix with loss cases)", file=sys.stderr)
        return 2
    cases = [case for name in names for case in E2E_PRESETS[name]]
    if args.device == "meta":
        print("# flops counted by torch.utils.flop_counter.FlopCounterMode on meta tensors: arithmetic, "
              "not measurement\n" + flops_table(cases, resolve_dtype(args.dtype, torch.device("cuda"))))
        return 0
    from .bench import resolve_device
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        print(f"repa-fast bench: {err}", file=sys.stderr)
        return 2
    dtype = resolve_dtype(args.dtype, device)
    meta = {"device": device_name(device), "torch": torch.__version__, "triton": _version("triton"),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dtype": _dtype_name(dtype), "argv": sys.argv[1:],
            "load_average_1min": round(os.getloadavg()[0], 2)}  # CPU timings mean little on a busy machine
    print(f"# repa-fast bench (end to end): {meta['device']}, torch {meta['torch']}, {meta['dtype']}, "
          f"{meta['timestamp']}, load average {meta['load_average_1min']}", flush=True)
    start = time.perf_counter()
    rows: List[Row] = []
    flops: Dict[Tuple[str, str], float] = {}
    for case in cases:
        print(f"# {case.name}: {case.about}", flush=True)
        flops.update(((case.name, part), value) for part, value in count_flops(case, dtype).items())
        rows += measure_case(case, device, dtype, args.quick)
        for row in rows:
            row.meta = {k: str(meta[k]) for k in ("device", "torch", "triton", "timestamp")}
        if args.out:
            write_results(Path(args.out), rows, meta)
    print(markdown_table(rows, flops))
    print(f"# {time.perf_counter() - start:.0f} s in all")
    return 0
