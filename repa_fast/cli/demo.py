"""train a tiny diffusers UNet with U-REPA and a tiny DiT with REPA on generated shapes

Both models learn to denoise 32x32 images of random circles and squares (DDPM noise
prediction), each with its regularizer built from SimpleTuner's config keys, aligned to a frozen
DINOv2: a tiny random one by default, real weights with `--encoder PATH` (a local directory, or
a name such as dinov2_vits14, downloaded by transformers). Prints a progress bar with the
per-step alignment / manifold / weight and a summary. With `--feature-cache DIR` both train on
the latents of a tiny VAE, in order over the data set, the encoder's tokens read through a
feature cache: the first epoch decodes and encodes, later epochs read the cache. diffusers,
transformers and tqdm are imported inside functions: `repa_fast.cli` imports this module for its
arguments.
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import backend_name

IMAGE_SIZE = 32
DATASET_SIZE = 256
TINY_ENCODER_IMAGE_SIZE = 112  # an 8 x 8 patch grid
PRETRAINED_ENCODER_IMAGE_SIZE = 224
DIT_BLOCK_INDEX = 2  # of 4: the tiny DiT has fewer blocks than SimpleTuner's recommended 8 / 10
DEMO_PROJECTORS = ("layernorm_linear", "mlp", "conv", "irepa")
DEMO_MLP_WIDTH = 256  # REPA's 2048 is sized for SiT-XL; the tiny models are 64 wide


def projector_keys(prefix: str, projector: str) -> Dict[str, object]:
    """The config keys selecting `projector` (one of DEMO_PROJECTORS) for `prefix` (crepa_ / urepa_)."""
    if projector == "irepa":
        return {"irepa_enabled": True}
    return {f"{prefix}projector_kind": projector, f"{prefix}projector_mlp_width": DEMO_MLP_WIDTH}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=60, help="training steps per model (default 60)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (default 8)")
    parser.add_argument("--encoder", default=None, metavar="PATH",
                        help="DINOv2 to align to: a local directory or a name such as dinov2_vits14 "
                             "(default: a tiny random DINOv2, no download)")
    parser.add_argument("--encoder-image-size", type=int, default=None,
                        help=f"encoder input size (default {TINY_ENCODER_IMAGE_SIZE} for the tiny encoder, "
                             f"{PRETRAINED_ENCODER_IMAGE_SIZE} with --encoder)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--backend", default=None, help="loss backend (default: auto, the best one present)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--feature-cache", default=None, metavar="DIR",
                        help="train on latents of a tiny VAE, in order over --dataset-size images, with the "
                             "encoder's tokens read through a feature cache in DIR: from the second epoch on "
                             "the decoder and the encoder are not run")
    parser.add_argument("--dataset-size", type=int, default=DATASET_SIZE,
                        help=f"images in the data set (default {DATASET_SIZE})")
    parser.add_argument("--projector", default="layernorm_linear", choices=DEMO_PROJECTORS,
                        help="the projector head of both regularizers: layernorm_linear (SimpleTuner's, default), "
                             "mlp (REPA's, width 256 here), conv (iREPA's conv alone) or irepa (conv + the "
                             "target's spatial z-score)")


def shape_images(count: int, size: int = IMAGE_SIZE, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """`count` RGB images (count, 3, size, size) in [0, 1]: a circle or a square of a random
    colour, position and size on a random plain background."""
    def uniform(*shape, low=0.0, high=1.0):
        return low + (high - low) * torch.rand(*shape, generator=generator)

    coords = (torch.arange(size) + 0.5) / size
    y, x = coords.view(1, size, 1), coords.view(1, 1, size)
    cx, cy = uniform(count, 1, 1, low=0.25, high=0.75), uniform(count, 1, 1, low=0.25, high=0.75)
    radius = uniform(count, 1, 1, low=0.12, high=0.25)
    circle = (x - cx) ** 2 + (y - cy) ** 2 < radius ** 2
    square = torch.maximum((x - cx).abs(), (y - cy).abs()) < radius
    is_circle = torch.rand(count, 1, 1, generator=generator) < 0.5
    mask = torch.where(is_circle, circle, square).unsqueeze(1)
    background, colour = uniform(count, 3, 1, 1), uniform(count, 3, 1, 1)
    return torch.where(mask, colour, background)


def tiny_dinov2(image_size: int = TINY_ENCODER_IMAGE_SIZE) -> nn.Module:
    from transformers import Dinov2Config, Dinov2Model
    config = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                          image_size=image_size, patch_size=14)
    return Dinov2Model(config)


def tiny_unet() -> nn.Module:
    """A two-level UNet2DModel; its mid block works on a 16 x 16 x 64 feature map."""
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=IMAGE_SIZE, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=16)


def tiny_dit() -> nn.Module:
    """A four-block PixArt transformer: 16 x 16 tokens of width 64 (patch 2)."""
    from diffusers import PixArtTransformer2DModel
    return PixArtTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=3, out_channels=3,
                                    num_layers=4, cross_attention_dim=64, sample_size=IMAGE_SIZE, patch_size=2,
                                    caption_channels=16, norm_num_groups=8)


def tiny_vae() -> nn.Module:
    """An AutoencoderKL without downsampling: 3 x 32 x 32 latents for 32 x 32 images, so the
    same tiny models train on latents."""
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), block_out_channels=(16,), latent_channels=3,
                         layers_per_block=1, norm_num_groups=8, sample_size=IMAGE_SIZE, scaling_factor=1.0).eval()


def dit_forward(dit: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The unconditional DiT: one constant caption token."""
    caption = noisy.new_zeros(noisy.shape[0], 1, dit.config.caption_channels)
    return dit(noisy, encoder_hidden_states=caption, timestep=timesteps,
               added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


class _Progress:
    """A tqdm bar when tqdm is installed (it comes with transformers / diffusers), else plain prints."""

    def __init__(self, steps: int, title: str):
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
            print(title)
        self.bar = tqdm(total=steps, desc=title, ncols=110) if tqdm else None

    def show(self, step: int, logs: Dict[str, float]) -> None:
        fields = {"diff": logs["diffusion"], "align": logs["alignment"]}
        if "manifold" in logs:
            fields["manifold"] = logs["manifold"]
        fields["w"] = logs["weight"]
        if self.bar is not None:
            self.bar.set_postfix({name: f"{value:.3f}" for name, value in fields.items()}, refresh=False)
            self.bar.update()
        else:
            print(f"  step {step:3d} " + " ".join(f"{name} {value:+.4f}" for name, value in fields.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _train(title: str, model: nn.Module, regularizer, forward: Callable, batches: Callable, args,
           device: torch.device) -> List[Dict[str, float]]:
    """DDPM noise prediction plus the regularizer; `batches(step)` -> (clean sample, the
    regularizer's inputs). One dict of plain floats per step."""
    from diffusers import DDPMScheduler
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    model.to(device).train()
    regularizer.to(device).train()
    optimizer = torch.optim.AdamW([*model.parameters(), *regularizer.parameters()], lr=1e-3)
    history = []
    progress = _Progress(args.steps, title)
    for step in range(args.steps):
        clean, reg_inputs = batches(step)
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(clean),), device=device)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        with regularizer.capture() as cap:
            prediction = forward(model, noisy, timesteps)
        diffusion = F.mse_loss(prediction, noise)
        reg_loss, logs = regularizer(cap, step=step, **reg_inputs)
        loss = diffusion if reg_loss is None else diffusion + reg_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({"diffusion": diffusion.item(), **logs})
        progress.show(step, history[-1])
    progress.close()
    return history


def _trend(history: List[Dict[str, float]], key: str) -> str:
    k = max(1, min(5, len(history) // 3))
    first = sum(h[key] for h in history[:k]) / k
    last = sum(h[key] for h in history[-k:]) / k
    return f"{key} {first:+.3f} -> {last:+.3f}"


def run(args: argparse.Namespace) -> int:
    from .. import BackendUnavailableError, RepaRegularizer, URepaRegularizer, VisionEncoder

    if args.steps < 1 or args.batch_size < 1 or args.dataset_size < args.batch_size:
        raise SystemExit("--steps and --batch-size must be >= 1, --dataset-size >= --batch-size")
    start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        backend = backend_name(args.backend, device)
    except (BackendUnavailableError, ValueError) as err:
        print(f"repa-fast demo: {err}")
        return 2
    torch.manual_seed(args.seed)
    images = shape_images(args.dataset_size)
    vae = latents = None
    if args.feature_cache:  # a trainer that caches latents: the regularizer decodes them
        vae = tiny_vae().to(device)
        with torch.no_grad():
            latents = vae.encode(images.to(device) * 2 - 1).latent_dist.mean * vae.config.scaling_factor

    def batches(step: int):
        """(clean sample, regularizer inputs): random pixels, or latents in order with their keys."""
        if latents is None:
            batch = images[torch.randint(len(images), (args.batch_size,))].to(device)
            return batch * 2 - 1, {"pixels": batch}
        index = [(step * args.batch_size + j) % len(images) for j in range(args.batch_size)]
        return latents[index], {"latents": latents[index], "keys": [f"shape/{i}" for i in index]}
    if args.encoder:
        image_size = args.encoder_image_size or PRETRAINED_ENCODER_IMAGE_SIZE
        encoder = VisionEncoder.from_pretrained(args.encoder, image_size)
        encoder_text = f"DINOv2 {args.encoder}"
    else:
        image_size = args.encoder_image_size or TINY_ENCODER_IMAGE_SIZE
        encoder = VisionEncoder(tiny_dinov2(image_size), image_size)
        encoder_text = "a tiny random DINOv2"
    grid = encoder.grid(IMAGE_SIZE, IMAGE_SIZE)
    print(f"repa-fast demo: {args.steps} steps per model, batch {args.batch_size}, {IMAGE_SIZE}px shapes, "
          f"{encoder_text} ({grid[0]}x{grid[1]} tokens of width {encoder.dim}), projector {args.projector}, "
          f"backend {backend} on {device}")

    unet = tiny_unet()
    urepa = URepaRegularizer.from_config(
        {"urepa_enabled": True, "urepa_lambda": 0.5, "urepa_manifold_weight": 3.0, "urepa_warmup_steps": 2,
         **projector_keys("urepa_", args.projector)},
        unet, encoder=encoder, vae=vae, backend=args.backend, max_train_steps=args.steps,
        feature_cache=args.feature_cache)
    dit = tiny_dit()
    repa = RepaRegularizer.from_config(
        {"crepa_enabled": True, "crepa_block_index": DIT_BLOCK_INDEX, "crepa_lambda": 0.5,
         "crepa_scheduler": "cosine", "crepa_lambda_end": 0.1, **projector_keys("crepa_", args.projector)},
        dit, encoder=encoder, vae=vae, backend=args.backend, max_train_steps=args.steps,
        feature_cache=args.feature_cache)

    runs = []
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # Models this small gain nothing from intra-op threads and lose much on a busy machine.
        torch.set_num_threads(1)
    try:
        for title, model, regularizer, forward in (
                ("UNet2DModel + U-REPA", unet, urepa, lambda m, x, t: m(x, t).sample),
                ("PixArt DiT + REPA", dit, repa, dit_forward)):
            run_start = time.perf_counter()
            history = _train(title, model, regularizer, forward, batches, args, device)
            runs.append((title, history, time.perf_counter() - run_start))
    finally:
        torch.set_num_threads(threads)

    print(f"summary: backend {backend} on {device}, {time.perf_counter() - start:.1f} s in all")
    for title, history, seconds in runs:
        keys = ["diffusion", "alignment"] + (["manifold"] if "manifold" in history[0] else [])
        trends = ", ".join(_trend(history, key) for key in keys)
        print(f"  {title:22s} {trends}, weight {history[-1]['weight']:.3f}, {seconds:.1f} s")
    if args.feature_cache:
        # One folder serves both: the same encoder and VAE, so the same tokens per image.
        for title, regularizer in (("U-REPA", urepa), ("REPA", repa)):
            stats = regularizer.feature_cache.stats
            print(f"  feature cache {args.feature_cache} ({title}): {stats['hits']} hits, {stats['misses']} misses "
                  f"(encoded), {stats['writes']} written")
    ok = all(math.isfinite(value) for _, history, _ in runs for h in history for value in h.values())
    if not ok:
        print("non-finite values appeared")
    return 0 if ok else 1
