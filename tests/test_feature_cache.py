"""The teacher-feature cache: exact targets (a hit is bitwise what the miss stored and trained
on), crash safety (killed writes, truncated files, flipped bytes), two processes filling one
cache, a mismatched encoder, an unwritable folder, keys that are no file names."""
import errno
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import repa_fast as rf  # noqa: E402
from repa_fast.integrations import feature_cache as fc  # noqa: E402
from test_capture import tiny_pixart, tiny_unet2d_condition  # noqa: E402
from test_encoders import tiny_autoencoder_kl, tiny_dinov2  # noqa: E402

TESTS = Path(__file__).resolve().parent
ODD_KEYS = ["a/b/../c", "..", ".", "", "é☃ 日本", "x" * 5000, "CON", "nul\0byte", "back\\slash", "A", "a"]


def encoder(image_size=56, dtype=None):
    return rf.VisionEncoder(tiny_dinov2(image_size=image_size), image_size=image_size, dtype=dtype)


class Counter:
    """Counts the encoder's forwards and the VAE's decodes, and the samples they saw."""

    def __init__(self, enc, vae=None):
        self.encoded = self.decoded = 0
        enc.model.register_forward_pre_hook(lambda module, args, kwargs: self._seen("encoded", kwargs),
                                            with_kwargs=True)
        if vae is not None:
            decode = vae.decode

            def counting_decode(z, *args, **kwargs):
                self.decoded += len(z)
                return decode(z, *args, **kwargs)
            vae.decode = counting_decode

    def _seen(self, name, kwargs):
        setattr(self, name, getattr(self, name) + len(kwargs["pixel_values"]))


def urepa(tmp_path, enc=None, vae=None, unet_inputs=None, **kwargs):
    unet, inputs = unet_inputs or tiny_unet2d_condition()
    vae = tiny_autoencoder_kl(scaling_factor=0.5) if vae is None else vae
    reg = rf.URepaRegularizer.from_config({"urepa_enabled": True}, unet, encoder=enc or encoder(), vae=vae,
                                          feature_cache=tmp_path / "cache" if tmp_path else None, **kwargs)
    return reg, unet, inputs


def step(reg, unet, inputs, **data):
    """The loss and the gradient of every projector parameter, fresh."""
    reg.zero_grad(set_to_none=True)
    with reg.capture() as cap:
        unet(**inputs)
    loss, _ = reg(cap, **data)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in reg.parameters()]


def assert_bitwise(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_cached_equals_uncached_and_hits_skip_decode_and_encoder(tmp_path):
    reg, unet, inputs = urepa(tmp_path)
    plain = rf.URepaRegularizer.from_config({"urepa_enabled": True}, unet, encoder=reg.encoder, vae=reg.vae)
    plain.load_state_dict(reg.state_dict())
    latents, keys = torch.randn(2, 4, 8, 8), ["s0", "s1"]
    counter = Counter(reg.encoder, reg.vae)
    reference = step(plain, unet, inputs, latents=latents)
    assert (counter.encoded, counter.decoded) == (2, 2)
    miss = step(reg, unet, inputs, latents=latents, keys=keys)
    assert (counter.encoded, counter.decoded) == (4, 4)
    for epoch in range(2):
        hit = step(reg, unet, inputs, latents=latents, keys=keys)
        for a, b, c in zip([reference[0], *reference[1]], [miss[0], *miss[1]], [hit[0], *hit[1]]):
            assert_bitwise(a, b)  # float32 storage: the miss's targets are the encoder's own
            assert_bitwise(b, c)
    assert (counter.encoded, counter.decoded) == (4, 4)
    assert reg.feature_cache.stats["hits"] == 4 and reg.feature_cache.stats["misses"] == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_store_serves_the_bits_the_miss_trained_on(tmp_path, dtype):
    cache = rf.FeatureCache(tmp_path / "cache", dtype=dtype)
    reg, unet, inputs = urepa(None)
    reg.use_feature_cache(cache)
    latents, keys = torch.randn(2, 4, 8, 8), ["k/0", "k/1"]
    tokens, grid = reg.encode(latents=latents, keys=keys)
    assert tokens.dtype == dtype and grid == (4, 4)
    exact, _ = reg._compute_targets(latents, reg.vae, None)
    assert torch.equal(tokens, exact.to(dtype))  # the stored cast, not the float32 tokens
    again, _ = reg.encode(latents=latents, keys=keys)
    assert_bitwise(tokens, again)
    miss = step(reg, unet, inputs, latents=torch.randn(2, 4, 8, 8), keys=["new0", "new1"])
    hit = step(reg, unet, inputs, latents=torch.randn(2, 4, 8, 8), keys=["new0", "new1"])  # latents ignored on hits
    for a, b in zip([miss[0], *miss[1]], [hit[0], *hit[1]]):
        assert_bitwise(a, b)
    # A trainer reads an entry with safetensors alone.
    stored = safetensors_torch.load_file(cache.entry_path("k/1"))["tokens"]
    assert_bitwise(stored, tokens[1])


def test_partial_hits_compute_only_the_misses(tmp_path):
    reg, unet, inputs = urepa(tmp_path)
    latents = torch.randn(4, 4, 8, 8)
    whole, _ = reg._compute_targets(latents, reg.vae, None)
    counter = Counter(reg.encoder, reg.vae)
    first, _ = reg.encode(latents=latents[:2], keys=["a", "b"])
    both, grid = reg.encode(latents=latents, keys=["a", "b", "c", "d"])
    assert (counter.encoded, counter.decoded) == (4, 4)
    torch.testing.assert_close(both, whole, rtol=1e-5, atol=1e-6)  # batch composition: not bitwise
    assert torch.equal(both[:2], first)
    # Another input shape for a key (a new resolution): recomputed and overwritten.
    reg.encode(latents=torch.randn(1, 4, 16, 8), keys=["a"])
    assert counter.encoded == 5 and reg.feature_cache.get("a").input_shape == (4, 16, 8)


@pytest.mark.parametrize("damage", ["truncate", "truncate_header", "flip_data", "flip_header", "empty", "other_key"])
def test_corrupted_entry_is_reported_once_and_recomputed(tmp_path, damage):
    reg, unet, inputs = urepa(tmp_path)
    latents, keys = torch.randn(2, 4, 8, 8), ["one", "two"]
    good, _ = reg.encode(latents=latents, keys=keys)
    cache = reg.feature_cache
    originals = {key: cache.entry_path(key).read_bytes() for key in keys}
    for key in keys:
        path = cache.entry_path(key)
        raw = bytearray(originals[key])
        header = 8 + int.from_bytes(raw[:8], "little")
        if damage == "truncate":
            raw = raw[:-5]
        elif damage == "truncate_header":
            raw = raw[:header - 3]
        elif damage == "flip_data":
            raw[header + 17] ^= 0x01
        elif damage == "flip_header":
            at = raw.index(b'"grid":"') + 8
            raw[at] ^= 0x01  # '4' -> '5': a wrong grid the checksum catches
        elif damage == "empty":
            raw = b""
        else:
            raw = originals[keys[1 - keys.index(key)]]
        path.write_bytes(bytes(raw))
    counter = Counter(reg.encoder, reg.vae)
    with pytest.warns(rf.FeatureCacheWarning, match="corrupted entry for key 'one'") as caught:
        tokens, _ = reg.encode(latents=latents, keys=keys)
    assert len([w for w in caught if issubclass(w.category, rf.FeatureCacheWarning)]) == 1
    assert counter.encoded == 2 and cache.stats["corrupted"] == 2
    assert torch.equal(tokens, good)
    for key in keys:  # rewritten whole
        assert cache.check_file(cache.entry_path(key))[1] == ""


KILLED_WRITE = textwrap.dedent("""
    import os, signal, sys, torch
    from repa_fast.integrations import feature_cache as fc
    cache = fc.FeatureCache(sys.argv[1])
    real_write = fc.os.fdopen

    class HalfWriter:  # writes half of the entry, then the process is killed
        def __init__(self, handle):
            self.handle = handle
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return False
        def write(self, data):
            self.handle.write(data[:len(data) // 2])
            self.handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    fc.os.fdopen = lambda fd, mode: HalfWriter(real_write(fd, mode))
    cache.put("key", torch.full((4, 3), 2.0), (2, 2), (3, 8, 8))
""")


def test_write_killed_midway_leaves_the_old_entry_or_none(tmp_path):
    cache = rf.FeatureCache(tmp_path)
    for existing in (False, True):
        if existing:
            assert cache.put("key", torch.ones(4, 3), (2, 2), (3, 8, 8))
        run = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(tmp_path)], capture_output=True, text=True)
        assert run.returncode == -9, run.stderr
        assert len(cache.temp_files()) == 1  # the killed writer's, never read
        entry = cache.get("key")
        assert (entry is None) if not existing else torch.equal(entry.tokens, torch.ones(4, 3))
        removed = fc.prune(cache, temp_older_than_s=0)
        assert len(removed["temporary"]) == 1 and not cache.temp_files()


FILLER = textwrap.dedent("""
    import os, sys, time, torch
    import repa_fast as rf
    sys.path.insert(0, sys.argv[2])
    from test_encoders import tiny_dinov2
    torch.manual_seed(0)
    encoder = rf.VisionEncoder(tiny_dinov2(), image_size=56)
    open(f"{sys.argv[1]}-ready-{sys.argv[3]}", "w").close()  # start filling together
    while not all(os.path.exists(f"{sys.argv[1]}-ready-{side}") for side in ("up", "down")):
        time.sleep(0.01)
    order = range(16) if sys.argv[3] == "up" else reversed(range(16))
    def items():
        for i in order:
            yield f"img/{i}", torch.rand(3, 20, 20, generator=torch.Generator().manual_seed(i))
    print(rf.fill_feature_cache(sys.argv[1], items(), encoder=encoder, batch_size=2))
""")


def test_two_processes_fill_one_cache(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on a small machine
    runs = [subprocess.Popen([sys.executable, "-c", FILLER, str(tmp_path), str(TESTS), order], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for order in ("up", "down")]
    for proc in runs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    torch.manual_seed(0)
    enc = rf.VisionEncoder(tiny_dinov2(), image_size=56)
    cache = rf.FeatureCache(tmp_path)
    cache.bind(fc.producer_of(enc, None, torch.float32))  # the manifest the first process wrote
    files = list(cache.entry_files())
    assert len(files) == 16 and not cache.temp_files()
    for i in range(16):
        entry = cache.get(f"img/{i}")
        expected, _ = enc(torch.rand(1, 3, 20, 20, generator=torch.Generator().manual_seed(i)))
        torch.testing.assert_close(entry.tokens, expected[0], rtol=1e-5, atol=1e-6)


def test_mismatched_encoder_vae_or_settings_are_refused(tmp_path):
    torch.manual_seed(1)
    enc = encoder()
    reg, unet, inputs = urepa(tmp_path, enc=enc)
    reg.encode(latents=torch.randn(1, 4, 8, 8), keys=["k"])
    cases = {
        "encoder.weights_sha256": dict(enc=encoder()),                                 # other weights
        "image_size": dict(enc=rf.VisionEncoder(enc.model, image_size=28)),
        "keep_aspect": dict(enc=rf.VisionEncoder(enc.model, image_size=56, keep_aspect=True)),
        "vae.scaling_factor": dict(enc=enc, vae=tiny_autoencoder_kl(scaling_factor=0.7)),
    }
    for field, parts in cases.items():
        other, _, _ = urepa(tmp_path, **parts)
        with pytest.raises(rf.FeatureCacheMismatchError, match=field.replace(".", r"\.")):
            other.encode(latents=torch.randn(1, 4, 8, 8), keys=["k"])
    with pytest.raises(rf.FeatureCacheMismatchError, match="input: cache has 'latents', this run 'pixels'"):
        reg.encode(pixels=torch.rand(1, 3, 16, 16), keys=["p"])
    half = urepa(None, enc=enc, vae=reg.vae)[0].use_feature_cache(rf.FeatureCache(tmp_path / "cache",
                                                                                    dtype=torch.float16))
    with pytest.raises(rf.FeatureCacheMismatchError, match="dtype: cache has 'float32', this run 'float16'"):
        half.encode(latents=torch.randn(1, 4, 8, 8), keys=["k"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a repa-fast feature cache manifest"):
        rf.FeatureCache(tmp_path / "bad")


@pytest.mark.parametrize("failure", [errno.EROFS, errno.ENOSPC])
def test_unwritable_cache_warns_once_and_training_goes_on(tmp_path, monkeypatch, failure):
    reg, unet, inputs = urepa(tmp_path)
    reg.encode(latents=torch.randn(1, 4, 8, 8), keys=["stored"])  # the manifest and one entry exist
    real_mkstemp = tempfile.mkstemp

    def failing_mkstemp(*args, **kwargs):
        if failure == errno.EROFS:
            raise OSError(failure, os.strerror(failure))
        fd, path = real_mkstemp(*args, **kwargs)
        os.close(fd)
        os.unlink(path)
        raise OSError(failure, os.strerror(failure), path)  # a full disk, mid-write

    monkeypatch.setattr(tempfile, "mkstemp", failing_mkstemp)
    fresh, _, _ = urepa(tmp_path, enc=reg.encoder, vae=reg.vae, unet_inputs=(unet, inputs))
    plain = rf.URepaRegularizer.from_config({"urepa_enabled": True}, unet, encoder=reg.encoder, vae=reg.vae)
    plain.load_state_dict(fresh.state_dict())
    why = "read-only" if failure == errno.EROFS else "full"
    latents = torch.randn(2, 4, 8, 8)
    with pytest.warns(rf.FeatureCacheWarning, match=f"cannot write to feature cache .*{why}.*Training goes on"):
        cached = step(fresh, unet, inputs, latents=latents, keys=["x", "y"])
    uncached = step(plain, unet, inputs, latents=latents)
    for a, b in zip([cached[0], *cached[1]], [uncached[0], *uncached[1]]):
        assert torch.equal(a, b)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once
        step(fresh, unet, inputs, latents=latents, keys=["x", "y"])
        assert fresh.encode(latents=latents[:1], keys=["stored"])[0].shape == (1, 16, 32)
    assert fresh.feature_cache.stats["hits"] == 1 and fresh.feature_cache.stats["writes"] == 0
    assert not list(Path(tmp_path).rglob(".tmp-*"))


def test_keys_that_are_not_file_names(tmp_path):
    cache = rf.FeatureCache(tmp_path / "c")
    for i, key in enumerate(ODD_KEYS):
        assert cache.put(key, torch.full((4, 2), float(i)), (2, 2), (3, 4, 4))
    paths = {cache.entry_path(key) for key in ODD_KEYS}
    assert len(paths) == len(ODD_KEYS) and all(p.parent.parent == tmp_path / "c" / "entries" for p in paths)
    for i, key in enumerate(ODD_KEYS):
        assert cache.get(key).key == key and torch.equal(cache.get(key).tokens, torch.full((4, 2), float(i)))
    assert cache.summary()["entries"] == len(ODD_KEYS)
    with pytest.raises(TypeError, match="cache keys must be strings"):
        cache.entry_path(3)


def test_bad_calls(tmp_path):
    reg, unet, inputs = urepa(tmp_path)
    latents = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="pass keys="):
        reg.encode(latents=latents)
    with pytest.raises(ValueError, match="keys has 1 entries for a batch of 2"):
        reg.encode(latents=latents, keys=["a"])
    with pytest.raises(ValueError, match="keys repeat"):
        reg.encode(latents=latents, keys=["a", "a"])
    with pytest.raises(TypeError, match="keys must be a sequence of strings"):
        reg.encode(latents=latents, keys="ab")
    plain, _, _ = urepa(None)
    with pytest.raises(ValueError, match="keys= goes with a feature cache"):
        plain.encode(latents=latents, keys=["a", "b"])
    with pytest.raises(TypeError, match="feature_cache must be a folder path"):
        plain.use_feature_cache(3)
    with pytest.raises(ValueError, match="dtype must be one of"):
        rf.FeatureCache(tmp_path, dtype=torch.int8)


def test_repa_regularizer_with_pixels_and_fill_ahead(tmp_path):
    model, inputs, grid = tiny_pixart()
    enc = encoder()
    pixels = torch.rand(5, 3, 30, 30)
    items = [(f"p{i}", pixels[i]) for i in range(5)]
    seen = []
    counts = rf.fill_feature_cache(tmp_path, items[:3], encoder=enc, batch_size=2, progress=seen.append)
    assert counts == {"computed": 3, "skipped": 0, "failed_writes": 0} and seen == [2, 1]
    counts = rf.fill_feature_cache(tmp_path, items, encoder=enc, batch_size=2)  # resumed
    assert counts == {"computed": 2, "skipped": 3, "failed_writes": 0}
    reg = rf.RepaRegularizer.from_config({"crepa_enabled": True, "crepa_block_index": 1}, model, encoder=enc,
                                         feature_cache=rf.FeatureCache(tmp_path))
    counter = Counter(enc)
    with reg.capture() as cap:
        model(**inputs)
    loss, logs = reg(cap, pixels=pixels[:2], keys=["p0", "p1"])
    assert counter.encoded == 0 and torch.isfinite(loss)
    tokens, target_grid = enc(pixels[:2])
    expected = rf.repa_loss(cap.output, tokens, *reg.projector.loss_args(), hidden_grid=cap.grid,
                            target_grid=target_grid)
    torch.testing.assert_close(logs["alignment"], expected.item(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"items must be \(key, tensor \(C, H, W\)\) pairs"):
        rf.fill_feature_cache(tmp_path, [("k", pixels)], encoder=enc)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["producer"]["input"] == "pixels" and manifest["producer"]["vae"] is None


def test_cli_fill_info_verify_prune(tmp_path, capsys):
    from repa_fast import cli
    from safetensors.torch import save_file

    tiny_dinov2().save_pretrained(tmp_path / "encoder")  # stands in for real weights on disk
    tiny_autoencoder_kl(scaling_factor=0.5).save_pretrained(tmp_path / "vae")
    source = tmp_path / "latents"
    (source / "sub dir").mkdir(parents=True)
    for i in range(3):
        save_file({"latents": torch.randn(4, 8, 8)}, source / f"a{i}.safetensors")
    torch.save(torch.randn(1, 4, 8, 8), source / "sub dir" / "b.pt")
    cache_dir = tmp_path / "cache"
    fill = ["cache", "fill", str(cache_dir), str(source), "--encoder", str(tmp_path / "encoder"),
            "--image-size", "56", "--vae", str(tmp_path / "vae"), "--device", "cpu", "--batch-size", "2"]
    assert cli.main(fill) == 0
    assert "4 encoded, 0 already cached, 0 not written" in capsys.readouterr().out
    cache = rf.FeatureCache(cache_dir)
    assert cache.get("sub dir/b").input_shape == (4, 8, 8)
    assert cli.main(fill) == 0  # resumed: nothing left to do
    assert "0 encoded, 4 already cached" in capsys.readouterr().out

    assert cli.main(["cache", "info", str(cache_dir)]) == 0
    out = capsys.readouterr().out
    assert f"{cache_dir}: 4 entries" in out and '"input": "latents"' in out and '"image_size": 56' in out
    assert cli.main(["cache", "verify", str(cache_dir)]) == 0
    assert "4 entries checked, 0 bad" in capsys.readouterr().out

    path = cache.entry_path("a1")
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40
    path.write_bytes(bytes(raw))
    assert cli.main(["cache", "verify", str(cache_dir)]) == 1
    assert f"BAD {path}: checksum mismatch" in capsys.readouterr().out
    (tmp_path / "keep.txt").write_text("a0\nsub dir/b\n")
    assert cli.main(["cache", "prune", str(cache_dir), "--keep-keys", str(tmp_path / "keep.txt")]) == 0
    assert "removed 2 files: 1 corrupted, 1 not kept, 0 temporary" in capsys.readouterr().out
    assert sorted(cache.check_file(p)[0].key for p in cache.entry_files()) == ["a0", "sub dir/b"]

    other = tmp_path / "other"
    tiny_dinov2().save_pretrained(other)  # other random weights
    assert cli.main([*fill[:5], str(other), *fill[6:]]) == 2
    assert "encoder.weights_sha256" in capsys.readouterr().err


def test_demo_second_epoch_reads_the_cache_without_decoder_or_encoder(tmp_path, monkeypatch, capsys):
    from repa_fast import cli
    from repa_fast.cli import demo

    seen = {"decoded": 0, "encoded": 0}
    make_vae, make_encoder = demo.tiny_vae, demo.tiny_dinov2

    def counting_vae():
        vae = make_vae()
        decode = vae.decode

        def counting_decode(z, *args, **kwargs):
            seen["decoded"] += len(z)
            return decode(z, *args, **kwargs)
        vae.decode = counting_decode
        return vae

    def counting_encoder(image_size):
        model = make_encoder(image_size)
        model.register_forward_pre_hook(
            lambda module, args, kwargs: seen.__setitem__("encoded", seen["encoded"] + len(kwargs["pixel_values"])),
            with_kwargs=True)
        return model

    monkeypatch.setattr(demo, "tiny_vae", counting_vae)
    monkeypatch.setattr(demo, "tiny_dinov2", counting_encoder)
    # 2 epochs of 2 steps for each model; both read one cache (same encoder, same VAE).
    assert cli.main(["demo", "--steps", "4", "--batch-size", "1", "--dataset-size", "2",
                     "--feature-cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert seen == {"decoded": 2, "encoded": 2}  # the UNet's first epoch only
    assert f"feature cache {tmp_path} (U-REPA): 2 hits, 2 misses (encoded), 2 written" in out
    assert f"feature cache {tmp_path} (REPA): 4 hits, 0 misses (encoded), 0 written" in out
    assert len(list(rf.FeatureCache(tmp_path).entry_files())) == 2
