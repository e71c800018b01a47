"""Flat views of a model's parameters, and the fingerprint that says two models are compatible.

The all-reduce and the outer optimizer work on one contiguous fp32 vector [P] (P = total
number of parameter elements), in the order of `model.named_parameters()`.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

import torch


def parameter_schema(named_params: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, tuple[int, ...], str]]:
    """[(name, shape, dtype)] for every parameter, in order."""
    return [(name, tuple(p.shape), str(p.dtype).removeprefix("torch.")) for name, p in named_params]


def schema_fingerprint(schema: list[tuple[str, tuple[int, ...], str]]) -> str:
    """A short hash of the schema. Peers only ever meet peers with the same fingerprint."""
    text = ";".join(f"{n}:{'x'.join(map(str, s))}:{d}" for n, s, d in schema)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def schema_numel(schema: list[tuple[str, tuple[int, ...], str]]) -> int:
    """The number of parameters the schema describes."""
    return sum(int(torch.Size(s).numel()) for _, s, _ in schema)


def describe_schema(schema: list[tuple[str, tuple[int, ...], str]]) -> str:
    """A one-line human summary, e.g. '14 tensors, 431,360 parameters'."""
    return f"{len(schema)} tensors, {schema_numel(schema):,} parameters"


def flatten_params(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Concatenate parameters into one detached fp32 vector [P] on their device."""
    return torch.cat([p.detach().reshape(-1).to(torch.float32) for p in params])


@torch.no_grad()
def write_flat_(params: Iterable[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy a flat vector [P] back into the parameters, in place (casting to each dtype)."""
    params = list(params)
    total = sum(p.numel() for p in params)
    if total != flat.numel():  # check first: never leave the model half-written
        raise ValueError(f"flat vector has {flat.numel()} elements, parameters have {total}")
    offset = 0
    for p in params:
        n = p.numel()
        p.copy_(flat[offset : offset + n].view_as(p))
        offset += n


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (on CPU): proves bit-identical state across peers.

    Hashed through the buffer protocol: no copy of a contiguous CPU tensor (`.tobytes()`
    made one, 4 B/param for θ_sync, every round). The same bytes, so the same digest."""
    return hashlib.sha256(t.detach().to("cpu").contiguous().reshape(-1).numpy()).hexdigest()
