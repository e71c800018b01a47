"""Fault injection for tests: what a broken or hostile peer puts on the wire.

A `Tamper` is handed to `Averager(..., tamper=...)` (or `Peer(..., tamper=...)`) and changes
this peer's *outgoing* contribution after all of its own checks, exactly where a malicious
client would: the receivers' validation and robust aggregation are what is being tested.
It is a seam for the hostile-peer harness (tests/hostile.py), never set by the CLI.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Literal

import torch

Mode = Literal["scale", "sign_flip", "nan", "inf", "wrong_shape", "noise", "crash",
               "sparse_dup_index", "sparse_out_of_range", "sparse_nan_level"]
# The sparse_* modes forge the bytes of a sparse message (sparse.py) after encoding: what a
# hostile sender can put on the wire that no honest encoder produces.
WIRE_MODES = ("sparse_dup_index", "sparse_out_of_range", "sparse_nan_level")
MODES = ("scale", "sign_flip", "nan", "inf", "wrong_shape", "noise", "crash", *WIRE_MODES)


@dataclass(frozen=True, kw_only=True)
class Tamper:
    mode: Mode
    factor: float = 100.0  # scale: multiply by this; noise: standard deviation relative to the update's RMS

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown tamper mode {self.mode!r}")

    def transfer_started(self) -> None:
        """Called once every member has declared its weight and size, before any part of the
        vector is sent. "crash" SIGKILLs this process here: a member that dies in the middle
        of a round's transfer (the others are blocked on its parts)."""
        if self.mode == "crash":
            os.kill(os.getpid(), signal.SIGKILL)

    def declared_numel(self, numel: int) -> int:
        """The size this peer claims for its update (wrong_shape lies about it)."""
        return numel + 1 if self.mode == "wrong_shape" else numel

    def apply(self, x: torch.Tensor, round_: int) -> torch.Tensor:
        """x: [P] float32, this peer's weighted update. Returns what it sends instead (same length)."""
        if self.mode == "scale":
            return x * self.factor
        if self.mode == "sign_flip":
            return -x
        if self.mode in ("nan", "inf"):
            y = x.clone()
            y[:: max(1, y.numel() // 7)] = float("nan") if self.mode == "nan" else float("inf")
            return y
        if self.mode == "noise":
            g = torch.Generator().manual_seed(round_)
            rms = x.pow(2).mean().sqrt().clamp_min(1e-12)
            return torch.randn(x.shape, generator=g) * rms * self.factor
        return x  # wrong_shape: the lie is in the declared size; crash: in transfer_started; sparse_*: in wire

    def wire(self, data: torch.Tensor, numel: int) -> torch.Tensor:
        """data: this peer's encoded sparse message for `numel` values. Returns the bytes it
        sends instead (same length): a duplicated position in the first chunk, a position
        beyond the end of the last chunk, or a NaN level."""
        if self.mode not in WIRE_MODES:
            return data
        from . import sparse
        d = data.clone()
        nc = sparse.chunks(numel)
        idx_at = 8 * nc  # the first chunk's packed positions: (a, b) in bytes 0..2
        if self.mode == "sparse_nan_level":
            d[0:4] = torch.tensor([float("nan")], dtype=torch.float32).view(torch.uint8)
        elif self.mode == "sparse_dup_index":  # b := a
            a_lo, a_hi = int(d[idx_at]), int(d[idx_at + 1]) & 0xF
            d[idx_at + 1] = a_hi | ((a_lo & 0xF) << 4)
            d[idx_at + 2] = (a_hi << 4) | (a_lo >> 4)
        else:  # the last position of the last chunk := 4095, past its end (numel must not end a chunk)
            last = idx_at + (nc - 1) * sparse.IDX_BYTES + sparse.IDX_BYTES - 3
            d[last + 1] = (int(d[last + 1]) & 0xF) | 0xF0
            d[last + 2] = 0xFF
        return d
