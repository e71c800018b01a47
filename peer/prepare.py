"""`swarm-peer prepare`: text files -> token shards that every peer of a run reads alike.

    swarm-peer prepare corpus/ --out data/                       # bytes: 256 tokens, no tokenizer
    swarm-peer prepare corpus/ --out data/ --tokenizer tokenizer.json
    swarm-peer prepare corpus/ --out data/ --train-tokenizer 8192 # byte-level BPE trained on corpus/

The input is cut into pieces at line ends (whole files up to 1 MiB); each piece goes to the
validation split or to training by a hash of its name (`peer.data.is_val_file`), so the split
never depends on the order of the files or on the machine. Pieces are tokenized in order, an
end-of-text token after each file when the tokenizer has one, and appended to shards of at most
--shard-tokens tokens (uint16 for vocabularies up to 65,536, else uint32). manifest.json lists
every shard with its size and sha256 (peer/shards.py checks both), and the tokenizer.

Nothing is downloaded: the tokenizer is a local file, bytes, or trained here with `tokenizers`.
The output folder is written beside its final name and renamed into place when complete.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .data import DataError, _expand_text_paths, is_val_file
from .fsutil import atomic_folder
from .shards import MANIFEST, Manifest, ShardInfo, file_sha256

PIECE_BYTES = 1 << 20  # pieces of at most ~1 MiB: the unit of the split and of tokenization
EOT = "<|endoftext|>"


class Tokenizer:
    """bytes (vocab 256, no special token) or a `tokenizers` tokenizer.json."""

    def __init__(self, tok=None) -> None:  # tok: tokenizers.Tokenizer | None
        self.tok = tok
        self.vocab_size = 256 if tok is None else tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = None if tok is None else tok.token_to_id(EOT)

    def encode(self, text: bytes) -> list[int]:
        if self.tok is None:
            return list(text)
        return self.tok.encode(text.decode("utf-8"), add_special_tokens=False).ids

    def decode(self, ids) -> bytes:
        if self.tok is None:
            return bytes(np.asarray(ids, dtype=np.uint8))
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False).encode("utf-8")


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise DataError('a tokenizer needs the tokenizers package: pip install "swarmtrain[hf]"') from None
    return tokenizers


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A local tokenizer.json. Raises DataError (one line) if it is missing or not a tokenizer."""
    tk = _tokenizers()
    try:
        return Tokenizer(tk.Tokenizer.from_file(str(path)))
    except Exception as e:  # tokenizers raises a plain Exception for a missing or malformed file
        raise DataError(f"cannot load tokenizer {path}: {str(e).splitlines()[0][:120]}") from e


def train_tokenizer(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (GPT-2's scheme: every byte sequence round-trips) with an end-of-text token."""
    tk = _tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)


@dataclass(frozen=True)
class Piece:
    name: str  # "relpath" or "relpath#k": what the split hashes
    path: Path
    start: int  # byte range in the file
    stop: int
    last: bool  # the file's last piece: the end-of-text token follows it


def pieces(files: list[tuple[str, Path]]) -> Iterator[Piece]:
    """Each file in ≤ PIECE_BYTES pieces cut after a newline (or hard, in a line longer than that)."""
    for rel, path in files:
        size = path.stat().st_size
        start, k = 0, 0
        with path.open("rb") as f:
            while start < size or (size == 0 and k == 0):
                f.seek(start)
                chunk = f.read(PIECE_BYTES)
                stop = start + len(chunk)
                if stop < size:
                    nl = chunk.rfind(b"\n")
                    if nl > 0:
                        stop = start + nl + 1
                yield Piece(rel if k == 0 and stop >= size else f"{rel}#{k}", path, start, stop, stop >= size)
                start, k = stop, k + 1
                if size == 0:
                    break


@dataclass
class _ShardWriter:
    folder: Path
    split: str
    dtype: np.dtype
    max_tokens: int
    shards: list[ShardInfo] = field(default_factory=list)
    _buf: list[np.ndarray] = field(default_factory=list)
    _n: int = 0

    def add(self, ids: list[int]) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        while len(arr):
            take = min(len(arr), self.max_tokens - self._n)
            self._buf.append(arr[:take])
            self._n += take
            arr = arr[take:]
            if self._n == self.max_tokens:
                self.flush()

    def flush(self) -> None:
        if not self._n:
            return
        name = f"{self.split}-{len(self.shards):05d}.bin"
        path = self.folder / name
        with path.open("wb") as f:
            for a in self._buf:
                f.write(a.tobytes())
            f.flush()
            os.fsync(f.fileno())
        self.shards.append(ShardInfo(name, self.split, self._n, file_sha256(path)))
        self._buf, self._n = [], 0


def prepare(paths: list[str], out: str | Path, *, tokenizer: str | None = None, train_vocab: int = 0,
            val_fraction: float = 0.05, shard_tokens: int = 1 << 27) -> Manifest:
    """Write token shards of the text under `paths` to the folder `out` (which must not exist or be
    empty). Returns the manifest. Raises DataError (one line) for bad input; then nothing is left."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} exists and is not an empty folder (prepare writes a new one)")
    if not 0 < val_fraction < 0.5:
        raise DataError(f"--val-fraction must be in (0, 0.5), got {val_fraction}")
    if shard_tokens < 1024:
        raise DataError(f"--shard-tokens must be at least 1024, got {shard_tokens}")
    files = _expand_text_paths(paths)
    plist = list(pieces(files))
    if not any(p.stop > p.start for p in plist):
        raise DataError(f"no text in {', '.join(paths)}: all files are empty")
    val = {p.name for p in plist if is_val_file(p.name, val_fraction)}
    if not val or len(val) == len(plist):  # too few pieces for the hash to hold some out: the last one
        nonempty = [p.name for p in plist if p.stop > p.start]
        if len(nonempty) < 2:
            raise DataError(f"{', '.join(paths)}: one piece of text ({plist[0].path}), too little to hold out a "
                            f"validation split (give more text or more files)")
        val = {nonempty[-1]}

    def read(p: Piece) -> bytes:
        with p.path.open("rb") as f:
            f.seek(p.start)
            return f.read(p.stop - p.start)

    def text(p: Piece) -> str:
        try:
            return read(p).decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{p.path} is not UTF-8 text (byte {p.start + e.start}); a tokenizer needs text, "
                            f"bytes do not: leave out --tokenizer / --train-tokenizer") from None

    if tokenizer and train_vocab:
        raise DataError("give --tokenizer or --train-tokenizer, not both")
    if tokenizer:
        tok = load_tokenizer(tokenizer)
    elif train_vocab:
        if not 257 <= train_vocab <= 1 << 20:
            raise DataError(f"--train-tokenizer needs a vocabulary size of 257 .. 1048576, got {train_vocab}")
        tok = train_tokenizer((text(p) for p in plist if p.name not in val), train_vocab)  # never on held-out text
    else:
        tok = Tokenizer()
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)

    with atomic_folder(out) as tmp:
        writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
        docs = []
        for p in plist:
            ids = tok.encode(read(p) if tok.tok is None else text(p).encode("utf-8"))
            if p.last and tok.eos_id is not None:
                ids.append(tok.eos_id)
            split = "val" if p.name in val else "train"
            writers[split].add(ids)
            docs.append({"name": p.name, "split": split, "tokens": len(ids)})
        for w in writers.values():
            w.flush()
        tok_info: dict = {"kind": "bytes"}
        if tok.tok is not None:
            tok.tok.save(str(tmp / "tokenizer.json"))
            tok_info = {"kind": "tokenizers", "file": "tokenizer.json", "sha256": file_sha256(tmp / "tokenizer.json")}
        manifest = Manifest(dtype=dtype.name, vocab_size=tok.vocab_size, eos_id=tok.eos_id, tokenizer=tok_info,
                            shards=tuple(writers["train"].shards + writers["val"].shards), documents=tuple(docs))
        Manifest.parse(manifest.to_json(), "prepare")  # what we write, the reader accepts
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=1) + "\n")
    return manifest


def parser() -> argparse.ArgumentParser:
    from .cmdline import OneLineParser

    p = OneLineParser(prog="swarm-peer prepare", allow_abbrev=False,
                      description="Turn text files into the token shards a run trains on (--data.source shards).")
    p.add_argument("paths", nargs="+", help="text files and/or folders (walked recursively)")
    p.add_argument("--out", required=True, help="the shard folder to create (must not exist, or be empty)")
    p.add_argument("--tokenizer", help="a local tokenizer.json (the tokenizers library); default: bytes (256 tokens)")
    p.add_argument("--train-tokenizer", type=int, default=0, metavar="VOCAB",
                   help="train a byte-level BPE of this vocabulary size on the training text")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of the text held out for validation")
    p.add_argument("--shard-tokens", type=int, default=1 << 27, help="tokens per shard file at most")
    return p


def main(argv: list[str]) -> int:
    ns = parser().parse_args(argv)
    try:
        m = prepare(ns.paths, ns.out, tokenizer=ns.tokenizer, train_vocab=ns.train_tokenizer,
                    val_fraction=ns.val_fraction, shard_tokens=ns.shard_tokens)
    except (DataError, OSError) as e:
        print(f"swarm-peer prepare: error: {e}", file=sys.stderr)
        return 1
    train = sum(s.tokens for s in m.shards if s.split == "train")
    val = sum(s.tokens for s in m.shards if s.split == "val")
    print(f"wrote {ns.out}: {train:,} training and {val:,} validation tokens in {len(m.shards)} shard(s), "
          f"vocabulary {m.vocab_size} ({m.tokenizer['kind']}); train on it with "
          f"--data.source shards --data.paths {ns.out}" + (f" --model.vocab-size {m.vocab_size}" if m.vocab_size != 256 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
