"""Device selection and mixed precision.

Peers run on whatever hardware a volunteer has: a CUDA GPU, an Apple MPS GPU,
or just a CPU. Everything device-dependent goes through the two helpers here,
so the rest of the code never has to branch on hardware.
"""

from __future__ import annotations

import contextlib
import re

import torch

# "cuda" or "cuda:<index>"; the index is validated against the visible devices.
_CUDA_RE = re.compile(r"^cuda(?::(\d+))?$")


def _mps_available() -> bool:
    # torch.backends.mps exists on every platform in torch 2.x, but guard anyway:
    # a missing backend simply means "not available", not an error.
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def detect_device(preference: str = "auto") -> torch.device:
    """Resolve a device preference string to a usable torch.device.

    "auto" picks CUDA, then MPS, then CPU. An explicit "cpu", "cuda", "cuda:N" or
    "mps" is honoured, but raises ValueError when that device is not available:
    silently falling back to CPU would make a volunteer's run 50x slower without
    them noticing.
    """
    if not isinstance(preference, str):
        raise ValueError(f"device must be a string, got {preference!r}")
    pref = preference.strip().lower()

    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")

    if pref == "cpu":
        return torch.device("cpu")

    if pref == "mps":
        if not _mps_available():
            raise ValueError("device 'mps' requested but MPS is not available")
        return torch.device("mps")

    m = _CUDA_RE.match(pref)
    if m is not None:
        if not torch.cuda.is_available():
            raise ValueError(f"device {preference!r} requested but CUDA is not available")
        if m.group(1) is not None:
            index = int(m.group(1))
            count = torch.cuda.device_count()
            if index >= count:
                raise ValueError(
                    f"device {preference!r} requested but only {count} CUDA device(s) are visible"
                )
            return torch.device("cuda", index)
        return torch.device("cuda")

    raise ValueError(f"device {preference!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")


def autocast(device: torch.device | str, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Mixed-precision context for forward passes on `device`.

    CUDA: bf16 autocast. bf16 has fp32's exponent range, so unlike fp16 it needs
    no GradScaler, and loss/averaging code can stay precision-agnostic.
    CPU and MPS: a no-op context, i.e. plain fp32 (CPU bf16 autocast is slow on
    most volunteer hardware, and MPS bf16 support varies by macOS version).
    """
    device = torch.device(device)
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
