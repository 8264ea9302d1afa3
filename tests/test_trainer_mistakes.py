"""Mistakes a trainer makes in its first hour, caught: a forgotten `with`, two forwards in one
capture, pixels or latents in the wrong range, an `encoder=` its config disagrees with; and a
disabled regularizer that stays a no-op. (The README's loops on 1 and 2 processes, enabled and
disabled: tests/test_readme.py.)"""
import re
import warnings

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import repa_fast as rf  # noqa: E402
from repa_fast.integrations.encoders import encoder_matches_name, encoder_width  # noqa: E402
from test_capture import tiny_pixart, tiny_sd3, tiny_unet2d  # noqa: E402
from test_encoders import tiny_autoencoder_kl, tiny_dinov2  # noqa: E402

UREPA = {"urepa_enabled": True}
REPA = {"crepa_enabled": True, "crepa_block_index": 1}


def encoder(registers=False):
    return rf.VisionEncoder(tiny_dinov2(registers), image_size=56)


def test_forgotten_with_is_a_type_error():
    unet, inputs = tiny_unet2d()
    for config in (UREPA, {"urepa_enabled": False}):
        reg = rf.URepaRegularizer.from_config(config, unet, encoder=encoder())
        cap = reg.capture()  # `with` forgotten
        unet(**inputs)
        with pytest.raises(TypeError, match="context manager that capture\\(\\) returns.*with reg.capture\\(\\) as cap"):
            reg(cap, pixels=torch.rand(2, 3, 16, 16))
        with pytest.raises(TypeError, match="has no .output: write `with reg.capture\\(\\) as cap:`"):
            cap.output
        with pytest.raises(TypeError, match="has no .grid"):
            cap.grid
    with pytest.raises(TypeError, match="hidden must be the captured features.*got str"):
        reg_enabled = rf.URepaRegularizer.from_config(UREPA, unet, encoder=encoder())
        reg_enabled("features", pixels=torch.rand(2, 3, 16, 16))


def test_second_forward_in_one_capture_is_an_error():
    dit, inputs, _ = tiny_sd3()
    reg = rf.RepaRegularizer.from_config(REPA, dit, encoder=encoder())
    with reg.capture() as cap:
        dit(**inputs)
        with pytest.raises(RuntimeError, match="SD3Transformer2DModel ran a second forward"):
            with torch.no_grad():
                dit(**inputs)
    loss, _ = reg(cap, pixels=torch.rand(2, 3, 16, 16))
    assert loss.requires_grad  # the first (grad) forward's features were kept
    with reg.capture() as cap:  # a new capture takes a new forward
        dit(**inputs)
    assert cap.output.requires_grad


def test_disabled_regularizer_checks_the_model_and_loads_nothing(tmp_path):
    unet, _ = tiny_unet2d()
    dit, _, _ = tiny_pixart()
    with pytest.raises(TypeError, match="REPA.*UNet2DModel has no transformer_blocks"):
        rf.RepaRegularizer.from_config({"crepa_enabled": False}, unet)
    reg = rf.RepaRegularizer.from_config({"crepa_block_index": 1, "crepa_encoder": "dinov2_vitb14_reg"}, dit)
    assert not reg.enabled and reg.encoder is None and reg.projector.linear.out_features == 768
    tiny_dinov2().save_pretrained(tmp_path)  # a directory: its config.json alone gives the width
    reg = rf.RepaRegularizer.from_config({"crepa_block_index": 1, "crepa_encoder": str(tmp_path)}, dit)
    assert reg.encoder is None and reg.projector.linear.out_features == 32


def test_encoder_width_and_name_matching(tmp_path):
    assert [encoder_width(n) for n in ("dinov2_vits14", "dino_v2_b", "dinov2_vitl14_reg", "dinov2_g")] == [
        384, 768, 1024, 1536]
    tiny_dinov2().save_pretrained(tmp_path)
    assert encoder_width(tmp_path) == 32
    loaded = rf.VisionEncoder.from_pretrained(tmp_path, 56)
    assert encoder_matches_name(loaded, str(tmp_path)) and not encoder_matches_name(loaded, "/elsewhere")
    assert not encoder_matches_name(loaded, "dinov2_vits14")
    # A random tiny model records no origin: nothing tells it from a hub id.
    assert encoder_matches_name(encoder(), "facebook/dinov2-small")


def caught(action):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        action()
    return [str(w.message) for w in seen if issubclass(w.category, rf.InputWarning)]


def test_encoder_given_against_the_config():
    unet, _ = tiny_unet2d()
    build = lambda config, enc: lambda: rf.URepaRegularizer.from_config(config, unet, encoder=enc)  # noqa: E731
    [message] = caught(build(dict(UREPA, urepa_model="dinov2_vitg14", urepa_encoder_image_size=518), encoder()))
    assert ("urepa_model='dinov2_vitg14', but the encoder given has width 32 and 0 register tokens; "
            "urepa_encoder_image_size=518, but the encoder given resizes to 56") in message
    [message] = caught(build(rf.URepaConfig(enabled=True, encoder_image_size=224), encoder()))
    assert "urepa_encoder_image_size=224" in message and "urepa_model" not in message  # a default: not set
    assert caught(build(UREPA, encoder())) == []  # nothing set: the encoder given decides
    assert caught(build(dict(UREPA, urepa_encoder_image_size=56), encoder())) == []


def test_pixels_out_of_range_warned_once():
    unet, inputs = tiny_unet2d()

    def step(reg, pixels):
        with reg.capture() as cap:
            unet(**inputs)
        return reg(cap, pixels=pixels)

    for pixels, hint in ((torch.rand(2, 3, 16, 16) * 255, "look like \\[0, 255\\]: pass pixels / 255"),
                         (torch.rand(2, 3, 16, 16) * 2 - 1, "look like \\[-1, 1\\]: pass \\(pixels \\+ 1\\) / 2"),
                         (torch.rand(2, 3, 16, 16) * 1.3 - 0.1, "clamp or rescale them")):
        reg = rf.URepaRegularizer.from_config(UREPA, unet, encoder=encoder())
        messages = caught(lambda: [step(reg, pixels) for _ in range(3)])
        assert len(messages) == 1, messages
        assert "the encoder expects images in [0, 1]" in messages[0]
        assert re.search(hint, messages[0]), messages[0]
    reg = rf.URepaRegularizer.from_config(UREPA, unet, encoder=encoder())
    in_range = torch.rand(2, 3, 16, 16).clamp(0.02, 0.98) * 1.04 - 0.02  # bicubic-like overshoot is fine
    assert caught(lambda: step(reg, in_range)) == []
    assert caught(lambda: step(reg, torch.full((2, 3, 16, 16), float("nan")))) == []  # NaN: the loss's business


def test_unscaled_latents_warned_once():
    unet, inputs = tiny_unet2d()
    vae = tiny_autoencoder_kl(scaling_factor=0.18215)
    reg = rf.URepaRegularizer.from_config(UREPA, unet, encoder=encoder(), vae=vae)

    def step(latents):
        with reg.capture() as cap:
            unet(**inputs)
        return reg(cap, latents=latents)

    scaled = torch.randn(2, 4, 4, 4)
    assert caught(lambda: step(scaled)) == []
    messages = caught(lambda: [step(scaled / 0.18215) for _ in range(2)])
    assert len(messages) == 1 and "they look unscaled" in messages[0] and "latents * 0.18215" in messages[0]
    # A scaling factor near 1 cannot be told from a batch: not checked.
    reg_sd3 = rf.URepaRegularizer.from_config(UREPA, unet, encoder=encoder(), vae=tiny_autoencoder_kl(scaling_factor=1.5))
    with reg_sd3.capture() as cap:
        unet(**inputs)
    assert caught(lambda: reg_sd3(cap, latents=scaled / 1.5)) == []
