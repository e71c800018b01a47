"""Files that are either whole or absent: write beside the final name, fsync, rename, fsync the folder.

A crash (or a full disk) mid-write leaves the previous version intact; after `write_atomic`
returns, the new one survives a power cut (the rename is durable once the folder is synced).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from contextlib import contextmanager
from typing import IO, Callable, Iterator


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new file in `path` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder; the rename is still atomic
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a writer that wants a file name; when the block
    ends, the file is fsynced and renamed over `path`. On any error it is removed, `path` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call `write(f)` on a temporary file beside `path`, then put it in place atomically.
    On any error the temporary file is removed and `path` is untouched."""
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        write(f)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """`write_atomic` for a text file (UTF-8)."""
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")))


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty folder beside `path` to fill; when the block ends it replaces `path` (which
    must not exist, or be empty). On any error it is removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
