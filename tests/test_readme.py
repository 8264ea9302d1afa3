"""Every ```python block of README.md runs as written, with tiny models standing in for downloads.

The convention, for whoever adds a block to the README:
- Every block fenced ```python runs; blocks fenced ```bash, ```text (or anything else) do not.
- A block runs in a fresh namespace holding the stand-ins it uses by name (STANDINS below): the
  objects a README block leaves to the trainer, which it lists in a first `# Yours: ...` comment
  (models, VAE, dataset, max_steps, ...), built tiny and offline from configs. A new block that
  needs a new name adds a stand-in here. `VisionEncoder.from_pretrained` gives a tiny random
  DINOv2 (no download), at the requested image size up to 56 px.
- A block preceded by the line `<!-- readme-test: NAME -->` is run by RUNNERS[NAME] instead: for
  a block that only defines something (say a function), the runner calls it and checks it.
- The other blocks run on 1 and on 2 CPU processes (gloo; the process group set up as torchrun
  does, before the block), as written and again with every `_enabled": True` set to False. An
  InputWarning (pixel range, latent scale, encoder vs config) is an error. After each block,
  every regularizer it built must have run max_steps steps with logs (enabled) or returned
  `(None, {})` untouched (disabled), and hold the same projector on every rank.
"""
import ast
import os
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import repa_fast as rf  # noqa: E402
from repa_fast.integrations.input_checks import InputWarning  # noqa: E402
from repa_fast.integrations.regularizers import _Regularizer  # noqa: E402
from distributed import gloo_group, spawn  # noqa: E402
from test_capture import tiny_unet2d_condition  # noqa: E402
from test_encoders import tiny_autoencoder_kl, tiny_dinov2  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(?:^<!-- readme-test: (?P<runner>[\w-]+) -->\n)?^```(?P<lang>\S*)\n(?P<code>.*?)^```", re.S | re.M)
MAX_STEPS = 3
ENCODER_IMAGE_SIZE = 56
TEXT = 5  # text tokens


def readme_blocks():
    """(runner name or None, code, line) of each ```python block."""
    text = README.read_text()
    return [(m["runner"], m["code"], text.count("\n", 0, m.start("code")) + 1)
            for m in BLOCK.finditer(text) if m["lang"] == "python"]


def tiny_sd3(num_layers=9):
    """Nine blocks: the README's crepa_block_index 8 is in range."""
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=num_layers, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        out_channels=4, pos_embed_max_size=16)


def tiny_flux():
    """Four-channel latents packed 2 x 2: 16 input channels."""
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))


def tiny_dataset(size=8, latent_hw=(8, 8)):
    """Items as the README's loops read them: scaled latents (std ~1) and text embeddings."""
    return [{"latents": torch.randn(4, *latent_hw), "text_emb": torch.randn(TEXT, 12),
             "prompt_embeds": torch.randn(TEXT, 16), "pooled_embeds": torch.randn(8)} for _ in range(size)]


STANDINS = {
    # API in five lines
    "hidden": lambda: torch.randn(2, 16, 64),
    "ln": lambda: torch.nn.LayerNorm(64),
    "proj": lambda: torch.nn.Linear(64, 1536),
    "dino_tokens": lambda: torch.randn(2, 16, 1536),
    "mid_block_out": lambda: torch.randn(2, 1280, 4, 4),
    "projector": lambda: rf.RepaProjector(1280, 1536),
    "global_step": lambda: 0,
    # training loops
    "unet": lambda: tiny_unet2d_condition()[0],
    "transformer": tiny_sd3,
    "vae": lambda: tiny_autoencoder_kl(scaling_factor=0.18215),
    "scheduler": lambda: diffusers.DDPMScheduler(num_train_timesteps=1000),
    "dataset": tiny_dataset,
    "max_steps": lambda: MAX_STEPS,
}


def tiny_from_pretrained(cls, name_or_path, image_size=518, **kwargs):
    return cls(tiny_dinov2(), min(image_size, ENCODER_IMAGE_SIZE))


def names_used(code):
    return {node.id for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Name)}


def run_block(code, line, seed=0):
    """Run one block in a fresh namespace of the stand-ins it names; returns the namespace."""
    torch.manual_seed(seed)  # the same stand-ins on every rank, as a trainer's seeded setup
    namespace = {"__name__": "readme"}
    namespace.update({name: STANDINS[name]() for name in sorted(names_used(code) & STANDINS.keys())})
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        exec(compile(code, f"{README}:{line}", "exec"), namespace)
    return namespace


def check_regularizers(namespace, enabled, world):
    """Each regularizer the block built ran as its config says, under DDP on several processes
    (disabled too); returns their parameters."""
    regularizers = {name: value for name, value in namespace.items() if isinstance(value, _Regularizer)}
    wrapped = {id(value.module) for value in namespace.values() if isinstance(value, DDP)}
    for name, reg in regularizers.items():
        assert reg.enabled == enabled, name
        assert world == 1 or id(reg) in wrapped, name
        if enabled:
            assert reg.alignment_loss.step_count == MAX_STEPS, name
            assert {"alignment", "similarity", "weight"} <= namespace["logs"].keys()
        else:
            assert reg.alignment_loss.step_count == 0 and namespace["logs"] == {}, name
            assert all(p.grad is None for p in reg.parameters()), name
    return {name: {k: p.detach().clone() for k, p in reg.named_parameters()} for name, reg in regularizers.items()}


def variants(code):
    """The block as written and, when it enables a regularizer, disabled."""
    disabled = code.replace('_enabled": True', '_enabled": False')
    return [(code, True)] + ([(disabled, False)] if disabled != code else [])


def _worker(rank, world, port, out_dir):
    rf.VisionEncoder.from_pretrained = classmethod(tiny_from_pretrained)
    # the variables `accelerate launch --cpu` (torchrun) sets
    launcher = dict(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                    ACCELERATE_USE_CPU="true")
    with gloo_group(rank, world, port, **launcher):
        results = {}
        for runner, code, line in readme_blocks():
            if runner is not None:
                continue
            for variant, enabled in variants(code):
                namespace = run_block(variant, line)
                results[(line, enabled)] = check_regularizers(namespace, enabled, world)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_readme_has_the_blocks_this_test_knows():
    blocks = readme_blocks()
    runners = {runner for runner, _, _ in blocks if runner is not None}
    assert runners <= RUNNERS.keys(), runners - RUNNERS.keys()
    codes = [code for runner, code, _ in blocks if runner is None]
    assert any("accelerator.prepare" in code for code in codes) and any("DDP(repa" in code for code in codes)
    for code in codes:
        ast.parse(code)


@pytest.mark.parametrize("world", [1, 2])
def test_readme_blocks_run_enabled_and_disabled(world, tmp_path):
    spawn(_worker, world, tmp_path, 400)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]
    loops = [key for key, regs in results[0].items() if regs]
    assert {enabled for _, enabled in loops} == {True, False} and len(loops) == 4  # two loops, on and off
    for key in loops:
        for rank in range(1, world):  # DDP kept the ranks' projectors identical
            for name, state in results[0][key].items():
                for param, value in state.items():
                    torch.testing.assert_close(results[rank][key][name][param], value, rtol=0, atol=0)


class Echo(torch.nn.Module):
    """A 'model' that returns its input tokens: predict must then give back its input."""

    def forward(self, hidden_states, **kwargs):
        return SimpleNamespace(sample=hidden_states)


def run_flux_predict(code, line):
    """The Flux `predict`: packs and unpacks exactly (Echo), and on a tiny Flux the capture reads
    the grid from img_ids and the regularizer trains."""
    namespace = run_block("import torch\n" + code, line)
    predict = namespace["predict"]
    latents = torch.randn(2, 4, 8, 12)  # not square: a swapped row / column would show
    batch = {"prompt_embeds": torch.randn(2, TEXT, 16), "pooled_embeds": torch.randn(2, 8)}
    sigma = torch.rand(2)
    torch.testing.assert_close(predict(Echo(), latents, sigma, batch), latents, rtol=0, atol=0)
    flux = tiny_flux()
    encoder = rf.VisionEncoder(tiny_dinov2(), ENCODER_IMAGE_SIZE)
    repa = rf.RepaRegularizer.from_config({"crepa_enabled": True, "crepa_block_index": 1}, flux, encoder=encoder,
                                          vae=tiny_autoencoder_kl(scaling_factor=0.18215))
    with repa.capture() as cap:
        pred = predict(flux, latents, sigma, batch)
    assert pred.shape == latents.shape and cap.grid == (4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        loss, logs = repa(cap, latents=latents)
    (loss + pred.square().mean()).backward()
    assert torch.isfinite(loss) and repa.projector.linear.weight.grad.abs().sum() > 0
    assert flux.x_embedder.weight.grad.abs().sum() > 0


RUNNERS = {"flux_predict": run_flux_predict}


@pytest.mark.parametrize("runner, code, line", [b for b in readme_blocks() if b[0] is not None],
                         ids=lambda value: value if isinstance(value, str) and "\n" not in value else "")
def test_readme_runner_blocks(runner, code, line):
    RUNNERS[runner](code, line)
