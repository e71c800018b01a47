"""Wire codecs for the all-reduce: how a fp32 vector is turned into bytes and back.

    fp32   4 bytes/value, exact
    fp16   2 bytes/value, ~1e-3 relative error, range ±65504 (values beyond saturate)
    bf16   2 bytes/value, ~4e-3 relative error, fp32's range
    int8   1 byte/value + one fp32 scale per block of 1024 values (0.4% overhead):
           blockwise absmax quantization, error ≤ absmax(block)/254 per value
    sparse 0.125 bits/value: top-32 of every 4096 values, 2 bits each, 12-bit positions
           (sparse.py); aggregated by all-gather, not reduce-scatter (allgather.py)

Pure functions on CPU tensors; no network. `ErrorFeedback` carries each round's
quantization error into the next round, so that over rounds nothing is lost: the running
sum of what was sent equals the running sum of what should have been sent, up to one
round's error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .config import CODECS

from .errors import CodecError  # noqa: F401  (re-exported)

CodecName = Literal["fp32", "fp16", "bf16", "int8", "sparse"]
BLOCK = 1024


@dataclass(frozen=True)
class Codec:
    name: CodecName

    def wire_bytes(self, n: int) -> int:
        """Encoded size of n values."""
        if self.name == "fp32":
            return 4 * n
        if self.name in ("fp16", "bf16"):
            return 2 * n
        if self.name == "sparse":
            from . import sparse
            return sparse.wire_bytes(n)
        return 4 * math.ceil(n / BLOCK) + n  # int8: scales, then values

    @property
    def sparse(self) -> bool:
        """Contributions do not add up part-wise: aggregated by all-gather (allgather.py)."""
        return self.name == "sparse"

    @property
    def lossless(self) -> bool:
        return self.name == "fp32"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 [n] → uint8 [wire_bytes(n)]."""
        return self.encode_decoded(x)[0]

    def encode_decoded(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(bytes, what the receiver will decode from them), computed in one pass."""
        x = x.detach().reshape(-1).to("cpu", torch.float32)
        if self.name == "fp32":
            return x.contiguous().view(torch.uint8).clone(), x
        if self.name == "fp16":
            # Saturate instead of overflowing to inf (a peer's extreme value must not become NaN/inf).
            h = x.clamp(-65504.0, 65504.0).to(torch.float16)
            return h.view(torch.uint8), h.to(torch.float32)
        if self.name == "bf16":
            b = x.to(torch.bfloat16)
            return b.view(torch.uint8), b.to(torch.float32)
        if self.name == "sparse":
            from . import sparse
            return sparse.encode_decoded(x)
        n = x.numel()
        nb = math.ceil(n / BLOCK)
        if n == nb * BLOCK:
            blocks = x.view(nb, BLOCK)  # [nb, BLOCK], no copy
        else:
            padded = torch.zeros(nb * BLOCK, dtype=torch.float32)
            padded[:n] = x
            blocks = padded.view(nb, BLOCK)
        scale = blocks.abs().amax(dim=1).div_(127.0)  # [nb]
        inv = torch.where(scale > 0, scale.reciprocal(), torch.zeros_like(scale))
        qf = blocks.mul(inv[:, None]).round_().clamp_(-127, 127)  # [nb, BLOCK] float, integral values
        data = torch.cat([scale.view(torch.uint8), qf.to(torch.int8).view(-1)[:n].view(torch.uint8)])
        return data, qf.mul_(scale[:, None]).view(-1)[:n]

    def decode(self, data: torch.Tensor, n: int) -> torch.Tensor:
        """uint8 [wire_bytes(n)] → fp32 [n]. Raises CodecError on malformed input."""
        if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() != self.wire_bytes(n):
            raise CodecError(f"{self.name}: expected {self.wire_bytes(n)} bytes for {n} values, got {data.numel()}")
        if self.name == "sparse":
            from . import sparse
            return sparse.decode(data, n)
        if n == 0:
            return torch.empty(0, dtype=torch.float32)
        if data.storage_offset() % 4 or not data.is_contiguous():
            data = data.clone()  # a byte slice of a larger buffer may be misaligned for float views
        if self.name == "fp32":
            return data.view(torch.float32).clone()
        if self.name == "fp16":
            return data.view(torch.float16).to(torch.float32)
        if self.name == "bf16":
            return data.view(torch.bfloat16).to(torch.float32)
        nb = math.ceil(n / BLOCK)
        scale = data[: 4 * nb].view(torch.float32)
        if not torch.isfinite(scale).all() or (scale < 0).any():
            raise CodecError("int8: invalid block scales")
        q = torch.zeros(nb * BLOCK, dtype=torch.float32)
        q[:n] = data[4 * nb :].view(torch.int8).to(torch.float32)
        return (q.view(nb, BLOCK) * scale[:, None]).view(-1)[:n]


def get_codec(name: str) -> Codec:
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r} (choose {', '.join(CODECS[:-1])} or {CODECS[-1]})")
    return Codec(name)  # type: ignore[arg-type]


class ErrorFeedback:
    """Keeps the quantization residual of a vector and adds it back before the next encode.

    `compress(x)` returns (bytes, what the receiver will decode). The residual
    x + β·e − decode(encode(x + β·e)) is stored for the next call on the same slice.
    `decay` is β: 1 keeps every unsent value until it is sent; SparseLoCo (2025) decays the
    residual (β ≈ 0.95) so that it acts as a local outer momentum, with plain averaging as
    the outer step, rather than piling up stale progress behind a sparse codec.
    """

    def __init__(self, codec: Codec, numel: int, decay: float = 1.0) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"error-feedback decay must be in [0, 1], got {decay}")
        self.codec = codec
        self.decay = decay
        self.residual = torch.zeros(numel, dtype=torch.float32)

    def compress(self, x: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Encode x + residual. Returns (bytes, decoded value, new residual slice).

        The residual is not updated here: call `commit(start, new)` once the round that
        sent these bytes has completed. A failed round must not consume the error.
        """
        n = x.numel()
        target = torch.add(x, self.residual[start : start + n], alpha=self.decay)  # x + β·e (exact for β = 1)
        data, sent = self.codec.encode_decoded(target)
        return data, sent, None if self.codec.lossless else target.sub_(sent)

    def commit(self, start: int, new_residual: torch.Tensor | None) -> None:
        if new_residual is not None:
            self.residual[start : start + new_residual.numel()] = new_residual

    def reset(self) -> None:
        self.residual.zero_()


def partition(numel: int, parts: int) -> list[tuple[int, int]]:
    """Split [0, numel) into `parts` contiguous ranges whose sizes differ by at most 1."""
    if parts < 1:
        raise ValueError("parts must be >= 1")
    base, extra = divmod(numel, parts)
    out, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out
