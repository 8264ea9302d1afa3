"""The projector kinds (SimpleTuner's LayerNorm + Linear, REPA's MLP, iREPA's conv + target
z-score) and several encoders at once: float64 parity of every backend that runs here, and the
peers' own code (SimpleTuner 4.10.1's crepa.py, REPA's MLP head and loss formula)."""
import re
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repa_fast as rf
from repa_fast.projectors import projector_losses
from parity import (TOLERANCE, assert_matches_reference, interpolate_tokens, literal_cosine, literal_manifold,
                    projection_inputs, rel_err)
from simpletuner_code import load_crepa

BACKENDS = ["torch", "triton"]
F64 = torch.float64


def _projector(kind, hidden_dim, encoder_dim, dtype=F64, **kwargs):
    projector = rf.RepaProjector(hidden_dim, encoder_dim, kind, **kwargs).to(dtype)
    with torch.no_grad():   # away from the default init, as after some training
        for param in projector.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return projector


def _target_near(z: torch.Tensor, tokens: int) -> torch.Tensor:
    """A target correlated with the projection z (B, S, E), resampled to `tokens` (see parity.py)."""
    z = interpolate_tokens(z.detach(), (z.shape[1],), (tokens,))
    return (z + 0.4 * z.std() * torch.randn_like(z)).contiguous()


class _Losses(nn.Module):
    """projector_losses as a module, so torch.func.functional_call can feed the projector's
    parameters as leaves of the parity helpers."""

    def __init__(self, projector, **options):
        super().__init__()
        self.projector, self.options = projector, options

    def forward(self, hidden, target, backend):
        return projector_losses(self.projector, hidden, target, backend=backend, **self.options)


def _as_function(projector, **options):
    """fn(hidden, target, <param>=..., backend=...) -> projector_losses' outputs, param names with
    '.' as '_'."""
    module = _Losses(projector, **options)
    names = {name.replace(".", "_"): name for name, _ in module.named_parameters()}

    def fn(hidden, target, backend, **params):
        return torch.func.functional_call(module, {names[k]: v for k, v in params.items()}, (hidden, target, backend))
    return fn, {k: dict(module.named_parameters())[v].detach() for k, v in names.items()}


# id: (kind, batch, hidden tokens, hidden grid, D, target tokens, target grid, E, options)
CASES = {
    "mlp-same-count": ("mlp", 2, 9, None, 10, 9, None, 7, dict(mlp_width=12)),
    "mlp-hidden-shrinks": ("mlp", 2, 25, None, 10, 9, None, 7, dict(mlp_width=12, mlp_depth=2)),
    "mlp-target-shrinks-1d": ("mlp", 2, 5, None, 10, 7, None, 7, dict(mlp_width=12, mlp_depth=1)),
    "mlp-one-token": ("mlp", 3, 1, None, 10, 1, None, 7, dict(mlp_width=12)),
    "conv-same-grid": ("conv", 2, 20, (4, 5), 10, 20, (4, 5), 7, {}),
    "conv-hidden-shrinks": ("conv", 2, 35, (5, 7), 10, 9, None, 7, dict(kernel_size=5)),
    "conv-target-shrinks": ("conv", 2, 9, None, 10, 16, None, 7, dict(kernel_size=1)),
    "layernorm-linear": ("layernorm_linear", 2, 16, None, 10, 9, None, 7, {}),
}


def _case(case, alpha, manifold):
    kind, batch, tokens, grid, dim, target_tokens, target_grid, encoder_dim, kwargs = CASES[case]
    projector = _projector(kind, dim, encoder_dim, **kwargs)
    hidden = 2.0 * torch.randn(batch, tokens, dim, dtype=F64) + 0.5
    with torch.no_grad():
        z = projector(hidden, grid)
    target = _target_near(z, target_tokens)
    if alpha is not None and target_tokens > 1:   # correlated with z after the z-score
        target = target * target.std(1, keepdim=True) + target.mean(1, keepdim=True) * 0.5
    fn, params = _as_function(projector, hidden_grid=grid, target_grid=target_grid, target_zscore_alpha=alpha,
                              manifold=manifold)
    return fn, {"hidden": hidden, "target": target, **params}


@pytest.mark.parametrize("manifold", [False, True], ids=["repa", "urepa"])
@pytest.mark.parametrize("alpha", [None, 0.6], ids=["plain", "zscore"])
@pytest.mark.parametrize("case", CASES)
def test_projector_losses_float64_torch_against_the_literal_formulas(case, alpha, manifold):
    fn, inputs = _case(case, alpha, manifold)
    kind, *_, kwargs = CASES[case]
    grid = CASES[case][3]
    target_grid = CASES[case][6]
    projector = rf.RepaProjector(inputs["hidden"].shape[-1], inputs["target"].shape[-1], kind, **kwargs).double()
    with torch.no_grad():
        for name, param in projector.named_parameters():
            param.copy_(inputs["projector_" + name.replace(".", "_")])
    z = projector(inputs["hidden"], grid)
    t = inputs["target"]
    if alpha is not None:
        std = t.std(1, keepdim=True) if t.shape[1] > 1 else torch.zeros_like(t[:, :1])
        t = (t - alpha * t.mean(1, keepdim=True)) / (std + 1e-6)
    z, t = rf.align_tokens(z, t, a_grid=grid, b_grid=target_grid)
    expected = (literal_cosine(z, t), literal_manifold(z, t)) if manifold else (literal_cosine(z, t),)
    for out, ref in zip(fn(**inputs, backend="torch"), expected):
        assert rel_err(out, ref) <= 1e-12


# The manifold term of one token is 0 up to rounding: no relative error to compare there.
PARITY_CASES = [pytest.param(case, manifold, id=f"{case}-{'urepa' if manifold else 'repa'}")
                for case in ["mlp-hidden-shrinks", "mlp-one-token", "conv-hidden-shrinks", "conv-same-grid",
                             "layernorm-linear"] for manifold in (False, True) if not (manifold and "one-token" in case)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [None, 0.6], ids=["plain", "zscore"])
@pytest.mark.parametrize("case, manifold", PARITY_CASES)
def test_projector_losses_match_the_float64_reference(case, manifold, alpha, backend, dtype):
    fn, inputs = _case(case, alpha, manifold)
    inputs = {k: v.to(dtype) for k, v in inputs.items()}
    assert_matches_reference(fn, inputs, backend=backend, grad_names=[k for k in inputs if k != "target"])


# ---------------------------------------------------------------- several encoders

def _several_inputs(dtype):
    """hidden (2, 16, 12) against three encoders: 16 tokens (no resampling), 9 (hidden shrinks) and
    another 16-token one sharing the first's GEMM."""
    encoders = [projection_inputs(2, 16, 12, tokens, width, dtype=dtype) for tokens, width in ((16, 7), (9, 5), (16, 3))]
    hidden = encoders[0]["hidden"]
    for encoder in encoders[1:]:   # targets near their projection of the shared hidden
        z = F.linear(F.layer_norm(hidden.double(), (12,), encoder["ln_weight"].double(), encoder["ln_bias"].double()),
                     encoder["proj_weight"].double(), encoder["proj_bias"].double())
        encoder["target"] = _target_near(z, encoder["target"].shape[1]).to(dtype)
    inputs = {"hidden": hidden}
    for i, encoder in enumerate(encoders):
        inputs.update({f"{name}{i}": value for name, value in encoder.items() if name != "hidden"})
    return inputs


def _several(hidden, backend, **params):
    lists = [[params[f"{name}{i}"] for i in range(3)]
             for name in ("target", "ln_weight", "ln_bias", "proj_weight", "proj_bias")]
    return rf.repa_loss(hidden, *lists, backend=backend)


def test_several_encoders_are_the_mean_of_each_encoders_loss():
    inputs = {k: v.double().requires_grad_(not k.startswith("target")) for k, v in _several_inputs(F64).items()}
    loss = _several(**inputs, backend="torch")
    singles = [rf.repa_loss(inputs["hidden"], *(inputs[f"{name}{i}"] for name in
                                                 ("target", "ln_weight", "ln_bias", "proj_weight", "proj_bias")))
               for i in range(3)]
    expected = torch.stack(singles).mean()
    leaves = [v for k, v in inputs.items() if v.requires_grad]
    for out, ref in zip((loss, *torch.autograd.grad(loss, leaves)), (expected, *torch.autograd.grad(expected, leaves))):
        assert rel_err(out, ref) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_several_encoders_match_the_float64_reference(backend, dtype):
    inputs = _several_inputs(dtype)
    assert_matches_reference(_several, inputs, backend=backend,
                             grad_names=[k for k in inputs if not k.startswith("target")])


def test_several_encoders_module_mixes_kinds_and_takes_lists():
    projectors = [rf.RepaProjector(10, 7, "mlp", mlp_width=8), rf.RepaProjector(10, 5, "conv")]
    module = rf.RepaLoss(10, [7, 5], projector=projectors, schedule=1.0).double()
    hidden = torch.randn(2, 16, 10, dtype=F64)
    targets = [torch.randn(2, 16, 7, dtype=F64), torch.randn(2, 9, 5, dtype=F64)]
    loss, logs = module(hidden, targets)
    expected = torch.stack([projector_losses(p, hidden, t)[0] for p, t in zip(projectors, targets)]).mean()
    assert rel_err(loss, expected) <= 1e-12 and logs["alignment"] == pytest.approx(expected.item())
    loss.backward()
    assert all(p.grad is not None for p in module.parameters())
    with pytest.raises(ValueError, match="this loss aligns 2 encoders: target must be a list of 2, got Tensor"):
        module(hidden, targets[0])
    with pytest.raises(ValueError, match="target_grid must be a list of 2, got tuple of 3"):
        module(hidden, targets, target_grid=((4, 4), (3, 3), (1, 1)))


# ---------------------------------------------------------------- the peers' own code

def _repa_build_mlp(hidden_dim, width, encoder_dim):
    """REPA's models/sit.py build_mlp, as its layers: Linear, SiLU, Linear, SiLU, Linear."""
    return nn.Sequential(nn.Linear(hidden_dim, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                         nn.Linear(width, encoder_dim))


def test_repa_mlp_heads_and_loss_match_repas_formula_in_float64():
    """SiT with two encoders: REPA's checkpoint keys load as they are, and the loss (mean over
    encoders and samples of the mean over tokens of -cos) and every gradient agree."""
    hidden_dim, width, dims, tokens = 12, 16, (7, 5), 16
    heads = nn.ModuleList([_repa_build_mlp(hidden_dim, width, dim) for dim in dims]).double()
    module = rf.RepaLoss(hidden_dim, list(dims), projector="mlp", schedule=1.0).double()
    for p in module.projector_list():
        assert (p.hidden_dim, len(p.hidden_layers), p.hidden_layers[0].out_features) == (hidden_dim, 4, 2048)
    module = rf.RepaLoss(hidden_dim, list(dims), schedule=1.0,
                         projector=[rf.RepaProjector(hidden_dim, dim, "mlp", mlp_width=width) for dim in dims]).double()
    module.load_source_state_dict({f"module.projectors.{k}": v for k, v in heads.state_dict().items()} |
                                  {"module.x_embedder.weight": torch.zeros(1)})
    hidden = torch.randn(3, tokens, hidden_dim, dtype=F64, requires_grad=True)
    with torch.no_grad():
        targets = [_target_near(head(hidden), tokens) for head in heads]
    loss, _ = module(hidden, targets)

    theirs = hidden.detach().clone().requires_grad_()
    proj_loss = 0.0
    for head, target in zip(heads, targets):
        z = F.normalize(head(theirs), dim=-1)
        for z_j, t_j in zip(z, F.normalize(target, dim=-1)):
            proj_loss = proj_loss + (-(z_j * t_j).sum(dim=-1)).mean()
    proj_loss = proj_loss / (len(heads) * theirs.shape[0])

    assert rel_err(loss, proj_loss) <= 1e-12
    ours = torch.autograd.grad(loss, [hidden, *module.parameters()])
    expected = torch.autograd.grad(proj_loss, [theirs, *heads.parameters()])
    for name, out, ref in zip(["hidden", *(n for n, _ in module.named_parameters())], ours, expected):
        assert rel_err(out, ref) <= 1e-12, name


def _simpletuner_irepa(kind, hidden_dim, encoder_dim, kernel_size, alpha):
    """SimpleTuner's CrepaRegularizer / UrepaRegularizer with iREPA on, its projector built as
    attach_to_model does (float64), and its pixel -> encoder steps replaced by `features`."""
    crepa = load_crepa()
    config = types.SimpleNamespace(crepa_enabled=True, urepa_enabled=True, irepa_enabled=True,
                                   irepa_spatial_norm_alpha=alpha, irepa_projector_kernel_size=kernel_size,
                                   crepa_block_index=0, crepa_lambda=0.5, urepa_lambda=0.5)
    accelerator = types.SimpleNamespace(device=torch.device("cpu"))
    cls = crepa.CrepaRegularizer if kind == "crepa" else crepa.UrepaRegularizer
    regularizer = cls(config, accelerator, hidden_dim, max_train_steps=100)
    regularizer.projector = crepa.SpatialConvProjector(hidden_dim, encoder_dim, kernel_size=kernel_size).double()
    return regularizer


@pytest.mark.parametrize("alpha", [0.6, 0.0, 1.0])
# Equal token counts on different grids are left out: SimpleTuner then resamples to the hidden
# side's grid, repa-fast (DESIGN.md §1) to the target's.
@pytest.mark.parametrize("grids", [((4, 4), (4, 4)), ((5, 7), (3, 3)), ((3, 3), (4, 4)), ((1, 1), (1, 1))],
                         ids=["same", "hidden-shrinks", "target-shrinks", "one-token"])
def test_irepa_matches_simpletuners_crepa_py_in_float64(grids, alpha):
    """REPA (CrepaRegularizer, image hidden states (B, 1, S, D)) with iREPA: loss and every gradient."""
    (h, w), (th, tw) = grids
    hidden_dim, encoder_dim, kernel_size = 6, 5, 3
    theirs = _simpletuner_irepa("crepa", hidden_dim, encoder_dim, kernel_size, alpha)
    hidden = torch.randn(2, h * w, hidden_dim, dtype=F64)
    target = torch.randn(2, th * tw, encoder_dim, dtype=F64) + 0.3
    theirs._decode_latents_unified = lambda latents, vae: None
    theirs._encode_frames = lambda video: target.unsqueeze(1)
    their_hidden = hidden.clone().requires_grad_()
    their_loss, _ = theirs.compute_loss(their_hidden.unsqueeze(1), torch.zeros(2, 4, h, w), vae=object())

    module = rf.RepaLoss(hidden_dim, encoder_dim, projector=rf.RepaProjector(hidden_dim, encoder_dim, "conv",
                                                                             kernel_size=kernel_size),
                         target_zscore_alpha=alpha).double()
    module.load_source_state_dict({f"crepa_projector.{k}": v for k, v in theirs.projector.state_dict().items()})
    our_hidden = hidden.clone().requires_grad_()
    # SimpleTuner lays the encoder's tokens out on the grid it infers from their count.
    their_target_grid = theirs._infer_spatial_shape(th * tw, (theirs.encoder_image_size,) * 2)
    loss, _ = module(our_hidden, target, hidden_grid=(h, w), target_grid=their_target_grid)

    assert rel_err(loss, their_loss) <= 1e-9
    ours = torch.autograd.grad(loss, [our_hidden, *module.parameters()])
    expected = torch.autograd.grad(their_loss, [their_hidden, *theirs.projector.parameters()])
    for out, ref in zip(ours, expected):
        assert rel_err(out, ref) <= 1e-9


def test_irepa_urepa_matches_simpletuners_crepa_py_in_float64():
    """U-REPA (UrepaRegularizer, a (B, C, H, W) mid-block) with iREPA: loss and every gradient."""
    hidden_dim, encoder_dim, kernel_size, alpha = 6, 5, 3, 0.6
    theirs = _simpletuner_irepa("urepa", hidden_dim, encoder_dim, kernel_size, alpha)
    fmap = torch.randn(2, hidden_dim, 5, 5, dtype=F64)
    target = torch.randn(2, 16, encoder_dim, dtype=F64) + 0.3
    theirs._decode_latents = lambda latents, vae: None
    theirs._encode_pixels = lambda pixels: target
    their_fmap = fmap.clone().requires_grad_()
    their_loss, _ = theirs.compute_loss(their_fmap, torch.zeros(2, 4, 5, 5), vae=object())

    module = rf.URepaLoss(hidden_dim, encoder_dim, projector="conv", target_zscore_alpha=alpha).double()
    module.load_source_state_dict({f"urepa_projector.{k}": v for k, v in theirs.projector.state_dict().items()})
    our_fmap = fmap.clone().requires_grad_()
    loss, _ = module(our_fmap, target)

    assert rel_err(loss, their_loss) <= 1e-9
    ours = torch.autograd.grad(loss, [our_fmap, *module.parameters()])
    expected = torch.autograd.grad(their_loss, [their_fmap, *theirs.projector.parameters()])
    for out, ref in zip(ours, expected):
        assert rel_err(out, ref) <= 1e-9


@pytest.mark.parametrize("tokens", [1, 2, 13])
def test_spatial_zscore_is_simpletuners(tokens):
    target = torch.randn(3, tokens, 5, dtype=F64)
    ours = rf.reference.spatial_zscore(target, 0.6)
    assert rel_err(ours, load_crepa().spatial_zscore(target, alpha=0.6)) <= 1e-15


# ---------------------------------------------------------------- projectors, state dicts, bad input

def test_each_kind_has_its_codebases_state_dict_keys():
    assert list(rf.RepaProjector(8, 4, "mlp").state_dict()) == [f"{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
    assert list(rf.RepaProjector(8, 4, "conv").state_dict()) == ["projection.weight", "projection.bias"]
    assert rf.RepaProjector(8, 4, "conv", kernel_size=5).conv.kernel_size == (5, 5)
    assert all(p.dtype == torch.float32 for kind in rf.projectors.PROJECTOR_KINDS
               for p in rf.RepaProjector(8, 4, kind).parameters())


def test_conv_projector_runs_on_the_token_grid():
    projector = rf.RepaProjector(6, 4, "conv")
    fmap = torch.randn(2, 6, 3, 5)
    expected = projector.conv(fmap).flatten(2).transpose(1, 2)
    torch.testing.assert_close(projector(fmap), expected)
    torch.testing.assert_close(projector(fmap.flatten(2).transpose(1, 2), (3, 5)), expected)
    with pytest.raises(ValueError, match=r"needs the tokens' grid: hidden of shape \(2, 15, 6\) has 15 tokens"):
        projector(fmap.flatten(2).transpose(1, 2))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(kind="linear"), ValueError, "projector kind must be one of 'layernorm_linear', 'mlp', 'conv', got 'linear'"),
    (dict(kind="conv", kernel_size=4), ValueError, "kernel_size must be a positive odd int, got 4"),
    (dict(kind="mlp", mlp_depth=0), ValueError, "mlp_depth must be a positive int, got 0"),
    (dict(kind="mlp", mlp_width=2.5), ValueError, "mlp_width must be a positive int, got 2.5"),
])
def test_projector_rejects_bad_options(kwargs, error, match):
    with pytest.raises(error, match=re.escape(match)):
        rf.RepaProjector(8, 4, **kwargs)


def test_loss_modules_reject_mismatched_projectors_and_options():
    with pytest.raises(ValueError, match=re.escape("the mlp projector maps 8 -> 4 features, but this loss has "
                                                   "hidden_dim 8 and encoder_dim 5")):
        rf.RepaLoss(8, 5, projector=rf.RepaProjector(8, 4, "mlp"))
    with pytest.raises(TypeError, match="projector must be a kind name, a RepaProjector, got int"):
        rf.RepaLoss(8, 5, projector=3)
    with pytest.raises(ValueError, match="target_zscore_alpha must be None or a finite number >= 0, got -0.5"):
        rf.URepaLoss(8, 5, target_zscore_alpha=-0.5)
    with pytest.raises(ValueError, match="URepaLoss aligns one encoder"):
        rf.URepaLoss(8, [5, 4])
    with pytest.raises(ValueError, match="2 encoder widths but 1 projectors"):
        rf.RepaLoss(8, [5, 4], projector=[rf.RepaProjector(8, 5)])
    with pytest.raises(TypeError, match="loss_args is for the 'layernorm_linear' projector kind; this projector is 'mlp'"):
        rf.RepaProjector(8, 4, "mlp").loss_args()
    with pytest.raises(ValueError, match=re.escape("hidden of shape (2, 9, 7) has 7 and target of shape (2, 9, 4)")):
        rf.RepaLoss(8, 4, projector="mlp")(torch.randn(2, 9, 7), torch.randn(2, 9, 4))
    with pytest.raises(ValueError, match="the conv projector needs the hidden tokens' grid"):
        rf.RepaLoss(8, 4, projector="conv")(torch.randn(2, 10, 8), torch.randn(2, 9, 4))


def test_source_state_dicts_load_or_say_what_they_hold():
    projector = rf.RepaProjector(8, 4, "conv")
    with pytest.raises(ValueError, match=r"no conv projector in state_dict: .* got keys 'net.weight'"):
        projector.load_source_state_dict({"net.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="state_dict does not fit this conv projector"):
        projector.load_source_state_dict({"crepa_projector.projection.weight": torch.zeros(4, 8, 1, 1),
                                          "crepa_projector.projection.bias": torch.zeros(4)})
    source = rf.RepaProjector(8, 4, "conv")
    projector.load_source_state_dict(source.state_dict())
    assert torch.equal(projector.conv.weight, source.conv.weight)


# ---------------------------------------------------------------- config keys and regularizers

def test_config_keys_pick_the_projector():
    assert rf.RepaConfig().projector == "layernorm_linear" and rf.RepaConfig().target_zscore_alpha is None
    irepa = rf.RepaConfig.from_dict({"crepa_enabled": True, "irepa_enabled": True, "irepa_spatial_norm_alpha": 0.5,
                                     "irepa_projector_kernel_size": 5})
    assert (irepa.projector, irepa.target_zscore_alpha, irepa.irepa_projector_kernel_size) == ("conv", 0.5, 5)
    assert rf.URepaConfig.from_dict({"urepa_projector_kind": "mlp"}).projector == "mlp"
    # A trainer's whole config: both regularizers read the shared irepa_* keys.
    assert rf.URepaConfig.from_dict({"irepa_enabled": True, "crepa_lambda": 1}, ignore_unrelated=True).irepa_enabled


@pytest.mark.parametrize("config, match", [
    ({"irepa_enabled": True, "crepa_projector_kind": "mlp"},
     "irepa_enabled uses iREPA's conv projector, but crepa_projector_kind is 'mlp'"),
    ({"irepa_enabled": True, "irepa_projector_kernel_size": 4},
     "irepa_projector_kernel_size must be odd with irepa_enabled, got 4"),
    ({"irepa_spatial_norm_alpha": -1}, "irepa_spatial_norm_alpha must be a finite number >= 0, got -1"),
    ({"crepa_projector_kind": "linear"}, "crepa_projector_kind must be one of 'layernorm_linear', 'mlp', 'conv'"),
    ({"irepa_enabld": True}, "unknown RepaConfig key 'irepa_enabld'; did you mean 'irepa_enabled'"),
])
def test_config_keys_reject_bad_projector_settings(config, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        rf.RepaConfig.from_dict(config, ignore_unrelated=True).projector   # checked when the projector is built


def test_regularizers_build_the_configured_projector():
    pytest.importorskip("diffusers")
    from test_capture import tiny_sd3, tiny_unet2d_condition
    from test_encoders import tiny_dinov2

    encoder = rf.VisionEncoder(tiny_dinov2(False), image_size=56)
    model, inputs, grid = tiny_sd3()
    config = {"crepa_enabled": True, "crepa_block_index": 1, "irepa_enabled": True, "irepa_projector_kernel_size": 1}
    reg = rf.RepaRegularizer.from_config(config, model, encoder=encoder)
    assert reg.projector.kind == "conv" and reg.projector.conv.kernel_size == (1, 1)
    assert reg.alignment_loss.target_zscore_alpha == 0.6
    pixels = torch.rand(2, 3, 40, 60)
    with reg.capture() as cap:
        model(**inputs)
    loss, _ = reg(cap, pixels=pixels)
    tokens, target_grid = reg.encoder(pixels)
    expected, = projector_losses(reg.projector, cap.output, tokens, hidden_grid=grid, target_grid=target_grid,
                                 target_zscore_alpha=0.6)
    torch.testing.assert_close(loss, 0.5 * expected)
    loss.backward()
    assert reg.projector.conv.weight.grad.abs().sum() > 0

    unet, _ = tiny_unet2d_condition()
    reg = rf.URepaRegularizer.from_config({"urepa_enabled": True, "urepa_projector_kind": "mlp",
                                           "urepa_projector_mlp_width": 24}, unet, encoder=encoder)
    assert reg.projector.kind == "mlp" and reg.alignment_loss.target_zscore_alpha is None
    assert reg.projector.hidden_layers[0].out_features == 24


@pytest.mark.parametrize("projector", ["mlp", "irepa"])
def test_demo_trains_with_each_projector(projector, capsys):
    pytest.importorskip("diffusers")
    from repa_fast import cli
    assert cli.main(["demo", "--steps", "2", "--batch-size", "2", "--projector", projector]) == 0
    out = capsys.readouterr().out
    assert f"projector {projector}, backend torch on cpu" in out and "summary:" in out


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_token_alignment_reaches_every_head(kind):
    """Equal counts on different grids: "sequence" (SimpleTuner's rule) leaves them as they are,
    "grid" resamples to the target's grid."""
    projector = _projector(kind, 6, 5)
    hidden, target = torch.randn(2, 24, 6, dtype=F64), torch.randn(2, 24, 5, dtype=F64)
    z = projector(hidden, (4, 6))
    for rule, expected_z, expected_t in (("sequence", z, target),
                                         ("grid", *rf.align_tokens(z, target, a_grid=(4, 6), b_grid=(6, 4)))):
        loss, = projector_losses(projector, hidden, target, hidden_grid=(4, 6), target_grid=(6, 4),
                                 token_alignment=rule)
        assert rel_err(loss, literal_cosine(expected_z, expected_t)) <= 1e-12, rule
