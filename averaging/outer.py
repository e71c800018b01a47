"""DiLoCo's outer optimizer: Nesterov SGD applied to the averaged pseudo-gradient.

Every peer keeps θ_sync, the parameters agreed at the last complete round. After H
local steps it holds θ_local. The pseudo-gradient is Δ = θ_sync − θ_local (pointing
"uphill", like a gradient). The group averages Δ, and every member applies the same
outer step to its identical θ_sync, so all members end with identical parameters.

Outer SGD with momentum μ and Nesterov, PyTorch's formulation (torch.optim.SGD):
    b  ← μ·b + Δ̄
    u  ← Δ̄ + μ·b       (Nesterov)   or   u ← b   (classic momentum)
    θ  ← θ_sync − lr·u
With lr = 1 and μ = 0 this is θ ← θ_sync − Δ̄ = weighted mean of θ_local: plain averaging.
"""
from __future__ import annotations


import torch

from .config import OuterConfig


def outer_step(
    theta_sync: torch.Tensor, delta: torch.Tensor, momentum_buf: torch.Tensor | None, cfg: OuterConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pure outer step. Returns (new θ_sync, new momentum buffer); inputs are not modified.

    theta_sync, delta: flat fp32 tensors [P]. momentum_buf: [P] or None (first step / μ = 0).
    """
    if theta_sync.shape != delta.shape:
        raise ValueError(f"shape mismatch: theta {tuple(theta_sync.shape)} vs delta {tuple(delta.shape)}")
    if cfg.momentum == 0:
        return theta_sync - cfg.lr * delta, None
    # torch.optim.SGD initialises the buffer to the first gradient (no dampening): b₁ = Δ̄₁.
    buf = delta.clone() if momentum_buf is None else momentum_buf * cfg.momentum + delta
    update = delta + cfg.momentum * buf if cfg.nesterov else buf
    return theta_sync - cfg.lr * update, buf


class OuterOptimizer:
    """Holds θ_sync and the momentum buffer; applies `outer_step` in place on success.

    State lives on `device` in fp32 whatever the model's dtype: the outer step accumulates
    small differences, and bf16 would round them away.
    """

    def __init__(self, theta_sync: torch.Tensor, cfg: OuterConfig) -> None:
        self.cfg = cfg
        self.theta_sync = theta_sync.detach().to(torch.float32).clone()
        self.momentum_buf: torch.Tensor | None = None

    def pseudo_gradient(self, theta_local: torch.Tensor) -> torch.Tensor:
        """Δ = θ_sync − θ_local, fp32 [P]."""
        return self.theta_sync - theta_local.to(torch.float32)

    def apply(self, mean_delta: torch.Tensor) -> torch.Tensor:
        """Apply the outer step with the group-averaged Δ̄; returns the new θ_sync."""
        self.theta_sync, self.momentum_buf = outer_step(self.theta_sync, mean_delta, self.momentum_buf, self.cfg)
        return self.theta_sync

    def state_dict(self) -> dict:
        return {"theta_sync": self.theta_sync, "momentum_buf": self.momentum_buf}

    def load_state_dict(self, state: dict) -> None:
        theta = state["theta_sync"]
        if theta.shape != self.theta_sync.shape:
            raise ValueError(f"outer state has {theta.numel()} parameters, model has {self.theta_sync.numel()}")
        self.theta_sync = theta.detach().to(self.theta_sync.device, torch.float32).clone()
        buf = state.get("momentum_buf")
        if buf is not None and buf.shape != theta.shape:
            raise ValueError(f"outer momentum has shape {tuple(buf.shape)}, parameters have {tuple(theta.shape)}")
        self.momentum_buf = None if buf is None else buf.detach().to(self.theta_sync.device, torch.float32).clone()
