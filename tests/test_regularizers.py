"""RepaRegularizer / URepaRegularizer built from the seed's config keys around tiny random
diffusers models, a tiny random DINOv2 and tiny random VAEs."""
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import diffusers  # noqa: E402

import repa_fast as rf  # noqa: E402
from repa_fast.integrations.encoders import pixels_from_latents  # noqa: E402
from repa_fast.integrations.regularizers import default_block_index  # noqa: E402
from test_capture import DITS, tiny_pixart, tiny_sd3, tiny_unet2d, tiny_unet2d_condition  # noqa: E402
from test_encoders import tiny_autoencoder_kl, tiny_dinov2  # noqa: E402

# The configs below name DINOv2-G at 518 px; the tests pass a tiny encoder instead, which the
# regularizer rightly warns about (tests/test_trainer_mistakes.py checks that warning).
pytestmark = pytest.mark.filterwarnings("ignore:encoder= replaces the config's encoder")

SEED_UREPA = {"urepa_enabled": True, "urepa_lambda": 0.5, "urepa_manifold_weight": 3.0,
              "urepa_model": "dinov2_vitg14", "urepa_encoder_image_size": 518}
SEED_REPA = {"crepa_enabled": True, "crepa_block_index": 1, "crepa_lambda": 0.5,
             "crepa_encoder": "dinov2_vitg14", "crepa_encoder_image_size": 518}


def encoder(registers=False):
    return rf.VisionEncoder(tiny_dinov2(registers), image_size=56)


def unet_step(reg, model, inputs, **data):
    with reg.capture() as cap:
        model(**inputs)
    return cap, reg(cap, **data)


def test_urepa_from_seed_config_with_latents():
    unet, inputs = tiny_unet2d_condition()
    vae = tiny_autoencoder_kl(scaling_factor=0.5)
    reg = rf.URepaRegularizer.from_config(SEED_UREPA, unet, encoder=encoder(registers=True), vae=vae)
    latents = torch.randn(2, 4, 8, 8)
    cap, (loss, logs) = unet_step(reg, unet, inputs, latents=latents, step=0)
    # The same numbers from the public pieces.
    tokens, grid = reg.encoder(pixels_from_latents(vae, latents))
    assert grid == (4, 4) and cap.output.shape == (2, 16, 8, 6)
    align, manifold = rf.urepa_loss(cap.output, tokens, *reg.projector.loss_args(), target_grid=grid)
    torch.testing.assert_close(loss, 0.5 * (align + 3.0 * manifold))
    assert logs["alignment"] == pytest.approx(align.item(), rel=1e-6)
    assert logs["manifold"] == pytest.approx(manifold.item(), rel=1e-6) and logs["manifold"] > 0
    assert logs["weight"] == 0.5 and set(logs) == {"alignment", "manifold", "similarity", "weight"}
    loss.backward()
    assert all(p.grad is not None for p in reg.parameters())
    assert unet.conv_in.weight.grad.abs().sum() > 0  # through the captured mid-block features


@pytest.mark.parametrize("name", list(DITS))
def test_repa_on_each_dit_matches_the_functional_loss(name):
    model, inputs, grid = DITS[name]()
    reg = rf.RepaRegularizer.from_config(SEED_REPA, model, encoder=encoder())
    pixels = torch.rand(2, 3, 40, 60)
    with reg.capture() as cap:
        model(**inputs)
    loss, logs = reg(cap, pixels=pixels)
    tokens, target_grid = reg.encoder(pixels)
    expected = rf.repa_loss(cap.output, tokens, *reg.projector.loss_args(), hidden_grid=grid, target_grid=target_grid)
    torch.testing.assert_close(loss, 0.5 * expected)
    assert set(logs) == {"alignment", "similarity", "weight"}
    loss.backward()
    assert reg.projector.linear.weight.grad.abs().sum() > 0


def test_default_block_index_and_range():
    sd3, _, _ = tiny_sd3()
    pixart, _, _ = tiny_pixart()
    sana, _, _ = DITS["sana"]()
    assert default_block_index(sd3) == 8 and default_block_index(pixart) == 10 and default_block_index(sana) == 10
    config = dict(SEED_REPA, crepa_block_index=None)
    with pytest.raises(ValueError, match="block index 10 is out of range: PixArtTransformer2DModel has 3"):
        rf.RepaRegularizer.from_config(config, pixart, encoder=encoder())
    with pytest.raises(ValueError, match="block index 8 is out of range: SD3Transformer2DModel has 3"):
        rf.RepaRegularizer.from_config(config, sd3, encoder=encoder())
    assert rf.RepaRegularizer.from_config(dict(config, crepa_block_index=2), sd3, encoder=encoder()).block_index == 2


def test_wrong_model_type_is_an_error():
    unet, _ = tiny_unet2d()
    dit, _, _ = tiny_sd3()
    with pytest.raises(TypeError, match="U-REPA.*SD3Transformer2DModel has no mid_block.*use RepaRegularizer"):
        rf.URepaRegularizer.from_config(SEED_UREPA, dit, encoder=encoder())
    with pytest.raises(TypeError, match="REPA.*UNet2DModel has no transformer_blocks.*use URepaRegularizer"):
        rf.RepaRegularizer.from_config(SEED_REPA, unet, encoder=encoder())


def test_disabled_config_does_nothing():
    """A trainer builds its regularizer from its whole config; disabled, it loads no encoder,
    captures nothing and returns None, but holds the projector an enabled one would (DDP wraps
    it, checkpoints have the same keys): DINOv2-G's width 1536 by default, without loading it."""
    unet, inputs = tiny_unet2d()
    whole = {**SEED_REPA, "urepa_enabled": False, "learning_rate": 1e-4}
    reg = rf.URepaRegularizer.from_config(whole, unet)  # no encoder given, none loaded
    assert reg.encoder is None and [p.shape for p in reg.parameters()] == [(16,), (16,), (1536, 16), (1536,)]
    enabled = rf.URepaRegularizer.from_config(dict(SEED_UREPA, urepa_model="dinov2_vitg14"), unet,
                                              encoder=encoder())
    assert reg.state_dict().keys() == enabled.state_dict().keys()
    cap, (loss, logs) = unet_step(reg, unet, inputs, pixels=torch.rand(2, 3, 16, 16))
    assert loss is None and logs == {} and cap.output is None and cap.grid is None
    assert not unet._forward_pre_hooks and not unet.mid_block._forward_hooks
    assert reg(cap.output, hidden_grid=cap.grid, pixels=torch.rand(2, 3, 16, 16)) == (None, {})
    with pytest.raises(ValueError, match="crepa_lamda"):
        rf.RepaRegularizer.from_config({"crepa_lamda": 0.5}, unet)


def test_cutoff_gives_none_loss_without_encoding(monkeypatch):
    unet, inputs = tiny_unet2d()
    config = dict(SEED_UREPA, urepa_cutoff_step=2, urepa_warmup_steps=2)
    reg = rf.URepaRegularizer.from_config(config, unet, encoder=encoder())
    pixels = torch.rand(2, 3, 16, 16)
    results = [unet_step(reg, unet, inputs, pixels=pixels)[1] for _ in range(2)]  # steps 0, 1
    (loss0, logs0), (loss1, logs1) = results
    assert logs0["weight"] == 0 and loss0 is not None and loss0.requires_grad  # warmup: 0, still in the graph
    assert logs1["weight"] == 0.25 and loss1.requires_grad
    monkeypatch.setattr(reg.encoder, "forward", None)  # past the cutoff nothing is encoded
    assert unet_step(reg, unet, inputs, pixels=pixels)[1] == (None, {"weight": 0.0})
    assert unet_step(reg, unet, inputs, pixels=pixels, step=7)[1] == (None, {"weight": 0.0})
    assert reg.alignment_loss.step_count == 8


def test_recoverable_threshold_still_computes_and_logs():
    unet, inputs = tiny_unet2d()
    config = dict(SEED_UREPA, urepa_similarity_threshold=-1.0, urepa_threshold_mode="recoverable")
    reg = rf.URepaRegularizer.from_config(config, unet, encoder=encoder())
    _, (loss, logs) = unet_step(reg, unet, inputs, pixels=torch.rand(2, 3, 16, 16))
    assert loss is None and logs["weight"] == 0 and -1 <= logs["alignment"] <= 1 and logs["manifold"] >= 0


def test_parameters_and_state_dict_are_the_projector():
    unet, inputs = tiny_unet2d()
    reg = rf.URepaRegularizer.from_config(SEED_UREPA, unet, encoder=encoder())
    assert [p.shape for p in reg.parameters()] == [(16,), (16,), (32, 16), (32,)]
    pixels = torch.rand(2, 3, 16, 16)
    for _ in range(3):
        _, (loss, _) = unet_step(reg, unet, inputs, pixels=pixels)
    with torch.no_grad():
        reg.projector.linear.weight.mul_(2)
    state = reg.state_dict()
    assert {k for k in state if not k.endswith("_extra_state")} == {
        "alignment_loss.projector.0.weight", "alignment_loss.projector.0.bias",
        "alignment_loss.projector.1.weight", "alignment_loss.projector.1.bias"}
    fresh = rf.URepaRegularizer.from_config(SEED_UREPA, unet, encoder=reg.encoder)
    fresh.load_state_dict(state)
    assert fresh.alignment_loss.step_count == 3
    reg.eval(), fresh.eval()
    with reg.capture() as cap:
        unet(**inputs)
    torch.testing.assert_close(fresh(cap, pixels=pixels)[0], reg(cap, pixels=pixels)[0])


def test_encoder_loaded_from_config_and_use_tae(tmp_path):
    tiny_dinov2().save_pretrained(tmp_path)
    unet, inputs = tiny_unet2d()
    config = dict(SEED_UREPA, urepa_model=str(tmp_path), urepa_encoder_image_size=28, urepa_use_tae=True)
    with pytest.raises(ValueError, match="urepa_use_tae is set.*AutoencoderKL"):
        rf.URepaRegularizer.from_config(config, unet, vae=tiny_autoencoder_kl())
    tae = diffusers.AutoencoderTiny(in_channels=3, out_channels=3, encoder_block_out_channels=(8, 8),
                                    decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                                    num_decoder_blocks=(1, 1), latent_channels=4)
    reg = rf.URepaRegularizer.from_config(config, unet, vae=tae)
    assert reg.encoder.image_size == 28 and reg.encoder.dim == 32
    _, (loss, logs) = unet_step(reg, unet, inputs, latents=torch.randn(2, 4, 4, 4))
    assert loss.requires_grad and logs["manifold"] > 0
    with pytest.raises(ValueError, match="exactly one of pixels"):
        unet_step(reg, unet, inputs)
