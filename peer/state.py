"""The state a peer must agree on with the swarm, its serialization, and checkpoints on disk.

A `SwarmState` is everything a newcomer needs to continue where the swarm is:
θ_sync (the agreed parameters), the outer momentum buffer, and the round counter. It is
saved with torch.save (weights_only-safe types only), written straight into the file (no
serialized copy in memory) and loaded memory-mapped. Peers stream it to each other chunk by
chunk (transfer.py); a download is checked against the θ_sync digest announced in the DHT.

Checkpoints are written atomically: to a temporary file in the same directory, fsynced,
then renamed over the final name. A crash mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from averaging.errors import ModelMismatchError, StateError

FORMAT = "swarmtrain-state/1"
_CKPT_RE = re.compile(r"^ckpt-r(\d{6,})\.pt$")


@dataclass(frozen=True)
class SwarmState:
    """The agreed state at the end of round `round` (rounds completed). The dataclass is frozen,
    but in a running peer its tensors are the peer's own θ_sync and momentum, which the next
    round updates in place (under RoundLoop.state_lock); a new SwarmState is made per state."""

    round: int
    fingerprint: str
    theta_sync: torch.Tensor  # fp32 [P], CPU
    momentum_buf: torch.Tensor | None  # fp32 [P], CPU, or None
    samples: int = 0  # samples this peer has contributed (informational)

    def _obj(self) -> dict:
        return {
            "format": FORMAT,
            "round": self.round,
            "fingerprint": self.fingerprint,
            "theta_sync": self.theta_sync.detach().cpu(),
            "momentum_buf": None if self.momentum_buf is None else self.momentum_buf.detach().cpu(),
            "samples": self.samples,
        }

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save(self._obj(), buf)
        return buf.getvalue()

    def write(self, f) -> None:
        """torch.save straight into a file: the tensors are written from their storage, with no
        serialized copy of the state in memory (8 B/param at 100M: 0.8 GB)."""
        torch.save(self._obj(), f)

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str, fingerprint: str | None, numel: int | None) -> "SwarmState":
        """fingerprint=None / numel=None accept any model (an archivist does not know the model)."""
        """Parse and validate. Raises StateError / ModelMismatchError with a one-line message."""
        return cls._load(io.BytesIO(data), source=source, fingerprint=fingerprint, numel=numel)

    @classmethod
    def _load(cls, f, *, source: str, fingerprint: str | None, numel: int | None, mmap: bool = False) -> "SwarmState":
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
        except OSError as e:  # missing, unreadable (a file path)
            raise StateError(f"cannot read {source}: {e.strerror or e}") from e
        except Exception as e:  # torch raises many types for truncated/garbage input
            raise StateError(f"{source}: not a swarmtrain state ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from e
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise StateError(f"{source}: not a swarmtrain state (format {obj.get('format') if isinstance(obj, dict) else type(obj).__name__!r})")
        if fingerprint is None and isinstance(obj.get("fingerprint"), str):
            fingerprint = obj["fingerprint"]
        if obj.get("fingerprint") != fingerprint:
            raise ModelMismatchError(
                f"{source}: saved for model {obj.get('fingerprint')!r}, this model is {fingerprint!r} (different architecture)"
            )
        theta, mom, rnd = obj.get("theta_sync"), obj.get("momentum_buf"), obj.get("round")
        if (not isinstance(theta, torch.Tensor) or theta.layout != torch.strided or theta.dtype != torch.float32
                or (numel is not None and theta.numel() != numel)):
            raise StateError(f"{source}: parameter vector is malformed (expected {numel} fp32 values)")
        if mom is not None and (not isinstance(mom, torch.Tensor) or mom.layout != torch.strided
                                or mom.shape != theta.shape or mom.dtype != torch.float32):
            raise StateError(f"{source}: momentum buffer is malformed")
        if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
            raise StateError(f"{source}: invalid round {rnd!r}")
        samples = obj.get("samples", 0)
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
            raise StateError(f"{source}: invalid sample count {samples!r}")
        if not torch.isfinite(theta).all() or (mom is not None and not torch.isfinite(mom).all()):
            raise StateError(f"{source}: contains NaN or Inf")
        return cls(rnd, fingerprint, theta.reshape(-1), None if mom is None else mom.reshape(-1), samples)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CheckpointDir:
    """Checkpoints `ckpt-rNNNNNN.pt` in one directory, written atomically, the last K kept."""

    def __init__(self, path: str | Path, keep_last: int = 3) -> None:
        self.path = Path(path)
        self.keep_last = keep_last

    def save(self, state: SwarmState) -> Path:
        """Write atomically. On any error the previous checkpoints are untouched."""
        self.path.mkdir(parents=True, exist_ok=True)
        final = self.path / f"ckpt-r{state.round:06d}.pt"
        fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=self.path)
        try:
            with os.fdopen(fd, "wb") as f:
                state.write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)  # atomic on POSIX
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._prune()
        return final

    def list(self) -> list[Path]:
        """Checkpoints, oldest first."""
        if not self.path.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.path.iterdir() if (m := _CKPT_RE.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        files = self.list()
        return files[-1] if files else None

    @staticmethod
    def load(path: str | Path, *, fingerprint: str | None, numel: int | None) -> SwarmState:
        """Load and validate a checkpoint file. The file is never modified."""
        p = Path(path)
        # memory-mapped: the file is not read into memory first (the caller copies what it keeps)
        return SwarmState._load(str(p), source=f"checkpoint {p}", fingerprint=fingerprint, numel=numel, mmap=True)

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for old in self.list()[: -self.keep_last]:
            old.unlink(missing_ok=True)
