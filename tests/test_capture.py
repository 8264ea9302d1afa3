"""capture_unet_mid_block / capture_transformer_block on tiny random diffusers models of each
supported class: the captured tensor is the image stream, in the graph, as the installed
diffusers lays it out. The builders here are shared with test_regularizers and test_ddp."""
import inspect

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from repa_fast import capture_transformer_block, capture_unet_mid_block  # noqa: E402
from repa_fast.integrations.capture import transformer_blocks  # noqa: E402

B, TEXT = 2, 5  # TEXT text tokens, never equal to an image-token count below


def _flux_ids(h, w, axes=3):
    ids = torch.zeros(h * w, axes)
    ids[:, 1] = torch.arange(h).repeat_interleave(w)
    ids[:, 2] = torch.arange(w).repeat(h)
    return ids


def tiny_sd3(sd35: bool = False):
    extra = dict(dual_attention_layers=(0,), qk_norm="rms_norm") if sd35 else {}
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16, **extra)
    inputs = dict(hidden_states=torch.randn(B, 4, 8, 12), encoder_hidden_states=torch.randn(B, TEXT, 16),
                  pooled_projections=torch.randn(B, 8), timestep=torch.tensor([1.0, 2.0]))
    return model, inputs, (4, 6)


def tiny_flux(cls_name: str = "FluxTransformer2DModel"):
    """Flux, Chroma or Flux.2: two double-stream then two single-stream blocks."""
    axes = 4 if cls_name == "Flux2Transformer2DModel" else 3
    extra = {"FluxTransformer2DModel": dict(pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)),
             "ChromaTransformer2DModel": dict(approximator_num_channels=8, approximator_hidden_dim=16,
                                              approximator_layers=1, axes_dims_rope=(2, 2, 4)),
             "Flux2Transformer2DModel": dict(timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2),
                                             guidance_embeds=False)}[cls_name]
    model = getattr(diffusers, cls_name)(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, **extra)
    h, w = 3, 4
    inputs = dict(hidden_states=torch.randn(B, h * w, 8), encoder_hidden_states=torch.randn(B, TEXT, 16),
                  timestep=torch.tensor([0.1, 0.2]), img_ids=_flux_ids(h, w, axes), txt_ids=torch.zeros(TEXT, axes))
    if cls_name == "FluxTransformer2DModel":
        inputs["pooled_projections"] = torch.randn(B, 8)
    return model, inputs, (h, w)


def tiny_pixart():
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3,
        cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=12)
    inputs = dict(hidden_states=torch.randn(B, 4, 8, 12), encoder_hidden_states=torch.randn(B, TEXT, 12),
                  timestep=torch.tensor([1, 2]), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return model, inputs, (4, 6)


def tiny_sana():
    model = diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=3,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12,
        mlp_ratio=2.0, sample_size=8, patch_size=1)
    inputs = dict(hidden_states=torch.randn(B, 4, 8, 12), encoder_hidden_states=torch.randn(B, TEXT, 12),
                  timestep=torch.tensor([1, 2]))
    return model, inputs, (8, 12)


DITS = {
    "sd3": tiny_sd3,
    "sd35": lambda: tiny_sd3(sd35=True),
    "flux": tiny_flux,
    "chroma": lambda: tiny_flux("ChromaTransformer2DModel"),
    "flux2": lambda: tiny_flux("Flux2Transformer2DModel"),
    "pixart": tiny_pixart,
    "sana": tiny_sana,
}


def tiny_unet2d():
    model = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4)
    return model, dict(sample=torch.randn(B, 3, 16, 12), timestep=torch.tensor([3, 7]))


def tiny_unet2d_condition():
    model = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, norm_num_groups=4, attention_head_dim=4)
    return model, dict(sample=torch.randn(B, 4, 16, 12), timestep=torch.tensor([3, 7]),
                       encoder_hidden_states=torch.randn(B, TEXT, 12))


UNETS = {"unet2d": tiny_unet2d, "unet2d_condition": tiny_unet2d_condition}


def first_input(module, args, kwargs):
    """The `hidden_states` (first) argument of a call."""
    bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
    return next(iter(bound.values()))


class Recorder:
    """Independent test hooks: a block's raw output, and what the next consumer received."""

    def __init__(self, block, consumer):
        self.raw = self.consumed = None
        self.handles = [
            block.register_forward_hook(lambda m, a, o: setattr(self, "raw", o)),
            consumer.register_forward_pre_hook(lambda m, a, k: setattr(self, "consumed", first_input(m, a, k)),
                                               with_kwargs=True)]

    def remove(self):
        for handle in self.handles:
            handle.remove()


def text_prefixed(block) -> bool:
    """Chroma's and Flux.2's single-stream blocks take and return one [text; image] sequence."""
    return type(block).__name__ in ("ChromaSingleTransformerBlock", "Flux2SingleTransformerBlock")


@pytest.mark.parametrize("name", list(DITS))
def test_transformer_block_image_tokens(name):
    model, inputs, grid = DITS[name]()
    blocks = transformer_blocks(model)
    image_tokens = grid[0] * grid[1]
    for index, block in enumerate(blocks):
        consumer = blocks[index + 1] if index + 1 < len(blocks) else model.norm_out
        recorder = Recorder(block, consumer)
        with capture_transformer_block(model, index) as cap:
            out = model(**inputs).sample
        recorder.remove()
        tokens = cap.output
        assert tokens.shape == (B, image_tokens, 2 * 8) and cap.grid == grid
        # The installed diffusers' layout of each block type's output.
        raw = recorder.raw
        if isinstance(raw, tuple):  # (encoder_hidden_states, hidden_states): SD3, Flux, double-stream blocks
            assert len(raw) == 2 and raw[1] is tokens
            assert raw[0] is None or raw[0].shape == (B, TEXT, 16)  # None: SD3's last (context_pre_only) block
        elif text_prefixed(block):
            assert raw.shape == (B, TEXT + image_tokens, 16)
            torch.testing.assert_close(tokens, raw[:, TEXT:], rtol=0, atol=0)
        else:  # PixArt, Sana: the image tokens alone
            assert raw is tokens
        # What the model hands on is those image tokens (single-stream blocks get [text; image]).
        consumed = recorder.consumed
        if text_prefixed(consumer):
            consumed = consumed[:, TEXT:]
        torch.testing.assert_close(tokens, consumed, rtol=0, atol=0)
        # In the graph: gradients reach the input embedding, not the output head.
        model.zero_grad()
        tokens.float().square().mean().backward()
        embed_grads = [p.grad for n, p in model.named_parameters()
                       if n.startswith(("pos_embed", "x_embedder", "patch_embed"))]
        assert embed_grads and all(g is not None for g in embed_grads) and any(g.abs().sum() > 0 for g in embed_grads)
        assert model.proj_out.weight.grad is None
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(UNETS))
def test_unet_mid_block(name):
    model, inputs = UNETS[name]()
    recorder = Recorder(model.mid_block, model.up_blocks[0])
    with capture_unet_mid_block(model) as cap:
        model(**inputs)
    recorder.remove()
    assert cap.output is recorder.raw and cap.output.shape == (B, 16, 8, 6) and cap.grid == (8, 6)
    torch.testing.assert_close(cap.output, recorder.consumed, rtol=0, atol=0)
    cap.output.square().mean().backward()
    assert model.conv_in.weight.grad.abs().sum() > 0 and model.conv_out.weight.grad is None


def test_hooks_removed_and_one_forward_per_capture():
    model, inputs = tiny_unet2d()
    with capture_unet_mid_block(model) as cap:
        with pytest.raises(RuntimeError, match="nothing was captured"):
            cap.output
        model(**inputs)
        first = cap.output
        with pytest.raises(RuntimeError, match="UNet2DModel ran a second forward inside one `with"):
            with torch.no_grad():
                model(**inputs)
        assert cap.output is first  # the second forward replaced nothing
    kept = cap.output
    assert not model.mid_block._forward_hooks and not model._forward_pre_hooks
    model(**inputs)
    assert cap.output is kept
    dit, dit_inputs, _ = tiny_pixart()
    with capture_transformer_block(dit, 1):
        pass
    assert not dit.transformer_blocks[1]._forward_hooks and not dit._forward_pre_hooks


def test_gradient_checkpointing_keeps_forward_capture():
    """Non-reentrant checkpointing re-runs the block in backward: the capture keeps the forward
    pass's tensor, and gradients still flow through it."""
    model, inputs, _ = tiny_sd3()
    model.enable_gradient_checkpointing()
    model.train()
    with capture_transformer_block(model, 1) as cap:
        out = model(**inputs).sample
        captured = cap.output
        assert captured.requires_grad
        (out.square().mean() + captured.square().mean()).backward()
        assert cap.output is captured
    assert model.pos_embed.proj.weight.grad.abs().sum() > 0


class ImageFirstBlock(torch.nn.Module):
    """A joint block of an unknown class returning (hidden_states, encoder_hidden_states)."""

    def __init__(self):
        super().__init__()
        self.image, self.text = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, hidden_states, encoder_hidden_states):
        return self.image(hidden_states), self.text(encoder_hidden_states)


class JointDiT(torch.nn.Module):
    """Any model with transformer_blocks: here image tokens (B, S, 8) and text tokens (B, T, 8)."""

    def __init__(self):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([ImageFirstBlock(), ImageFirstBlock()])

    def forward(self, hidden_states, encoder_hidden_states):
        for block in self.transformer_blocks:
            hidden_states, encoder_hidden_states = block(hidden_states, encoder_hidden_states)
        return hidden_states


def test_unknown_joint_block_image_stream_by_shape():
    model = JointDiT()
    image, text = torch.randn(B, 9, 8), torch.randn(B, TEXT, 8)
    with capture_transformer_block(model, 0) as cap:
        out = model(image, encoder_hidden_states=text)
    assert cap.output.shape == (B, 9, 8) and cap.grid is None  # no grid known: square count, the loss infers it
    torch.testing.assert_close(cap.output, model.transformer_blocks[0].image(image))
    assert out.shape == (B, 9, 8)
    with capture_transformer_block(model, 1):  # as many text as image tokens: ambiguous
        with pytest.raises(TypeError, match=r"cannot tell which element of ImageFirstBlock's output"):
            model(image, torch.randn(B, 9, 8))


def test_index_past_last_block_and_wrong_model_type():
    flux, _, _ = tiny_flux()
    with pytest.raises(ValueError, match=r"block index 4 is out of range: FluxTransformer2DModel has 4 transformer"):
        capture_transformer_block(flux, 4)
    with pytest.raises(ValueError, match="block index -1"):
        capture_transformer_block(flux, -1)
    unet, _ = tiny_unet2d()
    with pytest.raises(TypeError, match="UNet2DModel has none.*capture_unet_mid_block"):
        capture_transformer_block(unet, 0)
    with pytest.raises(TypeError, match="FluxTransformer2DModel has none.*capture_transformer_block"):
        capture_unet_mid_block(flux)
