"""Datasets and per-peer sharding.

Three corpus sources:
  - "stdlib": the Python standard library's own .py files, read as bytes. Every
    machine with the same Python version has it, so a swarm can train with zero
    data setup.
  - "text":   the user's files and/or directories, read as bytes (vocab 256).
  - "tokens": one pre-tokenized file (.npy, or raw binary of a fixed dtype).

The train/val split must be identical on every peer (so validation losses are
comparable) and must not leak: for multi-file corpora whole files go to val,
chosen by a hash of their relative path, never by position or randomness.
"""

from __future__ import annotations

import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn

from averaging.errors import DataError  # noqa: F401  (re-exported)
from peer.device import autocast
from .config import DataConfig, parse_shard  # noqa: F401  (DataConfig, parse_shard: re-exported)


def _is_int(value: object) -> bool:
    # bool is a subclass of int; a `True` batch size is a mistake.
    return isinstance(value, int) and not isinstance(value, bool)


# Separator between concatenated files, so the model sees a file boundary.
_FILE_SEP = b"\n"
# Directory names skipped when collecting stdlib sources: tests are large,
# repetitive and would crowd out the rest of the library under max_bytes.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


@dataclass(frozen=True, eq=False)  # eq=False: == on numpy arrays is elementwise, not a bool
class Corpus:
    """A loaded corpus, already split. Token arrays may be read-only or memory-mapped."""

    # 1-D integer array of training tokens.
    train: np.ndarray
    # 1-D integer array of validation tokens (disjoint from train).
    val: np.ndarray
    # Number of distinct token ids (256 for bytes, max token + 1 for "tokens").
    vocab_size: int
    # Human-readable summary, e.g. "stdlib: 812 files, 7.9 MB; val: 41 held-out files".
    description: str
    # data.source "shards": the training shards (peer/shards.py); `train` is then the first of them.
    train_shards: tuple[np.ndarray, ...] | None = None
    # data.source "shards": the folder's tokenizer.json, if it has one (exported with the model).
    tokenizer_file: Path | None = None

    def sampler(self, *, block_size: int, batch_size: int, shard: tuple[int, int] | None,
                seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches for one peer: random windows of `train`, or, from shards, a
        non-overlapping pass over this peer's windows per epoch (peer.shards.WindowSampler)."""
        if self.train_shards is not None:
            from .shards import WindowSampler
            return WindowSampler(self.train_shards, block_size=block_size, batch_size=batch_size, shard=shard, seed=seed)
        return BatchSampler(self.train, block_size=block_size, batch_size=batch_size, shard=shard, seed=seed)


# --------------------------------------------------------------------------- splitting


def is_val_file(relpath: str, val_fraction: float) -> bool:
    """Whether the file at `relpath` (posix, relative to its corpus root) is held out.

    Depends only on the path string, so every peer agrees without coordination,
    and adding or removing other files never moves a file between train and val.
    """
    crc = zlib.crc32(relpath.encode("utf-8"))
    return crc % 1000 < round(val_fraction * 1000)


def _split(
    files: list[tuple[str, bytes]], val_fraction: float, min_val: int
) -> tuple[bytes, bytes, str]:
    """Split (relpath, content) pairs into (train bytes, val bytes, how).

    Whole files go to val by `is_val_file`. If that leaves val shorter than
    `min_val` bytes, or bigger than train (a few-file corpus where a big file
    hashed to val), fall back to holding out the tail fraction of the concatenation.
    """
    if len(files) > 1:
        held = [is_val_file(rel, val_fraction) for rel, _ in files]
        val = _FILE_SEP.join(data for (_, data), h in zip(files, held) if h)
        train = _FILE_SEP.join(data for (_, data), h in zip(files, held) if not h)
        if len(val) >= min_val and len(train) >= len(val):
            return train, val, f"val: {sum(held)} held-out files"
    everything = _FILE_SEP.join(data for _, data in files)
    n_val = int(round(len(everything) * val_fraction))
    split = len(everything) - n_val
    return everything[:split], everything[split:], f"val: last {val_fraction:.0%}"


# --------------------------------------------------------------------------- reading


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e


def _read_capped(entries: list[tuple[str, Path]], max_bytes: int) -> list[tuple[str, bytes]]:
    """Read files in order until `max_bytes` (content + separators) is reached; 0 = no cap.

    The last file read may be truncated. Files are read lazily so a small cap on
    a big directory stays fast. Empty files are dropped (they carry no tokens).
    """
    out: list[tuple[str, bytes]] = []
    total = 0
    for rel, path in entries:
        if max_bytes and total >= max_bytes:
            break
        data = _read_file(path)
        if max_bytes:
            data = data[: max_bytes - total]
        if data:
            out.append((rel, data))
            total += len(data) + len(_FILE_SEP)
    return out


def list_stdlib_files() -> list[tuple[str, Path]]:
    """The stdlib's .py files as (posix relpath, path), sorted by relpath.

    Skips site-packages (installed third-party code differs between machines),
    test directories and caches.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"Python stdlib directory not found: {root}")
    entries: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                entries.append((path.relative_to(root).as_posix(), path))
    entries.sort(key=lambda e: e[0])
    return entries


def _walk_error(err: OSError) -> None:
    # os.walk silently skips unreadable directories by default; a half-read corpus
    # would differ between peers without anyone noticing.
    raise DataError(f"cannot read directory {err.filename}: {err.strerror or err}") from err


def _expand_text_paths(paths: list[str]) -> list[tuple[str, Path]]:
    """Expand files and directories into (relpath, path) entries.

    Directories are walked recursively (hidden files and dirs such as .git are
    skipped) and their files sorted by path relative to that directory, so peers
    that mount the same data at different absolute paths agree on the order and
    on the val split. A file given directly is keyed by its name.
    """
    entries: list[tuple[str, Path]] = []
    seen: set[Path] = set()
    for spec in paths:
        p = Path(spec).expanduser()
        if p.is_dir():
            found: list[tuple[str, Path]] = []
            for dirpath, dirnames, filenames in os.walk(p, onerror=_walk_error):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for name in filenames:
                    fp = Path(dirpath) / name
                    if not name.startswith(".") and fp.is_file():
                        found.append((fp.relative_to(p).as_posix(), fp))
            if not found:
                raise DataError(f"data path {spec} is a directory with no files")
            found.sort(key=lambda e: e[0])
        elif p.is_file():
            found = [(p.name, p)]
        elif p.exists():
            raise DataError(f"data path {spec} is neither a regular file nor a directory")
        else:
            raise DataError(f"data path {spec} does not exist")
        for rel, fp in found:
            key = fp.resolve()
            if key not in seen:  # the same file given twice (e.g. file + its dir)
                seen.add(key)
                entries.append((rel, fp))
    return entries


def _bytes_corpus(
    label: str, files: list[tuple[str, bytes]], cfg: DataConfig, block_size: int
) -> Corpus:
    if not files:
        raise DataError(f"{label}: corpus is empty")
    # Val must hold at least two full (block_size + 1)-token windows to be a useful estimate.
    train, val, how = _split(files, cfg.val_fraction, min_val=2 * (block_size + 1))
    if not train or not val:
        raise DataError(f"{label}: corpus of {len(train) + len(val)} bytes is too small to split")
    size_mb = (len(train) + len(val)) / 1e6
    return Corpus(
        train=np.frombuffer(train, dtype=np.uint8),
        val=np.frombuffer(val, dtype=np.uint8),
        vocab_size=256,
        description=f"{label}: {len(files)} files, {size_mb:.1f} MB; {how}",
    )


def _load_tokens(cfg: DataConfig) -> Corpus:
    spec = cfg.paths[0]
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"token file {spec} does not exist")
    if not path.is_file():
        raise DataError(f"token file {spec} is not a regular file")
    # Memory-map rather than read: token files can be far larger than RAM.
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except OSError as e:
            raise DataError(f"cannot read {spec}: {e.strerror or e}") from e
        except ValueError as e:  # bad header, object dtype, ...
            raise DataError(f"{spec} is not a valid .npy token file: {e}") from e
        if not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"{spec} holds {arr.dtype} values, expected integer token ids")
        arr = arr.reshape(-1)  # a view for C-ordered arrays
    else:
        dtype = np.dtype(cfg.token_dtype)
        try:
            size = path.stat().st_size
        except OSError as e:
            raise DataError(f"cannot read {spec}: {e.strerror or e}") from e
        if size % dtype.itemsize:
            raise DataError(
                f"{spec} is {size} bytes, not a multiple of {cfg.token_dtype} ({dtype.itemsize} bytes)"
            )
        if size == 0:
            raise DataError(f"token file {spec} is empty")
        try:
            arr = np.memmap(path, dtype=dtype, mode="r")
        except OSError as e:
            raise DataError(f"cannot read {spec}: {e.strerror or e}") from e

    if arr.size == 0:
        raise DataError(f"token file {spec} is empty")
    if int(arr.min()) < 0:
        raise DataError(f"token file {spec} contains negative token ids")
    vocab_size = int(arr.max()) + 1

    n_val = int(round(arr.size * cfg.val_fraction))
    split = arr.size - n_val
    if n_val == 0 or split == 0:
        raise DataError(f"token file {spec} has only {arr.size} tokens, too few to split")
    return Corpus(
        train=arr[:split],
        val=arr[split:],
        vocab_size=vocab_size,
        description=(
            f"tokens: {spec}, {arr.size:,} tokens, vocab {vocab_size}; val: last {cfg.val_fraction:.0%}"
        ),
    )


def load_corpus(cfg: DataConfig, *, block_size: int = 64) -> Corpus:
    """Load and split the corpus described by `cfg`.

    `block_size` is the model's context length; it only decides when the
    by-file val split is too small (< 2 windows) and the tail split is used.
    Raises DataError for missing, unreadable or empty data.
    """
    if cfg.source == "stdlib":
        files = _read_capped(list_stdlib_files(), cfg.max_bytes)
        return _bytes_corpus("stdlib", files, cfg, block_size)
    if cfg.source == "text":
        files = _read_capped(_expand_text_paths(cfg.paths), cfg.max_bytes)
        if not files:
            raise DataError(f"no data in {', '.join(cfg.paths)}: all files are empty")
        return _bytes_corpus("text", files, cfg, block_size)
    if cfg.source == "shards":
        from .shards import open_shards
        shards = open_shards(cfg.paths[0])
        m = shards.manifest
        return Corpus(train=shards.train[0], val=shards.val_tokens(), vocab_size=m.vocab_size,
                      description=f"shards: {cfg.paths[0]}, {shards.train_tokens:,} training tokens in "
                                  f"{len(shards.train)} shard(s), vocab {m.vocab_size} ({m.tokenizer['kind']}); "
                                  f"val: {len(shards.val_tokens()):,} tokens",
                      train_shards=shards.train, tokenizer_file=shards.tokenizer_file())
    return _load_tokens(cfg)


# --------------------------------------------------------------------------- sampling


class BatchSampler:
    """Endless iterator of random (x, y) windows from a 1-D token array.

    x, y: CPU LongTensors [batch_size, block_size], y[:, t] == x[:, t + 1] (the
    next token). Move them to the device in the training loop.

    shard=(i, n): only the i-th of n contiguous chunks of `tokens` is sampled, so
    peers given different i never see the same windows. shard=None: the whole
    array is sampled; peers then differ only by `seed` (derived from the peer id).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        block_size: int,
        batch_size: int,
        shard: tuple[int, int] | None,
        seed: int,
    ) -> None:
        if not _is_int(block_size) or block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if not _is_int(batch_size) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be a 1-D array, got shape {tokens.shape}")

        n = tokens.shape[0]
        if shard is None:
            lo, hi, what = 0, n, "token array"
        else:
            i, k = shard
            if not (_is_int(i) and _is_int(k) and 0 <= i < k):
                raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}")
            # Contiguous chunks (not strided) so windows never straddle two shards.
            lo, hi, what = i * n // k, (i + 1) * n // k, f"shard {i}/{k}"
        if hi - lo < block_size + 1:
            raise DataError(
                f"{what} has {hi - lo} tokens, need at least block_size + 1 = {block_size + 1}"
            )

        self.block_size = block_size
        self.batch_size = batch_size
        self.shard = shard
        # [start, stop) of the sampled region within `tokens`.
        self.start, self.stop = lo, hi
        self._tokens = tokens[lo:hi]  # a view, also for memory-mapped arrays
        self._rng = np.random.default_rng(seed)
        self._offsets = np.arange(block_size + 1)  # [T+1]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Window start s covers tokens[s : s + T + 1]; the largest valid s is len - T - 1.
        starts = self._rng.integers(0, len(self._tokens) - self.block_size, size=self.batch_size)
        windows = self._tokens[starts[:, None] + self._offsets]  # [B, T+1], gathers a copy
        windows = torch.from_numpy(windows.astype(np.int64))
        x = windows[:, :-1].contiguous()  # [B, T]
        y = windows[:, 1:].contiguous()  # [B, T]
        return x, y


@torch.no_grad()
def estimate_loss(
    model: nn.Module,
    tokens: np.ndarray,
    *,
    block_size: int,
    batch_size: int,
    n_batches: int,
    device: torch.device,
    seed: int = 1234,
) -> float:
    """Mean loss of `model` over `n_batches` fixed-seed windows of `tokens`.

    The windows depend only on (tokens, block_size, batch_size, seed), so every
    call on every peer evaluates exactly the same data and losses are comparable.
    The model's train/eval mode is restored afterwards.
    """
    if not _is_int(n_batches) or n_batches <= 0:
        raise ValueError(f"n_batches must be a positive integer, got {n_batches!r}")
    device = torch.device(device)
    sampler = BatchSampler(
        tokens, block_size=block_size, batch_size=batch_size, shard=None, seed=seed
    )
    was_training = model.training
    model.eval()
    try:
        # Accumulate on the device and sync once at the end (one .item(), not n_batches).
        # float32, not float64: MPS has no float64.
        total = torch.zeros((), dtype=torch.float32, device=device)
        for _ in range(n_batches):
            x, y = next(sampler)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device):
                _, loss = model(x, y)
            total += loss.float()
        return total.item() / n_batches
    finally:
        model.train(was_training)
