"""A read-through cache of the frozen encoder's tokens on disk, keyed by the trainer's sample keys.

The encoder's tokens of a sample never change while its latents (or pixels) do not, and a trainer
that caches latents feeds the same ones every epoch: decoding them with the VAE and running
DINOv2 again is most of what REPA costs. `FeatureCache` keeps each sample's tokens in one
safetensors file, readable without repa-fast:

    DIR/manifest.json                       what produced the cache (checked on every open)
    DIR/entries/ab/<sha256(key)>.safetensors   tensor "tokens" (N, E); metadata: key, grid (h,w),
                                            input_shape of the latents / pixels, sha256

Every key is hashed into its file name (any string is a key: slashes, '..', unicode, any
length); the key itself is kept in the metadata and checked on read. `sha256` covers the key,
grid, input shape, dtype, shape and the tensor bytes. Writes go to a temporary file in the same
folder, fsync'ed, then `os.replace`d: a reader sees a whole entry or none, and several processes
(DDP ranks) may fill one cache at once. A corrupted or truncated entry is reported once (a
`FeatureCacheWarning`), recomputed and rewritten; a folder that cannot be written (read-only,
full) is reported once and the run goes on, serving what is there and computing the rest.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import os
import struct
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..alignment import Grid

FORMAT = "repa-fast-feature-cache"
VERSION = 1
MANIFEST = "manifest.json"
ENTRIES = "entries"
TEMP_PREFIX = ".tmp-"
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# safetensors' dtype names, for the checksum (the header spells them so).
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


class FeatureCacheWarning(UserWarning):
    """A cache problem the run survives: an unwritable folder, a corrupted entry."""


class FeatureCacheMismatchError(ValueError):
    """The cache was filled by another encoder, VAE, image size, aspect option or dtype."""


@dataclass(frozen=True)
class Entry:
    key: str
    tokens: torch.Tensor  # (N, E), on the CPU, in the cache's dtype
    grid: Grid
    input_shape: Tuple[int, ...]  # (C, H, W) of the latents or pixels it was computed from


# ---------------------------------------------------------------------------- producer identity

def _weights_sha256(module: nn.Module) -> str:
    """A fingerprint of a module's weights: its first and last parameters (two random inits of
    one configuration differ in both; hashing all of DINOv2-g would cost seconds)."""
    params = list(module.parameters())
    digest = hashlib.sha256()
    for param in (params[0], params[-1]) if params else ():
        digest.update(_tensor_bytes(param.detach().float().cpu()))
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """A JSON value (config entries may be tuples or tensors)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def producer_of(encoder, vae: Optional[nn.Module], dtype: torch.dtype) -> Dict[str, Any]:
    """What makes the cached tokens what they are: the encoder (name or path, architecture,
    weights), its image size and aspect option, the stored dtype, the token grid and, for tokens
    of decoded latents, the VAE (class, name or path, latent scaling, weights); `vae=None`
    means the tokens are of pixels."""
    config = encoder.model.config
    encoder_id = {"name_or_path": getattr(config, "_name_or_path", "") or "", "class": type(encoder.model).__name__,
                  "hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
                  "patch_size": config.patch_size, "num_register_tokens": encoder.num_register_tokens,
                  "weights_sha256": _weights_sha256(encoder.model)}
    vae_id = None
    if vae is not None:
        vae_config = vae.config
        vae_id = {"class": type(vae).__name__, "name_or_path": getattr(vae_config, "_name_or_path", "") or "",
                  **{name: _plain(getattr(vae_config, name, None))
                     for name in ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "latent_channels")},
                  "weights_sha256": _weights_sha256(vae)}
    size = encoder.image_size
    grid = "by aspect" if encoder.keep_aspect else list(encoder.grid(size, size))
    return {"encoder": encoder_id, "image_size": size, "keep_aspect": encoder.keep_aspect,
            "dtype": _dtype_name(dtype), "token_grid": grid, "input": "latents" if vae is not None else "pixels",
            "vae": vae_id}


def _dtype_name(dtype: torch.dtype) -> str:
    for name, known in STORE_DTYPES.items():
        if known == dtype:
            return name
    raise ValueError(f"dtype must be one of torch.float32, torch.float16, torch.bfloat16, got {dtype!r}")


def _differences(stored: Any, wanted: Any, path: str = "") -> List[str]:
    if isinstance(stored, dict) and isinstance(wanted, dict):
        return [d for name in sorted(set(stored) | set(wanted))
                for d in _differences(stored.get(name), wanted.get(name), f"{path}.{name}" if path else name)]
    return [] if stored == wanted else [f"{path}: cache has {stored!r}, this run {wanted!r}"]


# ---------------------------------------------------------------------------- entry files

def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The bytes safetensors writes for `tensor` (little-endian, row-major)."""
    return tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _entry_checksum(key: str, grid: Grid, input_shape: Sequence[int], dtype: str, shape: Sequence[int],
                    data: bytes) -> str:
    head = json.dumps([key, list(grid), list(input_shape), dtype, list(shape)], ensure_ascii=True)
    return hashlib.sha256(head.encode() + b"\0" + data).hexdigest()


def _parse_entry(raw: bytes, key: str) -> Entry:
    """An entry from a file's bytes, every field checked; ValueError saying what is wrong."""
    from safetensors.torch import load

    if len(raw) < 8:
        raise ValueError(f"truncated: {len(raw)} bytes")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > len(raw) - 8:
        raise ValueError(f"truncated: header of {header_len} bytes in a file of {len(raw)}")
    try:
        header = json.loads(raw[8:8 + header_len])
        meta, info = header["__metadata__"], header["tokens"]
        stored_key = meta["key"]
        grid = tuple(int(v) for v in meta["grid"].split(","))
        input_shape = tuple(int(v) for v in meta["input_shape"].split(","))
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        checksum = meta["sha256"]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"unreadable header ({type(err).__name__}: {err})") from None
    if stored_key != key:
        raise ValueError(f"holds key {stored_key!r}")
    data = raw[8 + header_len:]
    if end != len(data) or begin != 0:
        raise ValueError(f"truncated: {len(data)} data bytes, the header says {end}")
    if _entry_checksum(key, grid, input_shape, dtype, shape, data) != checksum:
        raise ValueError("checksum mismatch")
    if len(grid) != 2 or len(shape) != 2 or grid[0] * grid[1] != shape[0]:
        raise ValueError(f"grid {grid} does not fit tokens of shape {shape}")
    try:
        tokens = load(raw)["tokens"]
    except Exception as err:  # noqa: BLE001 - safetensors' own error types vary across versions
        raise ValueError(f"safetensors cannot read it ({type(err).__name__}: {err})") from None
    return Entry(key, tokens, grid, input_shape)


def _entry_bytes(key: str, tokens: torch.Tensor, grid: Grid, input_shape: Sequence[int]) -> bytes:
    from safetensors.torch import save

    tokens = tokens.detach().cpu().contiguous()
    checksum = _entry_checksum(key, grid, input_shape, _SAFETENSORS_DTYPES[tokens.dtype], tokens.shape,
                               _tensor_bytes(tokens))
    meta = {"key": key, "grid": ",".join(map(str, grid)), "input_shape": ",".join(map(str, input_shape)),
            "sha256": checksum, "format": f"{FORMAT}/{VERSION}"}
    return save({"tokens": tokens}, metadata=meta)


def write_atomic(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """`path` holds `data` whole or is untouched: a temporary file in the same folder, fsync'ed,
    then renamed over it (atomic on POSIX and on Windows' NTFS). `exclusive`: linked instead,
    FileExistsError when `path` exists (of two concurrent writers, the first one's file stands)."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX, suffix=".part")
    renamed = False
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:
            os.link(temp, path)
        else:
            os.replace(temp, path)
            renamed = True
    finally:
        if not renamed:
            with contextlib.suppress(OSError):
                os.unlink(temp)


# ---------------------------------------------------------------------------- the cache

class FeatureCache:
    """The encoder tokens of each sample key, in `directory` (created when missing).

    `dtype`: what the tokens are stored (and then served) in; default: the encoder's output
    dtype (float32, float16 or bfloat16). A regularizer given `feature_cache=` binds the cache
    to its encoder and VAE on first use (`bind`): a cache filled by anything else raises
    FeatureCacheMismatchError. `stats` counts hits, misses, writes and corrupted entries.
    """

    def __init__(self, directory: Union[str, os.PathLike], *, dtype: Optional[torch.dtype] = None):
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a path, got {type(directory).__name__}")
        if dtype is not None:
            _dtype_name(dtype)
        self.directory = Path(directory)
        self.dtype = dtype
        self.stats = {"hits": 0, "misses": 0, "writes": 0, "corrupted": 0, "write_errors": 0}
        self._writable = True
        self._reported: set = set()
        self.manifest = self._read_manifest()

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.directory)!r}, dtype={self.dtype})"

    @classmethod
    def open(cls, cache: Union["FeatureCache", str, os.PathLike]) -> "FeatureCache":
        """`cache` itself, or a FeatureCache on the folder `cache`."""
        return cache if isinstance(cache, FeatureCache) else cls(cache)

    # -- manifest

    @property
    def producer(self) -> Optional[Dict[str, Any]]:
        return None if self.manifest is None else self.manifest["producer"]

    def _read_manifest(self) -> Optional[Dict[str, Any]]:
        path = self.directory / MANIFEST
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            manifest = json.loads(text)
            ok = isinstance(manifest, dict) and manifest.get("format") == FORMAT and isinstance(
                manifest.get("producer"), dict)
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{path} is not a repa-fast feature cache manifest: remove the folder or pick another")
        if manifest.get("version") != VERSION:
            raise ValueError(f"{path}: cache format version {manifest.get('version')!r}, this repa-fast reads "
                             f"{VERSION}: fill a new cache")
        return manifest

    def bind(self, producer: Mapping[str, Any]) -> None:
        """Use the cache for tokens made by `producer` (`producer_of(...)`): checked against the
        manifest, which is written when the cache is new. Raises FeatureCacheMismatchError."""
        wanted = json.loads(json.dumps(producer))
        if self.manifest is None:
            self._create_manifest(wanted)
        if self.manifest is not None and self.manifest["producer"] != wanted:
            found = "\n  ".join(_differences(self.manifest["producer"], wanted))
            raise FeatureCacheMismatchError(
                f"feature cache {self.directory} was filled by another encoder setup; serving it would train "
                f"on wrong targets. Differences:\n  {found}\nUse another folder (or remove this one).")
        if self.dtype is None:
            self.dtype = STORE_DTYPES[wanted["dtype"]]

    def _create_manifest(self, producer: Dict[str, Any]) -> None:
        manifest = {"format": FORMAT, "version": VERSION, "producer": producer,
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        from .. import __version__
        manifest["repa_fast"] = __version__
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_atomic(self.directory / MANIFEST, json.dumps(manifest, indent=1).encode(), exclusive=True)
        except FileExistsError:
            pass  # another process created it first: checked against this run's producer by bind
        except OSError as err:
            self._write_failed(err)
            return
        self.manifest = self._read_manifest()

    # -- entries

    def entry_path(self, key: str) -> Path:
        """The file of `key`: entries/<2 hex>/<sha256 of the key>.safetensors."""
        if not isinstance(key, str):
            raise TypeError(f"cache keys must be strings, got {type(key).__name__} {key!r}")
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        return self.directory / ENTRIES / digest[:2] / f"{digest}.safetensors"

    def get(self, key: str, input_shape: Optional[Sequence[int]] = None) -> Optional[Entry]:
        """The entry of `key`, or None when there is none, when it was computed from an input of
        another shape than `input_shape`, or when it is corrupted (reported once)."""
        path = self.entry_path(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            self._report("read", f"cannot read {path} ({err}); computing the tokens instead")
            return None
        try:
            entry = _parse_entry(raw, key)
            if self.dtype is not None and entry.tokens.dtype != self.dtype:
                raise ValueError(f"stored as {entry.tokens.dtype}, the cache holds {self.dtype}")
        except ValueError as err:
            self.stats["corrupted"] += 1
            self._report("corrupted", f"corrupted entry for key {key!r} ({path}: {err}); recomputing it "
                                      f"(further corrupted entries are counted in .stats, not reported)")
            return None
        if input_shape is not None and tuple(input_shape) != entry.input_shape:
            return None  # the sample changed (another resolution): recomputed and overwritten
        return entry

    def put(self, key: str, tokens: torch.Tensor, grid: Grid, input_shape: Sequence[int]) -> bool:
        """Store `tokens` (N, E) of `key`; False when the folder cannot be written (reported once)."""
        if tokens.dim() != 2 or grid[0] * grid[1] != tokens.shape[0]:
            raise ValueError(f"tokens must be (N, E) with N = h * w of grid {tuple(grid)}, got {tuple(tokens.shape)}")
        if not self._writable:
            return False
        path = self.entry_path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, _entry_bytes(key, tokens, grid, input_shape))
        except OSError as err:
            self._write_failed(err)
            return False
        self.stats["writes"] += 1
        return True

    def _write_failed(self, err: OSError) -> None:
        self._writable = False
        self.stats["write_errors"] += 1
        why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied"}.get(err.errno, str(err))
        self._report("write", f"cannot write to feature cache {self.directory}: {why} ({err}). Training goes "
                              f"on: cached entries are still served, the others are computed every time")

    def _report(self, kind: str, message: str) -> None:
        if kind not in self._reported:
            self._reported.add(kind)
            warnings.warn(message, FeatureCacheWarning, stacklevel=3)

    def targets(self, keys: Sequence[str], inputs: torch.Tensor,
                compute: Callable[[torch.Tensor], Tuple[torch.Tensor, Grid]]) -> Tuple[torch.Tensor, Grid]:
        """Tokens (B, N, E) in the cache's dtype on the CPU and their grid, for the samples
        `keys` whose latents or pixels are `inputs` (B, C, H, W): entries for the keys found,
        `compute(inputs[misses])` -> (tokens, grid) for the others, which are stored and then
        served as stored (cast to the cache's dtype), so a later hit returns the same bits."""
        if isinstance(keys, str) or not isinstance(keys, Sequence):
            raise TypeError(f"keys must be a sequence of strings, one per sample, got {type(keys).__name__}")
        if len(keys) != inputs.shape[0]:
            raise ValueError(f"keys has {len(keys)} entries for a batch of {inputs.shape[0]} samples "
                             f"(inputs {tuple(inputs.shape)})")
        if len(set(keys)) != len(keys):
            raise ValueError("keys repeat within the batch: each sample needs its own key")
        input_shape = tuple(inputs.shape[1:])
        found = [self.get(key, input_shape) for key in keys]
        misses = [i for i, entry in enumerate(found) if entry is None]
        self.stats["hits"] += len(keys) - len(misses)
        self.stats["misses"] += len(misses)
        if misses:
            index = torch.tensor(misses, device=inputs.device)
            tokens, grid = compute(inputs.index_select(0, index))
            tokens = tokens.detach().to("cpu", self.dtype or tokens.dtype)
            for i, row in zip(misses, tokens):
                self.put(keys[i], row, grid, input_shape)
                found[i] = Entry(keys[i], row, tuple(grid), input_shape)
        grids = {entry.grid for entry in found}
        if len(grids) != 1:
            raise ValueError(f"cached entries of one batch have different token grids {sorted(grids)}: the "
                             f"cache holds stale entries; run `repa-fast cache prune` or use a new folder")
        return torch.stack([entry.tokens for entry in found]), grids.pop()

    # -- tools

    def entry_files(self) -> Iterator[Path]:
        root = self.directory / ENTRIES
        if root.is_dir():
            yield from sorted(root.glob("*/*.safetensors"))

    def temp_files(self) -> List[Path]:
        return sorted([*self.directory.glob(f"{TEMP_PREFIX}*"), *(self.directory / ENTRIES).glob(f"*/{TEMP_PREFIX}*")])

    def check_file(self, path: Path) -> Tuple[Optional[Entry], str]:
        """(entry, "") for a good entry file, (None, why) otherwise; nothing is reported."""
        try:
            raw = path.read_bytes()
            header_len = struct.unpack("<Q", raw[:8])[0] if len(raw) >= 8 else 0
            key = json.loads(raw[8:8 + header_len])["__metadata__"]["key"]
        except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
            return None, f"unreadable ({type(err).__name__}: {err})"
        if path != self.entry_path(key):
            return None, f"holds key {key!r}, whose file is {self.entry_path(key)}"
        try:
            return _parse_entry(raw, key), ""
        except ValueError as err:
            return None, str(err)

    def summary(self) -> Dict[str, Any]:
        """Entries, bytes, temporary files and the producer, for `repa-fast cache info`."""
        files = list(self.entry_files())
        return {"directory": str(self.directory), "entries": len(files),
                "bytes": sum(f.stat().st_size for f in files), "temp_files": len(self.temp_files()),
                "manifest": self.manifest}


def open_feature_cache(cache: Union[FeatureCache, str, os.PathLike, None]) -> Optional[FeatureCache]:
    """None, a FeatureCache, or a folder (opened as one)."""
    if cache is None or isinstance(cache, FeatureCache):
        return cache
    if isinstance(cache, (str, os.PathLike)):
        return FeatureCache(cache)
    raise TypeError(f"feature_cache must be a folder path or a repa_fast.FeatureCache, got {type(cache).__name__}")


def encode_inputs(encoder, vae: Optional[nn.Module], inputs: torch.Tensor) -> Tuple[torch.Tensor, Grid]:
    """The encoder's (tokens, grid) of pixels, or of latents decoded with `vae` when given."""
    from .encoders import pixels_from_latents
    return encoder(pixels_from_latents(vae, inputs) if vae is not None else inputs)


def fill_feature_cache(cache: Union[FeatureCache, str, os.PathLike], items: Iterable[Tuple[str, torch.Tensor]], *,
                       encoder, vae: Optional[nn.Module] = None, batch_size: int = 16,
                       progress: Optional[Callable[[int], None]] = None) -> Dict[str, int]:
    """Fill `cache` ahead of training from `(key, latents (C, h, w))` pairs with `vae=`, or
    `(key, pixels (3, H, W) in [0, 1])` without: the keys already cached are skipped (a run
    cut short resumes where it stopped), the others encoded `batch_size` at a time (consecutive
    items of one shape). `progress(n)` is called after each n items. Returns the counts
    {"computed", "skipped", "failed_writes"}."""
    from .encoders import VisionEncoder
    if not isinstance(encoder, VisionEncoder):
        raise TypeError(f"encoder must be a repa_fast.VisionEncoder, got {type(encoder).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    cache = open_feature_cache(cache)
    cache.bind(producer_of(encoder, vae, cache.dtype or encoder.dtype))
    counts = {"computed": 0, "skipped": 0, "failed_writes": 0}
    pending: List[Tuple[str, torch.Tensor]] = []

    def flush():
        if not pending:
            return
        keys, tensors = [k for k, _ in pending], torch.stack([t for _, t in pending])
        writes = cache.stats["writes"]
        cache.targets(keys, tensors, lambda x: encode_inputs(encoder, vae, x))
        counts["computed"] += len(keys)
        counts["failed_writes"] += len(keys) - (cache.stats["writes"] - writes)
        if progress:
            progress(len(keys))
        pending.clear()

    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)
                and item[1].dim() == 3):
            raise ValueError(f"items must be (key, tensor (C, H, W)) pairs, got {_describe(item)}")
        key, tensor = item
        if cache.get(key, tuple(tensor.shape)) is not None:
            counts["skipped"] += 1
            if progress:
                progress(1)
            continue
        if pending and (pending[0][1].shape != tensor.shape or len(pending) == batch_size):
            flush()
        pending.append((key, tensor))
    flush()
    return counts


def _describe(item: Any) -> str:
    if isinstance(item, tuple):
        return "(" + ", ".join(f"tensor {tuple(v.shape)}" if isinstance(v, torch.Tensor) else repr(v)[:40]
                               for v in item) + ")"
    return repr(item)[:80]


def prune(cache: FeatureCache, *, keep_keys: Optional[Iterable[str]] = None, temp_older_than_s: float = 600.0,
          dry_run: bool = False) -> Dict[str, List[str]]:
    """Remove corrupted entries, temporary files of killed writes not touched for
    `temp_older_than_s` seconds (a live writer's are newer), and, with `keep_keys`, the entries
    of every other key. Returns the removed paths by reason."""
    keep = None if keep_keys is None else set(keep_keys)
    removed: Dict[str, List[str]] = {"corrupted": [], "not kept": [], "temporary": []}
    now = time.time()
    for path in cache.temp_files():
        with contextlib.suppress(OSError):
            if now - path.stat().st_mtime >= temp_older_than_s:
                removed["temporary"].append(str(path))
    for path in cache.entry_files():
        entry, why = cache.check_file(path)
        if entry is None:
            removed["corrupted"].append(str(path))
        elif keep is not None and entry.key not in keep:
            removed["not kept"].append(str(path))
    if not dry_run:
        for paths in removed.values():
            for path in paths:
                with contextlib.suppress(OSError):
                    os.unlink(path)
    return removed
