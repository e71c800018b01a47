"""`swarm-peer prepare`: text -> token shards that every peer of a run reads alike.

    swarm-peer prepare corpus/ --out data/                       # bytes: 256 tokens, no tokenizer
    swarm-peer prepare corpus/ --out data/ --tokenizer tokenizer.json
    swarm-peer prepare corpus/ --out data/ --train-tokenizer 8192 # byte-level BPE trained on corpus/
    swarm-peer prepare my_dataset/ --out data/ --text-column text # a `datasets` save_to_disk folder

The input is cut into pieces at line ends (whole files up to 1 MiB); each piece goes to the
validation split or to training by a hash of its name (`peer.data.is_val_file`), so the split
never depends on the order of the files or on the machine. Pieces are tokenized in order, an
end-of-text token after each file when the tokenizer has one, and appended to shards of at most
--shard-tokens tokens (uint16 for vocabularies up to 65,536, else uint32). manifest.json lists
every shard with its size and sha256 (peer/shards.py checks both), and the tokenizer.

A Hugging Face `datasets` folder (`save_to_disk`, read with the optional `datasets` package) gives
one document per row of --text-column, in pieces of consecutive rows. A DatasetDict's "train" split
trains and its "validation" split is held out (without one, "train" is split by hash like files);
other splits such as "test" are left out. Without an end-of-text token, rows are separated by a
newline.

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
from functools import partial
from typing import Callable, Iterator

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
    """A unit of the split and of tokenization: ≤ ~1 MiB of one file, or a run of dataset rows."""
    name: str  # "relpath", "relpath#k" or "folder/split/rows:i-j": what the split hashes
    origin: str  # the file or dataset folder, for errors
    nbytes: int
    read: Callable[[], list[tuple[bytes, bool]]]  # [(utf-8 text, a document ends after it)]
    split: str | None = None  # fixed by the input (a dataset's "validation" split), else by hash
    rows: bool = False  # documents are dataset rows: a newline between them when there is no EOT token


def _read_range(path: Path, start: int, stop: int, last: bool) -> list[tuple[bytes, bool]]:
    with path.open("rb") as f:
        f.seek(start)
        return [(f.read(stop - start), last)]


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
                yield Piece(rel if k == 0 and stop >= size else f"{rel}#{k}", str(path), stop - start,
                            partial(_read_range, path, start, stop, stop >= size))
                start, k = stop, k + 1
                if size == 0:
                    break


# ------------------------------------------------------------------ Hugging Face `datasets` folders

#: A DatasetDict's splits and where their rows go; any other split (e.g. "test") is left out.
DATASET_SPLITS = {"train": "train", "validation": "val", "valid": "val", "val": "val"}


def is_dataset_folder(p: Path) -> bool:
    """A folder written by `datasets`' save_to_disk: a Dataset or a DatasetDict."""
    return p.is_dir() and ((p / "dataset_dict.json").is_file()
                           or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file()))


def _read_rows(ds, column: str, start: int, stop: int) -> list[tuple[bytes, bool]]:
    return [(t.encode("utf-8"), True) for t in ds[start:stop][column]]


def dataset_pieces(folder: Path, column: str) -> Iterator[Piece]:
    """The rows of `column` in a saved dataset, as pieces of consecutive rows (≤ ~PIECE_BYTES of text).

    Each row is one document. A Dataset is split by hash like text files; a DatasetDict's "train"
    rows train and its "validation" rows are held out (hash split of "train" if it has none)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{folder} is a Hugging Face datasets folder; reading it needs: pip install datasets") from None
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, pyarrow errors... for a bad folder
        raise DataError(f"cannot read the datasets folder {folder}: {str(e).splitlines()[0][:160]}") from e
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"the datasets folder {folder} has splits {sorted(loaded)}, none named 'train'")
        has_val = any(DATASET_SPLITS.get(s) == "val" for s in loaded)
        parts = [(s, ds, DATASET_SPLITS[s] if has_val else None) for s, ds in loaded.items() if s in DATASET_SPLITS]
    else:
        parts = [("all", loaded, None)]
    for split_name, ds, split in parts:
        if column not in ds.column_names:
            raise DataError(f"the datasets folder {folder} ({split_name}) has no column {column!r}; its columns: "
                            f"{', '.join(ds.column_names)} (choose one with --text-column)")
        start = size = i = 0
        for batch in ds.select_columns([column]).iter(batch_size=1024):
            for text in batch[column]:
                if not isinstance(text, str):
                    raise DataError(f"{folder} ({split_name}) row {i}: column {column!r} holds "
                                    f"{type(text).__name__}, not text")
                size += len(text.encode("utf-8"))
                i += 1
                if size >= PIECE_BYTES or i == len(ds):
                    yield Piece(f"{folder.name}/{split_name}/rows:{start}-{i}", str(folder), size,
                                partial(_read_rows, ds, column, start, i), split=split, rows=True)
                    start, size = i, 0


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
            val_fraction: float = 0.05, shard_tokens: int = 1 << 27, text_column: str = "text") -> Manifest:
    """Write token shards of the text under `paths` (text files, folders of them, or `datasets` folders
    whose `text_column` holds the documents) to the folder `out` (which must not exist or be empty).
    Returns the manifest. Raises DataError (one line) for bad input; then nothing is left."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} exists and is not an empty folder (prepare writes a new one)")
    if not 0 < val_fraction < 0.5:
        raise DataError(f"--val-fraction must be in (0, 0.5), got {val_fraction}")
    if shard_tokens < 1024:
        raise DataError(f"--shard-tokens must be at least 1024, got {shard_tokens}")
    plist: list[Piece] = []
    text_paths = []
    for spec in paths:
        if is_dataset_folder(Path(spec).expanduser()):
            plist += dataset_pieces(Path(spec).expanduser(), text_column)
        else:
            text_paths.append(spec)
    if text_paths:
        plist += pieces(_expand_text_paths(text_paths))
    nonempty = [p for p in plist if p.nbytes]
    if not nonempty:
        raise DataError(f"no text in {', '.join(paths)}: all files are empty")
    val = {p.name for p in plist if p.split == "val" or (p.split is None and is_val_file(p.name, val_fraction))}
    if not val or len(val) == len(plist):  # too few pieces for the hash to hold some out: the last one
        if len(nonempty) < 2:
            raise DataError(f"{', '.join(paths)}: one piece of text ({nonempty[0].origin}), too little to hold out "
                            f"a validation split (give more text or more files)")
        val = {nonempty[-1].name}

    def text(p: Piece) -> list[tuple[str, bool]]:
        out = []
        for data, end in p.read():
            try:
                out.append((data.decode("utf-8"), end))
            except UnicodeDecodeError as e:
                raise DataError(f"{p.origin} is not UTF-8 text (byte {e.start} of {p.name}); a tokenizer needs "
                                f"text, bytes do not: leave out --tokenizer / --train-tokenizer") from None
        return out

    if tokenizer and train_vocab:
        raise DataError("give --tokenizer or --train-tokenizer, not both")
    if tokenizer:
        tok = load_tokenizer(tokenizer)
    elif train_vocab:
        if not 257 <= train_vocab <= 1 << 20:
            raise DataError(f"--train-tokenizer needs a vocabulary size of 257 .. 1048576, got {train_vocab}")
        tok = train_tokenizer((t for p in plist if p.name not in val for t, _ in text(p)), train_vocab)  # never on held-out text
    else:
        tok = Tokenizer()
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)

    with atomic_folder(out) as tmp:
        writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
        docs = []
        for p in plist:
            ids: list[int] = []
            for data, end in (p.read() if tok.tok is None else [(t.encode("utf-8"), e) for t, e in text(p)]):
                ids += tok.encode(data)
                if end and tok.eos_id is not None:
                    ids.append(tok.eos_id)
                elif end and p.rows and not data.endswith(b"\n"):  # rows without an EOT token: one per line
                    ids += tok.encode(b"\n")
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
    p.add_argument("paths", nargs="+", help="text files, folders of them (walked recursively), and/or Hugging Face "
                                            "datasets folders (save_to_disk; needs the datasets package)")
    p.add_argument("--text-column", default="text", help="the column of a datasets folder that holds the text")
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
                    val_fraction=ns.val_fraction, shard_tokens=ns.shard_tokens, text_column=ns.text_column)
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
