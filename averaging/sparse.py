"""The sparse low-bit codec: chunked top-k, 2-bit values, 12-bit packed indices.

After SparseLoCo (2025) and DeMo: of every CHUNK = 4096 consecutive values, only the K = 32
largest in magnitude are sent (density 1/128), each as 2 bits (sign, and which of the
chunk's two magnitude levels it is closer to) plus its 12-bit position in the chunk.
Everything else, and each kept value's quantization error, stays in the sender's error
feedback (codecs.ErrorFeedback) and is sent in later rounds, so over rounds nothing is lost.

Wire format for n values, nc = ceil(n / CHUNK) chunks, in this order:

    levels   nc × 2 fp32     (lo, hi): the mean magnitude of the kept values below / at or
                             above the chunk's mean kept magnitude
    indices  nc × K × 12 bit positions in the chunk, strictly increasing, two per 3 bytes
    codes    nc × K × 2 bit  bit 1: negative; bit 0: hi level. Four per byte.

= 64 bytes per 4096 values (0.125 bits per value): 256× smaller than fp32. A sparse vector
does not add up in a reduce-scatter (the sum of two top-k sets is not top-k), so
contributions are all-gathered and every member decodes and aggregates all of them
(allgather.py); the value is the bytes of a round: (n−1)·64/4096 per value and member,
against 2·(n−1)/n·4 for a dense fp32 ring, 128× fewer at n = 4.

`decode` checks everything a hostile sender controls: the byte count, finite non-negative
levels, indices in range and strictly increasing (no duplicates). Pure functions, CPU only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .codecs import CodecError

CHUNK = 4096  # values per chunk; positions fit 12 bits
K = 32  # values kept per chunk (even, and a multiple of 4: indices pack in pairs, codes in fours)
IDX_BYTES = K * 12 // 8  # per chunk
CODE_BYTES = K // 4
CHUNK_BYTES = 8 + IDX_BYTES + CODE_BYTES


class SparseError(CodecError):
    """Bytes that are not a valid sparse message."""


@dataclass(frozen=True)
class Parsed:
    """One validated message: per chunk its levels [nc, 2], positions [nc, K] (int64,
    strictly increasing) and codes [nc, K] (uint8, 0..3)."""

    levels: torch.Tensor
    idx: torch.Tensor
    codes: torch.Tensor

    def values(self) -> torch.Tensor:
        """The kept values [nc, K], fp32: ±lo or ±hi."""
        mag = torch.where((self.codes & 1).bool(), self.levels[:, 1:2], self.levels[:, 0:1])
        return torch.where((self.codes & 2).bool(), -mag, mag)

    def dense(self, n: int, c0: int = 0, c1: int | None = None) -> torch.Tensor:
        """Chunks [c0, c1) as a dense fp32 vector (the last one cut at n)."""
        c1 = self.idx.shape[0] if c1 is None else c1
        return self._scatter(self.values()[c0:c1], n, c0, c1)

    def support(self, n: int, c0: int = 0, c1: int | None = None) -> torch.Tensor:
        """Chunks [c0, c1) as a dense fp32 vector of 1 where a value was sent, 0 elsewhere."""
        c1 = self.idx.shape[0] if c1 is None else c1
        return self._scatter(torch.ones(c1 - c0, K), n, c0, c1)

    def _scatter(self, vals: torch.Tensor, n: int, c0: int, c1: int) -> torch.Tensor:
        """vals [c1 − c0, K] at this message's positions in chunks [c0, c1), zeros elsewhere."""
        out = torch.zeros((c1 - c0) * CHUNK, dtype=torch.float32)
        flat = (self.idx[c0:c1] + torch.arange(c1 - c0).mul_(CHUNK)[:, None]).reshape(-1)
        out.index_put_((flat,), vals.reshape(-1))  # positions are unique: no accumulation
        return out[: min(n, c1 * CHUNK) - c0 * CHUNK]


def chunks(n: int) -> int:
    return math.ceil(n / CHUNK)


def wire_bytes(n: int) -> int:
    return CHUNK_BYTES * chunks(n)


def _limits(n: int) -> torch.Tensor:
    """Per chunk, the bound positions must stay under: the chunk's length, or K when the last
    chunk is shorter than K (its top-K then includes padding positions, which decode to
    nothing)."""
    nc = chunks(n)
    lengths = torch.full((nc,), CHUNK, dtype=torch.int64)
    if nc:
        lengths[-1] = n - (nc - 1) * CHUNK
    return lengths.clamp_min(K)


def encode(x: torch.Tensor) -> tuple[torch.Tensor, Parsed]:
    """fp32 [n] → (uint8 [wire_bytes(n)], the message as the receiver will parse it)."""
    x = x.detach().reshape(-1).to("cpu", torch.float32)
    n = x.numel()
    nc = chunks(n)
    X = torch.zeros(nc * CHUNK, dtype=torch.float32)
    X[:n] = x
    X = X.view(nc, CHUNK)  # [nc, CHUNK]
    mag = X.abs()
    if n % CHUNK:  # padding sorts last: chosen only when the last chunk has fewer than K values
        mag[-1, n - (nc - 1) * CHUNK :] = -1.0
    _, idx = mag.topk(K, dim=1, sorted=False)  # [nc, K]
    idx, _ = idx.sort(dim=1)
    vals = X.gather(1, idx)  # [nc, K] signed
    m = vals.abs()
    hi_mask = m >= m.mean(1, keepdim=True)  # never empty: the largest is at least the mean
    hi = (m * hi_mask).sum(1) / hi_mask.sum(1)
    lo_n = (~hi_mask).sum(1)
    lo = torch.where(lo_n > 0, (m * ~hi_mask).sum(1) / lo_n.clamp_min(1), hi)
    levels = torch.stack([lo, hi], 1)  # [nc, 2]
    codes = (vals < 0).to(torch.uint8).mul_(2).add_(hi_mask.to(torch.uint8))  # [nc, K]
    parsed = Parsed(levels, idx, codes)
    return torch.cat([levels.reshape(-1).view(torch.uint8), _pack_idx(idx), _pack_codes(codes)]), parsed


def encode_decoded(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bytes, what the receiver will decode from them): the Codec interface."""
    data, parsed = encode(x)
    return data, parsed.dense(x.numel())


def parse(data: torch.Tensor, n: int) -> Parsed:
    """Validate a message for n values. Raises SparseError naming the first problem."""
    want = wire_bytes(n)
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() != want:
        raise SparseError(f"sparse: expected {want} bytes for {n} values, got {data.numel()}")
    nc = chunks(n)
    data = data.clone() if data.storage_offset() % 4 or not data.is_contiguous() else data
    levels = data[: 8 * nc].view(torch.float32).view(nc, 2)
    if not torch.isfinite(levels).all() or (levels < 0).any():
        raise SparseError("sparse: invalid levels (non-finite or negative)")
    idx = _unpack_idx(data[8 * nc : (8 + IDX_BYTES) * nc], nc)
    if nc and (idx >= _limits(n)[:, None]).any():
        raise SparseError("sparse: a position beyond its chunk")
    if nc and (idx[:, 1:] <= idx[:, :-1]).any():
        raise SparseError("sparse: positions not strictly increasing (duplicates or out of order)")
    codes = _unpack_codes(data[(8 + IDX_BYTES) * nc :], nc)
    return Parsed(levels, idx, codes)


def decode(data: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [wire_bytes(n)] → fp32 [n]. Raises SparseError on malformed input."""
    return parse(data, n).dense(n)


def _pack_idx(idx: torch.Tensor) -> torch.Tensor:
    """[nc, K] int64 < 4096 → [nc·IDX_BYTES] uint8: each pair (a, b) as a_lo8, a_hi4|b_lo4<<4, b_hi8."""
    a, b = idx[:, 0::2], idx[:, 1::2]
    packed = torch.stack([a & 0xFF, (a >> 8) | ((b & 0xF) << 4), b >> 4], dim=2)  # [nc, K/2, 3]
    return packed.to(torch.uint8).reshape(-1)


def _unpack_idx(data: torch.Tensor, nc: int) -> torch.Tensor:
    p = data.view(nc, K // 2, 3).to(torch.int64)
    a = p[..., 0] | ((p[..., 1] & 0xF) << 8)
    b = (p[..., 1] >> 4) | (p[..., 2] << 4)
    return torch.stack([a, b], dim=2).reshape(nc, K)


def _pack_codes(codes: torch.Tensor) -> torch.Tensor:
    c = codes.view(-1, 4).to(torch.int64)
    return (c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)).to(torch.uint8)


def _unpack_codes(data: torch.Tensor, nc: int) -> torch.Tensor:
    d = data.to(torch.int64)
    return torch.stack([(d >> s) & 3 for s in (0, 2, 4, 6)], dim=1).reshape(nc, K).to(torch.uint8)
