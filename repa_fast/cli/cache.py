"""inspect, verify, prune or fill a teacher-feature cache (repa_fast.FeatureCache)

`repa-fast cache info DIR` prints the entries, their bytes and what produced them; `verify DIR`
checks every entry's checksum (exit code 1 when one is bad); `prune DIR` removes corrupted
entries, temporary files of killed writes and, with `--keep-keys FILE`, the entries of keys not
listed; `fill DIR SOURCE --encoder NAME --vae PATH` encodes a folder of latent files (.safetensors
or .pt, one sample each; the key is the file's path under SOURCE without its suffix) ahead of
training, with a progress bar, skipping what is cached already (an interrupted run resumes).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterator, Tuple

import torch

LATENT_SUFFIXES = (".safetensors", ".pt")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="cache_command", required=True)
    info = sub.add_parser("info", help="entries, bytes and what produced the cache")
    info.add_argument("directory")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    verify = sub.add_parser("verify", help="check every entry's checksum (exit code 1 when one is bad)")
    verify.add_argument("directory")
    prune = sub.add_parser("prune", help="remove corrupted entries, leftover temporary files, unlisted keys")
    prune.add_argument("directory")
    prune.add_argument("--keep-keys", metavar="FILE", default=None,
                       help="a file of the keys to keep, one a line; the entries of other keys are removed")
    prune.add_argument("--temp-age", type=float, default=600.0, metavar="SECONDS",
                       help="remove temporary files untouched this long (default 600: a live writer's are newer)")
    prune.add_argument("--dry-run", action="store_true", help="list what would be removed")
    fill = sub.add_parser("fill", help="encode a folder of latent (or pixel) files into the cache ahead of training")
    fill.add_argument("directory", help="the cache folder")
    fill.add_argument("source", help="folder of .safetensors / .pt files, one sample (C, h, w) each")
    fill.add_argument("--encoder", required=True, help="DINOv2 name (dinov2_vitg14), hub id or local folder")
    fill.add_argument("--image-size", type=int, default=518, help="encoder input size (default 518)")
    fill.add_argument("--keep-aspect", action="store_true", help="the encoder keeps each image's aspect ratio")
    fill.add_argument("--vae", default=None, help="diffusers VAE folder or hub id decoding the latents")
    fill.add_argument("--vae-subfolder", default=None, help="e.g. vae, inside a pipeline's folder")
    fill.add_argument("--tae", action="store_true", help="the VAE is an AutoencoderTiny (urepa_use_tae)")
    fill.add_argument("--pixels", action="store_true", help="the files hold pixels (3, H, W) in [0, 1]: no VAE")
    fill.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                      help="stored dtype (default: the encoder's output dtype)")
    fill.add_argument("--batch-size", type=int, default=16)
    fill.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")


def latent_files(source: Path) -> Iterator[Tuple[str, Path]]:
    """(key, file) of every .safetensors / .pt file under `source`, sorted; key: the relative
    path without its suffix, with '/' separators."""
    for path in sorted(p for p in source.rglob("*") if p.suffix in LATENT_SUFFIXES and p.is_file()):
        yield path.relative_to(source).with_suffix("").as_posix(), path


def load_sample(path: Path) -> torch.Tensor:
    """One sample (C, h, w) from a file holding a tensor, a (1, C, h, w) batch of one, or a dict
    with a "latents" entry or a single tensor (SimpleTuner's .pt latents are either)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        data = load_file(path)
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, dict):
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if "latents" in tensors:
            data = tensors["latents"]
        elif len(tensors) == 1:
            data = next(iter(tensors.values()))
        else:
            raise ValueError(f"{path}: holds tensors {sorted(tensors)}; expected one, or one named 'latents'")
    if not isinstance(data, torch.Tensor) or not data.is_floating_point():
        raise ValueError(f"{path}: expected a floating tensor, got {type(data).__name__}")
    if data.dim() == 4 and data.shape[0] == 1:
        data = data[0]
    if data.dim() != 3:
        raise ValueError(f"{path}: expected one sample (C, h, w), got shape {tuple(data.shape)}")
    return data


def _load_vae(args: argparse.Namespace, device: torch.device):
    from diffusers import AutoencoderKL, AutoencoderTiny
    cls = AutoencoderTiny if args.tae else AutoencoderKL
    kwargs = {"subfolder": args.vae_subfolder} if args.vae_subfolder else {}
    return cls.from_pretrained(args.vae, **kwargs).to(device).eval()


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError


def run(args: argparse.Namespace) -> int:
    from ..integrations.feature_cache import FeatureCache, fill_feature_cache, prune

    try:
        cache = FeatureCache(args.directory)
        if args.cache_command != "fill" and not Path(args.directory).is_dir():
            raise ValueError(f"{args.directory} is not a folder")
    except ValueError as err:
        print(f"repa-fast cache: {err}", file=sys.stderr)
        return 2
    if args.cache_command == "info":
        summary = cache.summary()
        if args.json:
            print(json.dumps(summary, indent=1))
            return 0
        print(f"{summary['directory']}: {summary['entries']} entries, {_size(summary['bytes'])}"
              + (f", {summary['temp_files']} temporary files" if summary["temp_files"] else ""))
        manifest = summary["manifest"]
        if manifest is None:
            print("no manifest: nothing was stored yet")
        else:
            print(f"created {manifest.get('created')} by repa-fast {manifest.get('repa_fast')}; produced by:")
            print(json.dumps(manifest["producer"], indent=1))
        return 0
    if args.cache_command == "verify":
        bad = 0
        count = 0
        for path in cache.entry_files():
            count += 1
            entry, why = cache.check_file(path)
            if entry is None:
                bad += 1
                print(f"BAD {path}: {why}")
        print(f"{count} entries checked, {bad} bad" + ("" if cache.manifest else "; no manifest"))
        return 1 if bad or (count and cache.manifest is None) else 0
    if args.cache_command == "prune":
        keep = None
        if args.keep_keys:
            keep = Path(args.keep_keys).read_text(encoding="utf-8").splitlines()
        removed = prune(cache, keep_keys=keep, temp_older_than_s=args.temp_age, dry_run=args.dry_run)
        verb = "would remove" if args.dry_run else "removed"
        for reason, paths in removed.items():
            for path in paths:
                print(f"{verb} ({reason}) {path}")
        print(f"{verb} {sum(map(len, removed.values()))} files: "
              + ", ".join(f"{len(paths)} {reason}" for reason, paths in removed.items()))
        return 0
    return _fill(args, cache, fill_feature_cache)


def _fill(args: argparse.Namespace, cache, fill_feature_cache) -> int:
    from ..integrations.encoders import VisionEncoder

    source = Path(args.source)
    if not source.is_dir():
        print(f"repa-fast cache fill: {source} is not a folder", file=sys.stderr)
        return 2
    if args.pixels == (args.vae is not None):
        print("repa-fast cache fill: give --vae PATH for latent files, or --pixels for pixel files", file=sys.stderr)
        return 2
    files = list(latent_files(source))
    if not files:
        print(f"repa-fast cache fill: no .safetensors or .pt files under {source}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder = VisionEncoder.from_pretrained(args.encoder, args.image_size, keep_aspect=args.keep_aspect,
                                            device=device)
    vae = None if args.pixels else _load_vae(args, device)
    if args.dtype:
        cache.dtype = DTYPES[args.dtype]
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(files), desc="encoding", unit="sample")
    except ImportError:
        bar = None
    done = [0]

    def progress(count: int) -> None:
        done[0] += count
        if bar is not None:
            bar.update(count)
        elif done[0] == len(files) or done[0] % max(1, len(files) // 20) < count:
            print(f"  {done[0]}/{len(files)}", flush=True)

    items = ((key, load_sample(path)) for key, path in files)
    try:
        counts = fill_feature_cache(cache, items, encoder=encoder, vae=vae, batch_size=args.batch_size,
                                    progress=progress)
    except ValueError as err:
        print(f"repa-fast cache fill: {err}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    print(f"{counts['computed']} encoded, {counts['skipped']} already cached, "
          f"{counts['failed_writes']} not written")
    return 1 if counts["failed_writes"] else 0
