"""Capture the hidden states REPA / U-REPA align, from diffusers models, with forward hooks.

```python
with capture_unet_mid_block(unet) as cap:           # U-REPA: the UNet's bottleneck
    pred = unet(noisy, t, text).sample
loss_fn(cap.output, target)                         # (B, C, H, W), inside the autograd graph

with capture_transformer_block(transformer, 8) as cap:  # REPA: a DiT block's image tokens
    pred = transformer(...).sample
loss_fn(cap.output, target, hidden_grid=cap.grid)   # (B, S, D) image tokens, grid (h, w)
```

The captured tensor is the block's own output, so gradients flow back into the model. DiT
blocks return the image stream in different ways (all checked by tests/test_capture.py against
the installed diffusers): SD3's `JointTransformerBlock`, Flux's two block types and the
double-stream blocks of Chroma and Flux.2 return `(encoder_hidden_states, hidden_states)`;
PixArt and Sana blocks return the image tokens alone; the single-stream blocks of Chroma and
Flux.2 (and of diffusers < 0.33's Flux) return one `[text; image]` sequence, from which the
text prefix is cut. Hooks are removed when the `with` block exits.

One capture holds one forward pass: a second forward of the model inside the same `with`
block (say a no-grad pass after the real one) raises RuntimeError instead of silently
replacing the features; run it outside the block. Passing the context manager itself where
its captured features belong (`reg(reg.capture())`, a forgotten `with`) is a TypeError.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..alignment import Grid

# Position of the image tokens in the tuples these diffusers blocks return (by class name, so
# diffusers need not be imported). Other tuple-returning blocks: the element shaped like the
# block's `hidden_states` input.
_TUPLE_IMAGE_POSITION = {
    "JointTransformerBlock": 1,          # SD3 / SD3.5: (encoder_hidden_states, hidden_states)
    "FluxTransformerBlock": 1,           # Flux double-stream
    "FluxSingleTransformerBlock": 1,     # Flux single-stream (diffusers >= 0.33)
    "ChromaTransformerBlock": 1,
    "Flux2TransformerBlock": 1,
}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DistributedDataParallel / DataParallel (`.module`) and torch.compile
    (`._orig_mod`) wrappers, whose submodules the hooks go on."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _bind(module: nn.Module, args: tuple, kwargs: dict) -> Dict[str, Any]:
    """A call's arguments by parameter name."""
    try:
        return inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
    except TypeError:
        return dict(kwargs)


class FeatureCapture:
    """What a capture context recorded during the last forward pass of the model.

    `output`: the hidden states (inside the autograd graph); `grid`: their (h, w) token grid
    when known (None otherwise; the losses then treat a square count as a square grid).
    """

    def __init__(self) -> None:
        self._output: Optional[torch.Tensor] = None
        self._grid: Optional[Grid] = None
        self._img_ids: Optional[torch.Tensor] = None
        # Set by the model's pre-hook: the block records once per model forward, so gradient
        # checkpointing re-running the block during backward does not replace the output.
        self._armed = False
        self._forwards = 0  # model forwards seen inside the `with` block

    @property
    def output(self) -> torch.Tensor:
        if self._output is None:
            raise RuntimeError("nothing was captured: call the model inside the `with` block of the capture")
        return self._output

    @property
    def grid(self) -> Optional[Grid]:
        output = self.output
        if output.dim() == 4:  # a feature map: its own grid
            return tuple(output.shape[2:])
        if self._grid is None and self._img_ids is not None:
            self._grid = _grid_from_ids(self._img_ids)
        if self._grid is not None and self._grid[0] * self._grid[1] == output.shape[1]:
            return self._grid
        return None

    def _on_model_call(self, model: nn.Module, arguments: Dict[str, Any]) -> None:
        """Called with the model's arguments at the start of each forward."""

    def _record(self, tokens: torch.Tensor) -> None:
        self._output = tokens
        self._armed = False


class NoCapture(FeatureCapture):
    """What the capture of a disabled regularizer gives: nothing is hooked or recorded, and
    `output` and `grid` are None (the regularizer then returns `(None, {})`)."""

    @property
    def output(self) -> None:
        return None

    @property
    def grid(self) -> None:
        return None


def _grid_from_ids(img_ids: torch.Tensor) -> Optional[Grid]:
    """Flux-style packed latents carry (., row, col) position ids: the grid when they are a
    row-major h x w raster."""
    ids = img_ids[0] if img_ids.dim() == 3 else img_ids
    if ids.dim() != 2 or ids.shape[1] < 3:
        return None
    rows = torch.unique(ids[:, 1], return_inverse=True)[1]
    cols = torch.unique(ids[:, 2], return_inverse=True)[1]
    h = int(rows.max()) + 1
    w = ids.shape[0] // h
    raster = torch.arange(ids.shape[0], device=ids.device)
    return (h, w) if h * w == ids.shape[0] and torch.equal(rows * w + cols, raster) else None


class CaptureContext:
    """The context manager the capture functions return: `with ... as cap:` installs the hooks
    and gives the FeatureCapture `cap`; leaving the block removes them (the features stay)."""

    def __init__(self, capture: FeatureCapture, model: Optional[nn.Module] = None,
                 block: Optional[nn.Module] = None, block_hook=None):
        self._capture = capture
        self._model, self._block, self._block_hook = model, block, block_hook
        self._handles: list = []

    def __enter__(self) -> FeatureCapture:
        capture = self._capture
        capture._forwards = 0
        if self._model is not None:
            self._handles = [self._model.register_forward_pre_hook(self._arm, with_kwargs=True),
                             self._block.register_forward_hook(self._block_hook, with_kwargs=True)]
        return capture

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _arm(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        capture = self._capture
        capture._forwards += 1
        if capture._forwards > 1:
            raise RuntimeError(
                f"{type(module).__name__} ran a second forward inside one `with ...capture()` block: a "
                f"capture holds the features of one forward, and a second one (e.g. a no-grad pass) would "
                f"silently replace them. Run other forwards outside the `with` block, or open one capture "
                f"per forward.")
        capture._armed = True
        capture._output, capture._grid, capture._img_ids = None, None, None
        capture._on_model_call(module, _bind(module, args, kwargs))

    def _not_entered(self, name: str):
        raise TypeError(f"this is the context manager that capture() returns, which has no .{name}: write "
                        f"`with reg.capture() as cap:` around the model's forward, then use `cap` (or "
                        f"cap.{name})")

    @property
    def output(self):
        self._not_entered("output")

    @property
    def grid(self):
        self._not_entered("grid")


def capture_unet_mid_block(unet: nn.Module) -> CaptureContext:
    """Context manager: records the output of `unet.mid_block` (B, C, H, W) on each forward of
    `unet` (a diffusers UNet2DConditionModel / UNet2DModel, possibly DDP- or compile-wrapped)."""
    model = unwrap_model(unet)
    mid_block = getattr(model, "mid_block", None)
    if not isinstance(mid_block, nn.Module):
        kind = " (it is a DiT: use capture_transformer_block)" if hasattr(model, "transformer_blocks") else ""
        raise TypeError(f"capture_unet_mid_block needs a UNet with a mid_block; {type(model).__name__} has none{kind}")
    capture = FeatureCapture()

    def record(module, args, kwargs, output):
        if not capture._armed:
            return
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            raise TypeError(f"{type(module).__name__} returned {type(output).__name__}, expected a (B, C, H, W) tensor")
        capture._record(output)

    return CaptureContext(capture, model, mid_block, record)


def transformer_blocks(model: nn.Module) -> List[nn.Module]:
    """A DiT's blocks in execution order: `transformer_blocks`, then `single_transformer_blocks`
    when it has them (Flux, Flux.2, Chroma: the global block index runs over both)."""
    model = unwrap_model(model)
    blocks = getattr(model, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        is_unet = isinstance(getattr(model, "mid_block", None), nn.Module)
        kind = " (it is a UNet: use capture_unet_mid_block)" if is_unet else ""
        raise TypeError(f"capture_transformer_block needs a DiT with transformer_blocks; "
                        f"{type(model).__name__} has none{kind}")
    single = getattr(model, "single_transformer_blocks", None)
    return list(blocks) + (list(single) if isinstance(single, nn.ModuleList) else [])


def check_block_index(model: nn.Module, index: int) -> nn.Module:
    """The block `index` selects; ValueError naming the index and the block count otherwise."""
    blocks = transformer_blocks(model)
    if isinstance(index, bool) or not isinstance(index, int):
        raise ValueError(f"block index must be an int, got {index!r}")
    if not 0 <= index < len(blocks):
        raise ValueError(f"block index {index} is out of range: {type(unwrap_model(model)).__name__} has "
                         f"{len(blocks)} transformer blocks (valid indices 0..{len(blocks) - 1})")
    return blocks[index]


class _DiTCapture(FeatureCapture):
    def __init__(self, patch_size: int) -> None:
        super().__init__()
        self._patch_size = patch_size
        self._image_tokens: Optional[int] = None
        self._text_tokens: Optional[int] = None

    def _on_model_call(self, model, arguments) -> None:
        """Note the image-token count (and grid) and the text length from the model's inputs."""
        hidden = arguments.get("hidden_states")
        text = arguments.get("encoder_hidden_states")
        self._image_tokens = self._text_tokens = None
        if isinstance(hidden, torch.Tensor) and hidden.dim() == 4:  # (B, C, H, W) latents, patchified inside
            p = self._patch_size
            self._grid = (hidden.shape[2] // p, hidden.shape[3] // p)
            self._image_tokens = self._grid[0] * self._grid[1]
        elif isinstance(hidden, torch.Tensor) and hidden.dim() == 3:  # packed tokens (Flux)
            self._image_tokens = hidden.shape[1]
            img_ids = arguments.get("img_ids")
            self._img_ids = img_ids if isinstance(img_ids, torch.Tensor) else None
        if isinstance(text, torch.Tensor) and text.dim() == 3:
            self._text_tokens = text.shape[1]

    def image_tokens(self, block: nn.Module, arguments: Dict[str, Any], output) -> torch.Tensor:
        if isinstance(output, (tuple, list)):
            position = _TUPLE_IMAGE_POSITION.get(type(block).__name__)
            if position is None:
                position = self._matching_position(block, arguments, output)
            output = output[position]
        if not isinstance(output, torch.Tensor) or output.dim() != 3:
            raise TypeError(f"{type(block).__name__} output has no (B, S, D) image-token tensor: got "
                            f"{type(output).__name__}{tuple(output.shape) if isinstance(output, torch.Tensor) else ''}")
        if self._image_tokens and self._text_tokens and output.shape[1] == self._text_tokens + self._image_tokens:
            output = output[:, self._text_tokens:]  # one [text; image] sequence
        return output

    @staticmethod
    def _matching_position(block, arguments, output) -> int:
        hidden = arguments.get("hidden_states")
        shape = hidden.shape if isinstance(hidden, torch.Tensor) else None
        matches = [i for i, item in enumerate(output) if isinstance(item, torch.Tensor) and item.shape == shape]
        if len(matches) != 1:
            shapes = [tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__ for item in output]
            raise TypeError(f"cannot tell which element of {type(block).__name__}'s output {shapes} holds the image "
                            f"tokens (block input hidden_states: {tuple(shape) if shape else None})")
        return matches[0]


def capture_transformer_block(model: nn.Module, index: int) -> CaptureContext:
    """Context manager: records the image tokens (B, S, D) that block `index` of a diffusers DiT
    outputs (SD3 / SD3.5, Flux, Flux.2, Chroma, PixArt, Sana, or any model with
    `transformer_blocks`; for Flux, Flux.2 and Chroma the index runs over the double-stream then
    the single-stream blocks) on each forward of
    `model`, with their grid in `.grid`. An index past the last block raises ValueError."""
    block = check_block_index(model, index)
    inner = unwrap_model(model)
    patch_size = getattr(getattr(inner, "config", None), "patch_size", None) or 1
    capture = _DiTCapture(int(patch_size))

    def record(module, args, kwargs, output):
        if capture._armed:
            capture._record(capture.image_tokens(module, _bind(module, args, kwargs), output))

    return CaptureContext(capture, inner, block, record)
