"""`repa-fast bench --cases e2e-*`: the whole regularizer step per part, and the flop counts
BENCHMARKS.md quotes (meta tensors, nothing runs)."""
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from repa_fast import cli  # noqa: E402
from repa_fast.cli import bench_e2e  # noqa: E402


@pytest.fixture
def one_thread():
    """Small models on a shared 2-core machine: one thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_e2e_preset_times_every_part(monkeypatch, capsys, one_thread):
    # The real taesdxl and DINOv2-B architectures on a 16px image: every part, fast.
    tiny = bench_e2e.E2ECase("e2e.tiny", "urepa", 1, "taesdxl", 2, "dinov2-b", 28, 1, 1280)
    monkeypatch.setitem(bench_e2e.E2E_PRESETS, "e2e-cpu", [tiny])
    assert cli.main(["bench", "--cases", "e2e-cpu", "--device", "cpu", "--quick"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| e2e.tiny")]
    assert [row[2].strip() for row in rows] == list(bench_e2e.PARTS)
    for row in rows:
        assert float(row[3]) > 0 and float(row[5]) >= 0  # median ms, peak MiB: measured, no error text
    gflop = {row[2].strip(): row[6].strip() for row in rows}
    assert float(gflop["decode"]) > 0 and gflop["cache read"] == ""
    assert float(gflop["cached step"]) == float(gflop["loss fwd+bwd"])


def test_gpu_sizes_flop_counts():
    sdxl = next(c for c in bench_e2e.E2E_PRESETS["e2e-gpu"] if c.name == "e2e.sdxl-1024.dinov2-g-518.b8")
    counts = bench_e2e.count_flops(sdxl, torch.bfloat16)
    # The arithmetic: about 84 TFLOP of decode and 29 of DINOv2-g a step, the loss ~0.17.
    assert counts["decode"] / 1e12 == pytest.approx(83.76, rel=1e-3)
    assert counts["encode"] / 1e12 == pytest.approx(28.53, rel=1e-3)
    assert 0.1 < counts["loss fwd+bwd"] / 1e12 < 0.3


def test_e2e_presets_do_not_mix_with_loss_cases(capsys):
    assert cli.main(["bench", "--cases", "e2e-cpu,quick"]) == 2
    assert "e2e presets are e2e-gpu, e2e-cpu" in capsys.readouterr().err
