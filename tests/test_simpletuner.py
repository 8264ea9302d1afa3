"""The SimpleTuner drop-in (repa_fast.integrations.simpletuner) against SimpleTuner 4.10.1's own
crepa.py, loaded from its wheel at test time: apply() gives its loss, logs and every gradient in
float64 (1e-9) with the schedule running, on square and non-square grids; its projector
checkpoints load and save; its whole config builds a regularizer; the regularizers log under its
names."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repa_fast as rf
import repa_fast.integrations.simpletuner as rf_simpletuner
from repa_fast.integrations.simpletuner import simpletuner_logs
from parity import rel_err
from simpletuner_code import SIMPLETUNER_VERSION, load_crepa

HIDDEN, ENCODER_DIM, PATCH, IMAGE_SIZE = 11, 7, 4, 28   # the stand-in encoder: a 7 x 7 patch grid
STEPS = 7


class StandInDinov2(nn.Module):
    """What SimpleTuner calls on a torch.hub DINOv2: forward -> the CLS vector (B, E),
    forward_features -> {"x_norm_clstoken", "x_norm_patchtokens"}."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, ENCODER_DIM, PATCH, stride=PATCH, dtype=torch.float64)
        self.norm = nn.LayerNorm(ENCODER_DIM, dtype=torch.float64)

    def forward_features(self, pixels):
        tokens = self.norm(self.patch(pixels).flatten(2).transpose(1, 2) + 0.3)
        return {"x_norm_clstoken": tokens.mean(1), "x_norm_patchtokens": tokens}

    def forward(self, pixels):
        return self.forward_features(pixels)["x_norm_clstoken"]


class PatchTokenForward(StandInDinov2):
    """A hub DINOv2 whose forward returns its features dict: SimpleTuner then aligns to the patch
    tokens (the unpatched reference for apply(patch_tokens=True))."""

    def forward(self, pixels):
        return self.forward_features(pixels)


def pixels_of(latents):
    """A fixed decoder: latents (B, 4, h, w) -> pixels (B, 3, 2h, 2w) in (0, 1)."""
    return torch.sigmoid(F.interpolate(latents[:, :3] * 1.5, scale_factor=2, mode="nearest"))


class ImageFoundation:
    """SimpleTuner's model foundation as CREPA sees it: image mode, the unified decode."""
    NAME = "stand-in"

    def __init__(self, crepa_mode):
        self.crepa_mode = crepa_mode

    def supports_validation_preview(self):
        return True

    def decode_latents_to_pixels(self, latents, use_tae=False):
        return pixels_of(latents).unsqueeze(1)  # (B, T=1, C, H, W)


class LegacyVae(nn.Module):
    """What U-REPA's legacy decode reads: config.scaling_factor, a parameter dtype, decode().sample."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros((), dtype=torch.float64), requires_grad=False)
        self.config = SimpleNamespace(scaling_factor=0.5)

    def decode(self, latents):
        return SimpleNamespace(sample=pixels_of(latents * 0.5) * 2.0 - 1.0)  # undo the scaling


SCHEDULE = {"scheduler": "cosine", "warmup_steps": 2, "decay_steps": 6, "lambda_end": 0.1, "cutoff_step": 6,
            "similarity_threshold": 0.99, "similarity_ema_decay": 0.5}


def simpletuner_regularizer(kind, encoder_class=StandInDinov2, **config):
    """SimpleTuner's CrepaRegularizer (image mode) or UrepaRegularizer with a float64 projector and
    a stand-in encoder (its torch.hub load is bypassed: nothing is downloaded)."""
    crepa = load_crepa()
    prefix = "crepa_" if kind == "crepa" else "urepa_"
    keys = {prefix + "enabled": True, prefix + "lambda": 0.7, prefix + "encoder_image_size": IMAGE_SIZE,
            "crepa_block_index": 0, **{prefix + k: v for k, v in SCHEDULE.items()}}
    keys.update(config)
    accelerator = SimpleNamespace(device=torch.device("cpu"))
    if kind == "crepa":
        reg = crepa.CrepaRegularizer(SimpleNamespace(**keys), accelerator, HIDDEN,
                                     model_foundation=ImageFoundation(crepa.CrepaMode.IMAGE), max_train_steps=STEPS)
    else:
        reg = crepa.UrepaRegularizer(SimpleNamespace(**keys), accelerator, HIDDEN, max_train_steps=STEPS)
    reg.encoder, reg.encoder_dim = encoder_class(), ENCODER_DIM
    reg.attach_to_model(nn.Module())
    if reg.projector is not None:   # None when disabled
        reg.projector.double()
    return reg


def hidden_states(kind, tokens, generator):
    if kind == "crepa":
        return torch.randn(2, tokens if isinstance(tokens, int) else tokens[0] * tokens[1], HIDDEN,
                           dtype=torch.float64, generator=generator)
    return torch.randn(2, HIDDEN, *tokens, dtype=torch.float64, generator=generator)


def run(reg, kind, tokens, vae=None):
    """STEPS training steps: per step (loss, logs, grads of hidden and every projector parameter)."""
    generator = torch.Generator().manual_seed(0)
    results = []
    for step in range(STEPS):
        hidden = hidden_states(kind, tokens, generator).requires_grad_()
        latents = torch.randn(2, 4, 14, 14, dtype=torch.float64, generator=generator)
        loss, logs = reg.compute_loss(hidden, latents, vae, step=step)
        grads = None if loss is None else torch.autograd.grad(loss, [hidden, *reg.projector.parameters()])
        results.append((loss, logs, grads))
    return results


def assert_same_results(got, want):
    for step, ((loss, logs, grads), (want_loss, want_logs, want_grads)) in enumerate(zip(got, want)):
        assert (loss is None) == (want_loss is None), step
        assert logs.keys() == want_logs.keys(), step
        for key, value in want_logs.items():
            assert logs[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (step, key)
        if loss is not None:
            assert rel_err(loss, want_loss) < 1e-9, step
            for grad, want_grad in zip(grads, want_grads):
                assert rel_err(grad, want_grad) < 1e-9, step


@pytest.fixture
def patched():
    """apply() for one test, reverted after it."""
    crepa = load_crepa()
    yield lambda **options: rf_simpletuner.apply(crepa, simpletuner_version=SIMPLETUNER_VERSION, **options)
    rf_simpletuner.revert(crepa)
    assert not rf_simpletuner.is_applied(crepa)


def compare(kind, tokens, patched, encoder_class=StandInDinov2, reference_encoder=None, **options):
    """Two identical SimpleTuner regularizers: one unpatched, one patched; same projector weights."""
    rf_simpletuner.revert(load_crepa())
    reference = simpletuner_regularizer(kind, reference_encoder or encoder_class)
    subject = simpletuner_regularizer(kind, encoder_class)
    subject.projector.load_state_dict(reference.projector.state_dict())
    subject.encoder.load_state_dict(reference.encoder.state_dict())
    vae = LegacyVae() if kind == "urepa" else None
    want = run(reference, kind, tokens, vae)
    calls = []
    patched(**options)
    original_repa, original_urepa = rf_simpletuner.repa_loss, rf_simpletuner.urepa_loss
    with pytest.MonkeyPatch.context() as spy:   # count that repa-fast's ops did the work
        spy.setattr(rf_simpletuner, "repa_loss", lambda *a, **k: calls.append(1) or original_repa(*a, **k))
        spy.setattr(rf_simpletuner, "urepa_loss", lambda *a, **k: calls.append(1) or original_urepa(*a, **k))
        got = run(subject, kind, tokens, vae)
    assert len(calls) == STEPS
    assert_same_results(got, want)
    return got


# hidden tokens (CREPA: a count; U-REPA: the mid block's (h, w)) against the 7 x 7 encoder grid
GRIDS = {"square-smaller": (5, 5), "square-larger": (8, 8), "non-square-smaller": (6, 4),
         "non-square-larger": (10, 6), "same-count": (7, 7)}


@pytest.mark.parametrize("grid", GRIDS)
def test_crepa_image_mode_gives_simpletuners_numbers(grid, patched):
    got = compare("crepa", GRIDS[grid], patched)
    # The schedule ran: warmup (weight 0 at step 0), decay, the step cutoff.
    weights = [logs["crepa_weight"] for _, logs, _ in got]
    assert weights[0] == 0.0 and weights[1] > 0 and weights[-1] == 0.0 and got[0][0] is None and got[-1][0] is None
    assert "crepa_alignment_score_ema" in got[1][1]


@pytest.mark.parametrize("grid", GRIDS)
def test_urepa_with_patch_tokens_gives_simpletuners_numbers_on_patch_tokens(grid, patched):
    """apply(patch_tokens=True) with the hub model's CLS forward equals SimpleTuner's code fed the
    patch tokens; the manifold term is no longer 0."""
    got = compare("urepa", GRIDS[grid], patched, reference_encoder=PatchTokenForward, patch_tokens=True)
    assert max(logs["urepa_manifold_loss"] for _, logs, _ in got) > 1e-3


def test_urepa_default_keeps_simpletuners_cls_target(patched):
    got = compare("urepa", (6, 4), patched)
    assert all(abs(logs["urepa_manifold_loss"]) < 1e-12 for _, logs, _ in got)   # one target token


def test_grid_rule_changes_only_non_square_grids(patched):
    compare("urepa", (5, 5), patched, reference_encoder=PatchTokenForward, patch_tokens=True,
            token_alignment="grid")
    with pytest.raises(AssertionError):
        compare("urepa", (6, 4), patched, reference_encoder=PatchTokenForward, patch_tokens=True,
                token_alignment="grid")


def test_modes_it_does_not_cover_stay_simpletuners(patched):
    crepa = load_crepa()
    patched()
    video = simpletuner_regularizer("crepa")
    video.mode = crepa.CrepaMode.VIDEO
    calls = []
    with pytest.MonkeyPatch.context() as spy:
        spy.setattr(rf_simpletuner, "repa_loss", lambda *a, **k: calls.append(1))
        hidden = torch.randn(2, 3, HIDDEN, dtype=torch.float64)   # (B, T, D): one token per frame
        video.compute_loss(hidden, torch.randn(2, 4, 14, 14, dtype=torch.float64), step=3)
        backbone = simpletuner_regularizer("crepa", crepa_use_backbone_features=True)
        loss, logs = backbone.compute_loss(torch.randn(2, 9, HIDDEN, dtype=torch.float64), None,
                                           frame_features=torch.randn(2, 9, HIDDEN, dtype=torch.float64), step=3)
        assert loss is not None and "crepa_loss" in logs
        with pytest.raises(ValueError, match="no intermediate hidden states"):   # SimpleTuner's own errors
            simpletuner_regularizer("crepa").compute_loss(None, None, step=0)
        assert simpletuner_regularizer("urepa", urepa_enabled=False).compute_loss(None, None) == (None, None)
    assert calls == []


def test_apply_refuses_other_versions_and_modules():
    crepa = load_crepa()
    with pytest.raises(RuntimeError, match="tested with SimpleTuner 4.10.1 only, found 4.9.0"):
        rf_simpletuner.apply(crepa, simpletuner_version="4.9.0")
    with pytest.raises(RuntimeError, match="CrepaRegularizer.compute_loss not found"):
        rf_simpletuner.apply(SimpleNamespace(__name__="not_crepa"), simpletuner_version=SIMPLETUNER_VERSION)
    with pytest.raises(ValueError, match="token_alignment"):
        rf_simpletuner.apply(crepa, simpletuner_version=SIMPLETUNER_VERSION, token_alignment="bilinear")
    assert not rf_simpletuner.is_applied(crepa)


def test_apply_twice_keeps_the_original_for_revert(patched):
    crepa = load_crepa()
    original = crepa.UrepaRegularizer.compute_loss
    patched()
    patched(patch_tokens=True)
    rf_simpletuner.revert(crepa)
    assert crepa.UrepaRegularizer.compute_loss is original


# ---------------------------------------------------------------- checkpoints

def test_simpletuner_projector_state_dict_loads_and_saves():
    reference = simpletuner_regularizer("crepa").projector.float()
    model_state = {"crepa_projector." + k: v for k, v in reference.state_dict().items()}
    model_state["transformer_blocks.0.attn.weight"] = torch.zeros(3)   # a whole model's state dict
    projector = rf.RepaProjector(HIDDEN, ENCODER_DIM)
    projector.load_simpletuner_state_dict(model_state)
    hidden = torch.randn(2, 5, HIDDEN)
    torch.testing.assert_close(projector(hidden), reference(hidden))
    saved = projector.simpletuner_state_dict("urepa_projector.")
    assert set(saved) == {"urepa_projector.0.weight", "urepa_projector.0.bias", "urepa_projector.1.weight",
                          "urepa_projector.1.bias"}
    again = rf.RepaProjector(HIDDEN, ENCODER_DIM)
    again.load_simpletuner_state_dict(saved)                  # prefixed
    again.load_simpletuner_state_dict(reference.state_dict())  # unprefixed
    restored = nn.Sequential(nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, ENCODER_DIM))
    restored.load_state_dict({k.removeprefix("urepa_projector."): v for k, v in saved.items()})
    torch.testing.assert_close(restored(hidden), reference(hidden))


def test_bad_projector_state_dicts_are_rejected():
    projector = rf.RepaProjector(HIDDEN, ENCODER_DIM)
    state = projector.simpletuner_state_dict()
    with pytest.raises(ValueError, match="does not fit this projector"):
        rf.RepaProjector(HIDDEN, ENCODER_DIM + 1).load_simpletuner_state_dict(state)
    with pytest.raises(ValueError, match="does not fit this projector"):
        projector.load_simpletuner_state_dict({k: v for k, v in state.items() if not k.endswith("1.bias")})
    both = {**state, **projector.simpletuner_state_dict("urepa_projector.")}
    with pytest.raises(ValueError, match="both crepa_projector.* and urepa_projector.* keys"):
        projector.load_simpletuner_state_dict(both)
    projector.load_simpletuner_state_dict(both, prefix="urepa_projector.")
    with pytest.raises(TypeError, match="mapping"):
        projector.load_simpletuner_state_dict([1, 2])


# ---------------------------------------------------------------- logs

def test_log_translation_matches_simpletuners_records():
    repa = simpletuner_logs("crepa_", {"alignment": -0.25, "similarity": 0.25, "weight": 0.5}, similarity_ema=0.2)
    assert repa == {"crepa_loss": -0.125, "crepa_alignment_score": 0.25, "crepa_similarity_self": 0.25,
                    "crepa_weight": 0.5, "crepa_cutoff": False, "crepa_alignment_score_ema": 0.2}
    off = simpletuner_logs("urepa_", {"alignment": -0.25, "manifold": 0.1, "similarity": 0.25, "weight": 0.0},
                           manifold_weight=3.0)
    assert off == {"urepa_loss": 0.0, "urepa_alignment_loss": 0.0, "urepa_manifold_loss": 0.0,
                   "urepa_similarity": 0.25, "urepa_weight": 0.0, "urepa_cutoff": True}
    assert simpletuner_logs("urepa_", {"weight": 0.0}) == {"urepa_loss": 0.0, "urepa_weight": 0.0,
                                                          "urepa_cutoff": True}
    with pytest.raises(ValueError, match="prefix"):
        simpletuner_logs("repa_", {"weight": 1.0})


# ---------------------------------------------------------------- regularizers from SimpleTuner's config

# Every key SimpleTuner 4.10.1's crepa.py reads, as a SimpleTuner user's config has them (None where
# SimpleTuner's own test config has None), plus keys of the rest of the trainer.
SIMPLETUNER_CONFIG = {
    "learning_rate": 1e-4, "model_family": "sdxl",
    "crepa_enabled": True, "crepa_block_index": 1, "crepa_lambda": 0.5, "crepa_encoder": "dinov2_vitg14",
    "crepa_model": None, "crepa_encoder_image_size": 518, "crepa_spatial_align": True, "crepa_use_tae": False,
    "crepa_drop_vae_encoder": False, "crepa_scheduler": "constant", "crepa_warmup_steps": 0, "crepa_decay_steps": 0,
    "crepa_lambda_end": 0.0, "crepa_power": 1.0, "crepa_cutoff_step": 0, "crepa_similarity_threshold": None,
    "crepa_similarity_ema_decay": 0.99, "crepa_threshold_mode": "permanent", "crepa_adjacent_distance": 2,
    "crepa_adjacent_tau": 1.5, "crepa_cumulative_neighbors": True, "crepa_encoder_frames_batch_size": 8,
    "crepa_normalize_by_frames": False, "crepa_normalize_neighbour_sum": True, "crepa_use_backbone_features": False,
    "crepa_feature_source": None, "crepa_self_flow": False, "crepa_teacher_block_index": None,
    "crepa_self_flow_mask_ratio": 0.1,
    "irepa_enabled": False, "irepa_spatial_norm_alpha": 0.6, "irepa_projector_kernel_size": 3,
    "urepa_enabled": True, "urepa_lambda": 0.5, "urepa_manifold_weight": 3.0, "urepa_model": None,
    "urepa_encoder_image_size": None, "urepa_use_tae": False, "urepa_scheduler": "cosine", "urepa_warmup_steps": 1,
    "urepa_decay_steps": 10, "urepa_lambda_end": 0.0, "urepa_power": 1.0, "urepa_cutoff_step": 0,
    "urepa_similarity_threshold": None, "urepa_similarity_ema_decay": 0.99, "urepa_threshold_mode": "permanent",
}


def test_every_key_simpletuner_reads_is_accepted():
    """The keys above are exactly those crepa.py reads (checked against its source), all accepted."""
    import re
    source = open(load_crepa().__file__).read()
    read = set(re.findall(r'getattr\(config, "((?:crepa|urepa|irepa)_\w+)"', source))
    config_keys = set(rf.RepaConfig.keys()) | set(rf.URepaConfig.keys())
    assert read <= config_keys, read - config_keys
    assert read <= set(SIMPLETUNER_CONFIG)
    repa = rf.RepaConfig.from_dict(SIMPLETUNER_CONFIG, ignore_unrelated=True)
    urepa = rf.URepaConfig.from_dict(SIMPLETUNER_CONFIG, ignore_unrelated=True)
    assert (repa.encoder_name, urepa.encoder_name, urepa.encoder_image_size) == ("dinov2_vitg14",) * 2 + (518,)
    # SimpleTuner's preferences: crepa_model over crepa_encoder; urepa_model, else crepa_model or crepa_encoder.
    assert rf.RepaConfig.from_dict({"crepa_encoder": "dinov2_vits14", "crepa_model": "dinov2_vitb14"}) \
        .encoder_name == "dinov2_vitb14"
    assert rf.URepaConfig.from_dict({"crepa_encoder": "dinov2_vits14", "urepa_enabled": True},
                                    ignore_unrelated=True).model == "dinov2_vits14"
    assert rf.URepaConfig.from_dict({"crepa_model": "dinov2_vitb14", "urepa_model": "dinov2_vitl14"},
                                    ignore_unrelated=True).model == "dinov2_vitl14"


@pytest.mark.parametrize("key, value", [("crepa_self_flow", True), ("crepa_use_backbone_features", True),
                                        ("crepa_feature_source", "backbone"), ("crepa_feature_source", "self_flow"),
                                        ("crepa_teacher_block_index", 4)])
def test_keys_that_change_the_loss_in_ways_not_implemented_are_an_error(key, value):
    config_class = rf.RepaConfig if key.startswith("crepa_") else rf.URepaConfig
    with pytest.raises(ValueError, match=f"{key}={value!r} is not supported"):
        config_class.from_dict({key: value})
    assert rf.RepaConfig.from_dict({"crepa_feature_source": "encoder"}).feature_source == "encoder"


def test_bad_values_of_video_only_keys_are_still_an_error():
    with pytest.raises(ValueError, match="crepa_adjacent_tau must be a finite number > 0"):
        rf.RepaConfig.from_dict({"crepa_adjacent_tau": 0.0})
    with pytest.raises(ValueError, match="irepa_projector_kernel_size must be an integer >= 1"):
        rf.URepaConfig.from_dict({"irepa_projector_kernel_size": 0})
    with pytest.raises(ValueError, match=r"'irepa_enable'.*did you mean 'irepa_enabled'"):
        rf.URepaConfig.from_dict({"irepa_enable": False}, ignore_unrelated=True)


def test_simpletuner_config_builds_regularizers_with_simpletuner_logs_and_checkpoints():
    pytest.importorskip("diffusers")
    from test_capture import tiny_sd3, tiny_unet2d
    from test_regularizers import encoder, unet_step
    unet, inputs = tiny_unet2d()
    urepa = rf.URepaRegularizer.from_config(SIMPLETUNER_CONFIG, unet, encoder=encoder(), max_train_steps=10,
                                            log_names="simpletuner")
    pixels = torch.rand(2, 3, 16, 16)
    _, (loss, logs) = unet_step(urepa, unet, inputs, pixels=pixels, step=0)   # warmup: weight 0
    assert loss.item() == 0.0 and logs["urepa_cutoff"] is True and logs["urepa_weight"] == 0.0
    _, (loss, logs) = unet_step(urepa, unet, inputs, pixels=pixels, step=1)
    assert set(logs) == {"urepa_loss", "urepa_alignment_loss", "urepa_manifold_loss", "urepa_similarity",
                         "urepa_weight", "urepa_cutoff"}
    assert logs["urepa_loss"] == pytest.approx(loss.item(), rel=1e-6) and logs["urepa_cutoff"] is False
    assert logs["urepa_similarity"] == -logs["urepa_alignment_loss"]

    # A projector SimpleTuner saved with the UNet loads, and saves back in its form.
    saved = urepa.simpletuner_state_dict()
    assert set(saved) == {f"urepa_projector.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")}
    fresh = rf.URepaRegularizer.from_config(SIMPLETUNER_CONFIG, unet, encoder=urepa.encoder, max_train_steps=10)
    fresh.load_simpletuner_state_dict({**saved, "conv_in.weight": torch.zeros(1)})
    for name, value in saved.items():
        torch.testing.assert_close(fresh.projector.state_dict()[name.removeprefix("urepa_projector.")], value)

    dit, dit_inputs, _ = tiny_sd3()
    repa = rf.RepaRegularizer.from_config(SIMPLETUNER_CONFIG, dit, encoder=encoder(), log_names="simpletuner")
    with repa.capture() as cap:
        dit(**dit_inputs)
    loss, logs = repa(cap, pixels=torch.rand(2, 3, 16, 16))
    assert set(logs) == {"crepa_loss", "crepa_alignment_score", "crepa_similarity_self", "crepa_weight",
                         "crepa_cutoff", "crepa_alignment_score_ema"}   # SimpleTuner's EMA runs without a threshold too
    assert logs["crepa_loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert repa.simpletuner_prefix == "crepa_projector."
    with pytest.raises(ValueError, match="log_names must be one of 'repa_fast', 'simpletuner'"):
        rf.RepaRegularizer.from_config(SIMPLETUNER_CONFIG, dit, encoder=encoder(), log_names="wandb")


def test_crepa_model_and_crepa_use_tae_reach_the_regularizer(tmp_path):
    pytest.importorskip("diffusers")
    from test_capture import tiny_sd3
    from test_encoders import tiny_autoencoder_kl, tiny_dinov2
    tiny_dinov2().save_pretrained(tmp_path)
    dit, _, _ = tiny_sd3()
    config = {"crepa_enabled": True, "crepa_block_index": 1, "crepa_encoder": "not-a-model",
              "crepa_model": str(tmp_path), "crepa_encoder_image_size": 28}
    assert rf.RepaRegularizer.from_config(config, dit).encoder.image_size == 28   # loaded from crepa_model
    with pytest.raises(ValueError, match="crepa_use_tae is set.*AutoencoderKL"):
        rf.RepaRegularizer.from_config({**config, "crepa_use_tae": True}, dit, vae=tiny_autoencoder_kl())
