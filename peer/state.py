"""The state a peer must agree on with the swarm, its serialization, and checkpoints on disk.

A `SwarmState` is everything a newcomer needs to continue where the swarm is:
θ_sync (the agreed parameters), the outer momentum buffer, and the round counter. Peers stream
it to each other chunk by chunk (transfer.py); a download is checked against the θ_sync digest
announced in the DHT.

Checkpoints are safetensors files, `ckpt-rNNNNNN.safetensors`: the tensors `theta_sync` and
`momentum_buf` (fp32 [P]), and in the header's metadata (a small JSON any safetensors reader
shows) the format, round, model fingerprint, samples and, when the peer knows it, the model's
description (`model`: the transformers config, or the embedded GPT's sizes), which is what
`swarm-bootstrap export` rebuilds the model from. safetensors writes the tensors straight from
their memory (no serialized copy) and holds no pickled code. Checkpoints of the first format
(`ckpt-rNNNNNN.pt`, torch.save of the same fields) still load.

Checkpoints are written atomically: to a temporary file in the same directory, fsynced,
then renamed over the final name. A crash mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from averaging.errors import ModelMismatchError, StateError

from .fsutil import atomic_path

FORMAT = "swarmtrain-state/1"  # the torch.save form: legacy checkpoints (.pt), and `to_bytes`
CKPT_FORMAT = "swarmtrain-checkpoint/2"  # safetensors checkpoints
_CKPT_RE = re.compile(r"^ckpt-r(\d{6,})\.(pt|safetensors)$")


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
        return cls._validated(obj, source=source, fingerprint=fingerprint, numel=numel)

    @classmethod
    def _validated(cls, obj: dict, *, source: str, fingerprint: str | None, numel: int | None) -> "SwarmState":
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

    def save_safetensors(self, path: str | Path, *, model: dict | None = None) -> None:
        """Write this state as a safetensors file at `path` (not atomically: CheckpointDir does that)."""
        from safetensors.torch import save_file

        tensors = {"theta_sync": self.theta_sync.detach().cpu().contiguous()}
        if self.momentum_buf is not None:
            tensors["momentum_buf"] = self.momentum_buf.detach().cpu().contiguous()
        meta = {"format": CKPT_FORMAT, "round": str(self.round), "fingerprint": self.fingerprint,
                "samples": str(self.samples)}
        if model is not None:
            meta["model"] = json.dumps(model, separators=(",", ":"))
        save_file(tensors, str(path), metadata=meta)


def _read_safetensors(path: Path, source: str, fingerprint: str | None, numel: int | None) -> tuple[SwarmState, dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CKPT_FORMAT:
                raise StateError(f"{source}: not a swarmtrain checkpoint (format {meta.get('format')!r})")
            keys = set(f.keys())
            if "theta_sync" not in keys or not keys <= {"theta_sync", "momentum_buf"}:
                raise StateError(f"{source}: holds tensors {sorted(keys)}, expected theta_sync and momentum_buf")
            obj: dict[str, Any] = {"format": FORMAT, "fingerprint": meta.get("fingerprint")}
            for name in ("round", "samples"):
                value = meta.get(name, "0")
                obj[name] = int(value) if value.isdigit() else value
            if fingerprint is None or meta.get("fingerprint") == fingerprint:  # read no tensor of another model
                obj["theta_sync"] = f.get_tensor("theta_sync")
                obj["momentum_buf"] = f.get_tensor("momentum_buf") if "momentum_buf" in keys else None
    except OSError as e:
        raise StateError(f"cannot read {source}: {e.strerror or e}") from e
    except SafetensorError as e:
        raise StateError(f"{source}: not a safetensors file ({str(e).splitlines()[0][:120]})") from e
    try:
        model = json.loads(meta["model"]) if "model" in meta else {}
    except ValueError:
        raise StateError(f"{source}: its model description is not valid JSON") from None
    return SwarmState._validated(obj, source=source, fingerprint=fingerprint, numel=numel), model


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CheckpointDir:
    """Checkpoints `ckpt-rNNNNNN.safetensors` in one directory (`.pt` ones of the first format are
    listed and read too), written atomically, the last K kept."""

    def __init__(self, path: str | Path, keep_last: int = 3, *, model: dict | None = None) -> None:
        """`model`: the model's description (peer.hf.describe_model), saved in every checkpoint."""
        self.path = Path(path)
        self.keep_last = keep_last
        self.model = model

    def save(self, state: SwarmState) -> Path:
        """Write atomically. On any error the previous checkpoints are untouched."""
        final = self.path / f"ckpt-r{state.round:06d}.safetensors"
        with atomic_path(final) as tmp:
            state.save_safetensors(tmp, model=self.model)
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
        return CheckpointDir.load_with_model(path, fingerprint=fingerprint, numel=numel)[0]

    @staticmethod
    def load_with_model(path: str | Path, *, fingerprint: str | None, numel: int | None) -> tuple[SwarmState, dict]:
        """The checkpoint's state and its model description ({} if it has none: the .pt format,
        or a state saved by a node that does not know the model, like an archivist)."""
        p = Path(path)
        source = f"checkpoint {p}"
        if not p.is_file():
            raise StateError(f"cannot read {source}: {'it is a directory' if p.is_dir() else 'no such file'}")
        if p.suffix == ".safetensors":
            return _read_safetensors(p, source, fingerprint, numel)
        if p.suffix != ".pt":
            raise StateError(f"{source}: not a swarmtrain checkpoint (expected ckpt-rNNNNNN.safetensors, or .pt of the "
                             f"first format)")
        # memory-mapped: the file is not read into memory first (the caller copies what it keeps)
        return SwarmState._load(str(p), source=source, fingerprint=fingerprint, numel=numel, mmap=True), {}

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for old in self.list()[: -self.keep_last]:
            old.unlink(missing_ok=True)
