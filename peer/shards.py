"""Token shards written by `swarm-peer prepare` (peer/prepare.py): reading and sampling them.

A shard folder holds

    manifest.json     format, dtype, vocabulary, tokenizer, and per shard: file, split, tokens, sha256
    train-00000.bin   raw little-endian uint16 (vocab <= 65536) or uint32 token ids, memory-mapped
    val-00000.bin     the held-out split: whole pieces of the input, chosen by a hash of their name
    tokenizer.json    the `tokenizers` tokenizer, when one was used (bytes need none)

Every file is checked against the manifest when the folder is opened (size and sha256), so a
truncated or altered shard is a one-line DataError, never a silently different corpus on one peer.

Sampling (`WindowSampler`): the training tokens are cut into non-overlapping windows of T + 1
tokens (a window never straddles two shards). Each epoch visits every window of this peer once, in
an order seeded by (seed, epoch). With data.shard "i/n", all peers shuffle with the same seed and
peer i takes every n-th window: no two peers ever train on the same window. With "auto", each
peer shuffles all windows with its own seed (peers may then meet the same window, at random).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .data import DataError

FORMAT = "swarmtrain-shards/1"
MANIFEST = "manifest.json"
_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


@dataclass(frozen=True)
class ShardInfo:
    file: str  # a plain file name inside the folder
    split: str  # "train" or "val"
    tokens: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    dtype: str  # "uint16" or "uint32"
    vocab_size: int
    eos_id: int | None  # appended after every document, if the tokenizer has one
    tokenizer: dict  # {"kind": "bytes"} or {"kind": "tokenizers", "file": "tokenizer.json", "sha256": ...}
    shards: tuple[ShardInfo, ...]
    # The input pieces in the order their tokens were written, each {"name", "split", "tokens"}:
    # a file ("a/b.txt") or a ≤ 1 MiB part of a large one ("a/b.txt#3"), with its end-of-text token.
    documents: tuple[dict, ...] = ()

    def to_json(self) -> dict:
        return {"format": FORMAT, "dtype": self.dtype, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "tokenizer": self.tokenizer, "documents": list(self.documents),
                "shards": [s.__dict__ for s in self.shards]}

    @classmethod
    def parse(cls, obj: object, source: str) -> "Manifest":
        """Validate a manifest's JSON. Raises DataError naming the first problem."""
        def bad(what: str) -> DataError:
            return DataError(f"{source}: {what}")

        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            got = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
            raise bad(f"not a swarmtrain shard manifest (format {got!r}, expected {FORMAT!r})")
        dtype, vocab, eos, tok = obj.get("dtype"), obj.get("vocab_size"), obj.get("eos_id"), obj.get("tokenizer")
        if dtype not in _DTYPES:
            raise bad(f"dtype must be uint16 or uint32, got {dtype!r}")
        if not _is_int(vocab) or not 0 < vocab <= np.iinfo(_DTYPES[dtype]).max + 1:
            raise bad(f"vocab_size {vocab!r} does not fit {dtype}")
        if eos is not None and (not _is_int(eos) or not 0 <= eos < vocab):
            raise bad(f"eos_id {eos!r} is not a token id")
        if not isinstance(tok, dict) or tok.get("kind") not in ("bytes", "tokenizers"):
            raise bad(f"tokenizer must be {{'kind': 'bytes' | 'tokenizers', ...}}, got {tok!r}")
        if tok["kind"] == "tokenizers" and not _plain_name(tok.get("file")):
            raise bad(f"tokenizer file {tok.get('file')!r} is not a file name in the folder")
        shards = []
        raw = obj.get("shards")
        if not isinstance(raw, list) or not raw:
            raise bad("lists no shards")
        for s in raw:
            if (not isinstance(s, dict) or not _plain_name(s.get("file")) or s.get("split") not in ("train", "val")
                    or not _is_int(s.get("tokens")) or s["tokens"] <= 0 or not isinstance(s.get("sha256"), str)):
                raise bad(f"malformed shard entry {str(s)[:120]}")
            shards.append(ShardInfo(s["file"], s["split"], s["tokens"], s["sha256"]))
        for split in ("train", "val"):
            if not any(s.split == split for s in shards):
                raise bad(f"has no {split} shard")
        docs = obj.get("documents", [])
        if not isinstance(docs, list) or not all(
                isinstance(d, dict) and isinstance(d.get("name"), str) and d.get("split") in ("train", "val")
                and _is_int(d.get("tokens")) and d["tokens"] >= 0 for d in docs):
            raise bad("malformed documents list")
        for split in ("train", "val"):
            listed, held = (sum(d["tokens"] for d in docs if d["split"] == split),
                            sum(s.tokens for s in shards if s.split == split))
            if docs and listed != held:
                raise bad(f"its documents hold {listed} {split} tokens, its shards {held}")
        return cls(dtype, vocab, eos, tok, tuple(shards), tuple(docs))


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _plain_name(name: object) -> bool:
    return isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class ShardSet:
    """An opened shard folder: memory-mapped token arrays per split (read-only)."""

    folder: Path
    manifest: Manifest
    train: tuple[np.ndarray, ...]
    val: tuple[np.ndarray, ...]

    @property
    def train_tokens(self) -> int:
        return sum(len(a) for a in self.train)

    def val_tokens(self) -> np.ndarray:
        """The held-out split as one array (a view when it is one shard, as `prepare` writes it)."""
        return self.val[0] if len(self.val) == 1 else np.concatenate(self.val)

    def tokenizer_file(self) -> Path | None:
        tok = self.manifest.tokenizer
        return self.folder / tok["file"] if tok["kind"] == "tokenizers" else None


def open_shards(folder: str | Path, *, verify: bool = True) -> ShardSet:
    """Open and check a shard folder. Raises DataError (one line) for a missing folder or file, a
    malformed manifest, or a shard whose size or sha256 differs from the manifest's."""
    folder = Path(folder).expanduser()
    mpath = folder / MANIFEST
    if not folder.is_dir():
        raise DataError(f"shard folder {folder} does not exist (write one with: swarm-peer prepare)")
    try:
        obj = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise DataError(f"{folder} has no {MANIFEST}: not a shard folder (write one with: swarm-peer prepare)") from None
    except OSError as e:
        raise DataError(f"cannot read {mpath}: {e.strerror or e}") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{mpath} is not valid JSON ({str(e)[:80]})") from e
    manifest = Manifest.parse(obj, str(mpath))
    dtype = np.dtype(_DTYPES[manifest.dtype])
    arrays: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    tok = manifest.tokenizer
    if tok["kind"] == "tokenizers":
        tpath = folder / tok["file"]
        if not tpath.is_file():
            raise DataError(f"{folder}: tokenizer {tok['file']} is missing")
        if verify and tok.get("sha256") and file_sha256(tpath) != tok["sha256"]:
            raise DataError(f"{tpath}: differs from the manifest (sha256), not the tokenizer these shards were made with")
    for s in manifest.shards:
        path = folder / s.file
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise DataError(f"{folder}: shard {s.file} is missing") from None
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror or e}") from e
        if size != s.tokens * dtype.itemsize:
            raise DataError(f"{path}: {size} bytes, the manifest says {s.tokens} {manifest.dtype} tokens "
                            f"({s.tokens * dtype.itemsize} bytes): truncated or not this folder's shard")
        if verify and file_sha256(path) != s.sha256:
            raise DataError(f"{path}: contents differ from the manifest (sha256): the shard is corrupt")
        arr = np.memmap(path, dtype=dtype, mode="r")
        arrays[s.split].append(arr)
    return ShardSet(folder, manifest, tuple(arrays["train"]), tuple(arrays["val"]))


class WindowSampler:
    """Endless (x, y) batches of non-overlapping windows, one pass over this peer's windows per epoch.

    x, y: CPU LongTensors [batch_size, block_size], y[:, t] == x[:, t + 1]. See the module
    docstring for how windows are split between peers.
    """

    def __init__(self, arrays: tuple[np.ndarray, ...], *, block_size: int, batch_size: int,
                 shard: tuple[int, int] | None, seed: int) -> None:
        if block_size <= 0 or batch_size <= 0:
            raise ValueError("block_size and batch_size must be positive")
        self.arrays, self.T, self.B = arrays, block_size, batch_size
        # Window k of array a covers a[k*T : k*T + T + 1]: inputs never overlap, and the
        # (T+1)-th token is the next window's first input (its target, not a repeated input).
        counts = np.array([max(0, (len(a) - 1) // block_size) for a in arrays], dtype=np.int64)
        self._first = np.concatenate([[0], np.cumsum(counts)])  # [A+1]: global index of each array's window 0
        total = int(self._first[-1])
        self.shard = shard
        mine = total if shard is None else len(range(shard[0], total, shard[1]))
        if mine < batch_size:
            where = "the training shards" if shard is None else f"data.shard {shard[0]}/{shard[1]}"
            raise DataError(f"{where} hold {mine} windows of {block_size + 1} tokens, fewer than one batch "
                            f"({batch_size}): prepare more data or lower data.batch_size / model.block_size")
        self._total, self._seed, self.epoch = total, seed, 0
        self._order = self._epoch_order()
        self._pos = 0

    @property
    def windows(self) -> int:
        """Windows this peer visits per epoch."""
        return len(self._order)

    def _epoch_order(self) -> np.ndarray:
        # With a fixed i/n shard every peer draws the same permutation (seed 0) and takes its
        # residue class, so the peers' windows are disjoint in every epoch.
        if self.shard is None:
            return np.random.default_rng([self._seed, self.epoch]).permutation(self._total)
        i, n = self.shard
        return np.random.default_rng([0, self.epoch]).permutation(self._total)[i::n]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pos + self.B > len(self._order):  # the tail of an epoch is dropped: batches stay full
            self.epoch += 1
            self._order, self._pos = self._epoch_order(), 0
        idx = self._order[self._pos:self._pos + self.B]
        self._pos += self.B
        which = np.searchsorted(self._first, idx, side="right") - 1  # array of each window
        rows = [self.arrays[a][(k - self._first[a]) * self.T:][:self.T + 1] for a, k in zip(which, idx)]
        windows = torch.from_numpy(np.stack(rows).astype(np.int64))  # [B, T+1]
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
