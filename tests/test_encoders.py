"""VisionEncoder over tiny random transformers DINOv2 models, and pixels_from_latents over tiny
random diffusers VAEs (no downloads: from_pretrained reads a local save_pretrained directory)."""
import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

from repa_fast import VisionEncoder  # noqa: E402
from repa_fast.integrations.encoders import IMAGENET_MEAN, IMAGENET_STD, encoder_hub_id, pixels_from_latents  # noqa: E402

REGISTERS = 4


def tiny_dinov2(registers: bool = False, image_size: int = 56):
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  image_size=image_size, patch_size=14)
    if registers:
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=REGISTERS, **common)
        return transformers.Dinov2WithRegistersModel(config).eval()
    return transformers.Dinov2Model(transformers.Dinov2Config(**common)).eval()


@pytest.mark.parametrize("name, hub_id", [
    ("dinov2_vits14", "facebook/dinov2-small"),
    ("dinov2_vitb14", "facebook/dinov2-base"),
    ("dinov2_vitl14", "facebook/dinov2-large"),
    ("dinov2_vitg14", "facebook/dinov2-giant"),
    ("dinov2_vits14_reg", "facebook/dinov2-with-registers-small"),
    ("dinov2_vitb14_reg", "facebook/dinov2-with-registers-base"),
    ("dinov2_vitl14_reg", "facebook/dinov2-with-registers-large"),
    ("dinov2_vitg14_reg", "facebook/dinov2-with-registers-giant"),
    ("dino_v2_g", "facebook/dinov2-giant"),
    ("dinov2_g", "facebook/dinov2-giant"),
    ("dinov2-vitg14", "facebook/dinov2-giant"),
    ("dino_v2_s", "facebook/dinov2-small"),
    ("dinov2_s", "facebook/dinov2-small"),
    ("dinov2-vitb14", "facebook/dinov2-base"),
    ("  DINOv2_ViTL14 ", "facebook/dinov2-large"),
])
def test_seed_names_map_to_hub_ids(name, hub_id):
    assert encoder_hub_id(name) == hub_id


def test_unknown_names():
    assert encoder_hub_id("facebook/dinov2-base") is None
    assert encoder_hub_id("clip_vitl14") is None
    with pytest.raises(ValueError, match="unknown encoder 'clip_vitl14'"):
        VisionEncoder.from_pretrained("clip_vitl14")  # neither a name, a hub id nor a directory


def preprocess(pixels, size):
    x = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("registers", [False, True])
def test_patch_tokens_are_final_layernorm_without_cls_and_registers(registers):
    model = tiny_dinov2(registers)
    encoder = VisionEncoder(model, image_size=56)
    pixels = torch.rand(3, 3, 70, 50)
    tokens, grid = encoder(pixels)
    assert grid == (4, 4) and tokens.shape == (3, 16, 32)
    with torch.no_grad():  # the model's own pre-LayerNorm sequence, then its final LayerNorm
        out = model(pixel_values=preprocess(pixels, (56, 56)), output_hidden_states=True)
        expected = model.layernorm(out.hidden_states[-1])
    skip = 1 + (REGISTERS if registers else 0)
    assert expected.shape[1] == skip + 16
    torch.testing.assert_close(tokens, expected[:, skip:], rtol=1e-5, atol=1e-5)
    assert tokens.std(dim=1).mean() > 0.1  # N > 1 distinct tokens, not a CLS vector


def patch_view(image, p):
    """(B, 3, H, W) -> (B, h, w, 3, p, p) patches."""
    b, c, hh, ww = image.shape
    return image.view(b, c, hh // p, p, ww // p, p).permute(0, 2, 4, 1, 3, 5)


def from_patches(patches):
    b, h, w, c, p, _ = patches.shape
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(b, c, h * p, w * p)


@pytest.mark.parametrize("registers, keep_aspect, size, grid", [
    (False, False, (56, 56), (4, 4)),
    (True, False, (56, 56), (4, 4)),
    (False, True, (28, 56), (2, 4)),   # image_size 40, aspect 2 -> 28 x 56 pixels: no resize
    (True, True, (56, 28), (4, 2)),
])
def test_tokens_are_in_row_major_grid_order(registers, keep_aspect, size, grid):
    """Without position embeddings DINOv2 is permutation-equivariant over patches: moving the
    image's patches must move the tokens the same way, token i being patch (i // w, i % w)."""
    model = tiny_dinov2(registers)
    with torch.no_grad():
        model.embeddings.position_embeddings.zero_()
    encoder = VisionEncoder(model, image_size=40 if keep_aspect else 56, keep_aspect=keep_aspect)
    assert encoder.input_size(*size) == size
    image = torch.rand(2, 3, *size)
    tokens, got_grid = encoder(image)
    assert got_grid == grid and tokens.shape[1] == grid[0] * grid[1]
    h, w = grid
    perm = torch.randperm(h * w)  # new cell k shows old cell perm[k]
    patches = patch_view(image, 14).reshape(2, h * w, 3, 14, 14)[:, perm].reshape(2, h, w, 3, 14, 14)
    moved, _ = encoder(from_patches(patches))
    torch.testing.assert_close(moved, tokens[:, perm], rtol=1e-4, atol=1e-5)
    # A one-patch shift to the right (wrapping) rolls each grid row by one token.
    shifted, _ = encoder(torch.roll(image, shifts=14, dims=3))
    rolled = tokens.view(2, h, w, -1).roll(1, dims=2).reshape(2, h * w, -1)
    torch.testing.assert_close(shifted, rolled, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("image_size, height, width", [(518, 512, 1024), (518, 1024, 576), (224, 300, 300),
                                                       (518, 1000, 10)])
def test_keep_aspect_grid_nearest_aspect_at_same_area(image_size, height, width):
    encoder = VisionEncoder(tiny_dinov2(), image_size=image_size, keep_aspect=True)
    rows, cols = encoder.input_size(height, width)
    assert rows % 14 == 0 and cols % 14 == 0 and rows >= 14 and cols >= 14
    assert encoder.grid(height, width) == (rows // 14, cols // 14)
    # Each side is the rounding of the exact same-area, same-aspect side: within half a patch.
    aspect = width / height
    assert abs(rows - image_size / math.sqrt(aspect)) <= 7 or rows == 14
    assert abs(cols - image_size * math.sqrt(aspect)) <= 7 or cols == 14
    assert VisionEncoder(tiny_dinov2(), image_size=image_size).input_size(height, width) == (image_size, image_size)


def test_frozen_eval_no_grad_dtype_and_chunks():
    model = tiny_dinov2().train()
    encoder = VisionEncoder(model, image_size=28, dtype=torch.float64)
    encoder.train()  # a trainer's .train() leaves the frozen model in eval mode
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    pixels = torch.rand(5, 3, 30, 30, requires_grad=True)
    tokens, grid = encoder(pixels)
    assert tokens.dtype == torch.float64 and not tokens.requires_grad and grid == (2, 2)
    chunked = VisionEncoder(model, image_size=28, chunk_size=2)
    torch.testing.assert_close(chunked(pixels)[0], tokens, rtol=1e-10, atol=1e-12)


def test_bad_inputs():
    with pytest.raises(TypeError, match="Dinov2Model"):
        VisionEncoder(torch.nn.Linear(3, 3))
    encoder = VisionEncoder(tiny_dinov2(), image_size=28)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(2, 4, 28, 28\)"):
        encoder(torch.rand(2, 4, 28, 28))
    with pytest.raises(TypeError, match="floating"):
        encoder(torch.zeros(2, 3, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="image_size"):
        VisionEncoder(tiny_dinov2(), image_size=0)


@pytest.mark.parametrize("registers", [False, True])
def test_from_pretrained_local_directory(tmp_path, registers):
    model = tiny_dinov2(registers)
    model.save_pretrained(tmp_path)
    encoder = VisionEncoder.from_pretrained(tmp_path, image_size=28)
    assert type(encoder.model) is type(model) and encoder.num_register_tokens == (REGISTERS if registers else 0)
    pixels = torch.rand(2, 3, 28, 28)
    torch.testing.assert_close(encoder(pixels)[0], VisionEncoder(model, image_size=28)(pixels)[0])


def tiny_autoencoder_kl(**config):
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                   latent_channels=4, norm_num_groups=4, sample_size=16, **config).eval()


@pytest.mark.parametrize("config, unscale", [
    (dict(scaling_factor=0.5), lambda z: z / 0.5),                                  # SD / SDXL style
    (dict(scaling_factor=1.5, shift_factor=0.1), lambda z: z / 1.5 + 0.1),         # SD3 / Flux style
    (dict(scaling_factor=0.5, latents_mean=(0.1, 0.2, 0.3, 0.4), latents_std=(1.0, 2.0, 3.0, 4.0)),
     lambda z: z * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1) / 0.5
     + torch.tensor([0.1, 0.2, 0.3, 0.4]).view(1, 4, 1, 1)),
])
def test_pixels_from_latents_autoencoder_kl(config, unscale):
    vae = tiny_autoencoder_kl(**config)
    latents = torch.randn(2, 4, 8, 8, requires_grad=True)
    pixels = pixels_from_latents(vae, latents)
    assert pixels.shape == (2, 3, 16, 16) and not pixels.requires_grad and pixels.dtype == torch.float32
    assert 0 <= pixels.min() and pixels.max() <= 1
    with torch.no_grad():
        expected = (vae.decode(unscale(latents)).sample.clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(pixels, expected)


def test_pixels_from_latents_autoencoder_tiny():
    vae = diffusers.AutoencoderTiny(in_channels=3, out_channels=3, encoder_block_out_channels=(8, 8),
                                    decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                                    num_decoder_blocks=(1, 1), latent_channels=4).eval()
    latents = torch.randn(2, 4, 4, 4)
    pixels = pixels_from_latents(vae, latents)
    assert pixels.shape == (2, 3, 8, 8) and 0 <= pixels.min() and pixels.max() <= 1
    with torch.no_grad():
        expected = (vae.decode(latents).sample.clamp(-1, 1) + 1) / 2  # scaling 1, shift 0
    torch.testing.assert_close(pixels, expected)
    with pytest.raises(ValueError, match="latents must be"):
        pixels_from_latents(vae, torch.randn(4, 4, 4))
