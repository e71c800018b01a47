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

Mode = Literal["scale", "sign_flip", "nan", "inf", "wrong_shape", "noise", "crash"]
MODES = ("scale", "sign_flip", "nan", "inf", "wrong_shape", "noise", "crash")


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
        return x  # wrong_shape: the lie is in the declared size; crash: in transfer_started
