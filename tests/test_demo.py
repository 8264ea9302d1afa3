"""`repa-fast demo` end to end with a few steps: both models train, the summary is printed."""
import re
import sys

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from repa_fast import cli
from repa_fast.cli import demo  # noqa: E402


def test_demo_command_runs_and_summarizes(capsys):
    assert cli.main(["demo", "--steps", "4", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "backend torch on cpu" in out
    for title in ("UNet2DModel + U-REPA", "PixArt DiT + REPA"):
        line = next(line for line in out.splitlines() if line.strip().startswith(title))
        assert re.search(r"diffusion [+-]\d\.\d{3} -> [+-]\d\.\d{3}, alignment [+-]\d\.\d{3} -> [+-]\d\.\d{3}", line)
        assert ("manifold" in line) == ("U-REPA" in title)


def test_demo_with_encoder_path_and_without_tqdm(capsys, monkeypatch, tmp_path):
    demo.tiny_dinov2(56).save_pretrained(tmp_path)  # stands in for real weights on disk
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # `from tqdm.auto import tqdm` fails
    assert cli.main(["demo", "--steps", "2", "--batch-size", "2", "--encoder", str(tmp_path),
                     "--encoder-image-size", "56"]) == 0
    out = capsys.readouterr().out
    assert f"DINOv2 {tmp_path} (4x4 tokens of width 64)" in out
    steps = [line for line in out.splitlines() if line.strip().startswith("step")]
    assert len(steps) == 4 and all(" align " in line and " w " in line for line in steps)
    assert sum(" manifold " in line for line in steps) == 2


def test_shape_images():
    images = demo.shape_images(16, generator=torch.Generator().manual_seed(0))
    assert images.shape == (16, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    # Each image is a background plus one shape: two colours, the shape covering 4% to 30%.
    for image in images:
        colours, counts = image.flatten(1).T.unique(dim=0, return_counts=True)
        assert len(colours) == 2 and 0.04 <= counts.min().item() / 1024 <= 0.3
