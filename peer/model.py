"""A small GPT-style byte-level language model (nanoGPT's architecture, condensed).

Every peer builds the model from the same (config, seed) and must end up with
bit-identical initial weights: decentralized averaging assumes all replicas
start from the same point. `build_model` guarantees that.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig




class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        # q, k, v projections for all heads in one matmul.
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each [B, T, C]
        # [B, T, C] -> [B, nh, T, hs]
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        # Fused (flash / memory-efficient where available) causal attention.
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # [B, nh, T, hs]
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # [B, T, C]


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),  # token embeddings
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),  # position embeddings
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
                ln_f=nn.LayerNorm(cfg.n_embd),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # Weight tying: the input embedding and the output projection share one
        # [vocab_size, n_embd] matrix (fewer parameters, better small-model quality).
        self.transformer.wte.weight = self.lm_head.weight

        # nanoGPT init: N(0, 0.02) everywhere, zero biases, and the residual
        # output projections scaled by 1/sqrt(2 * n_layer) so the residual
        # stream's variance does not grow with depth.
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        # nn.LayerNorm already initialises to weight=1, bias=0 deterministically.

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: LongTensor [B, T] of token ids, T <= block_size.
        targets: LongTensor [B, T] or None.
        Returns (logits [B, T, vocab_size], mean cross-entropy loss or None).
        """
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(
                f"sequence length {T} exceeds model.block_size {self.cfg.block_size}"
            )
        pos = torch.arange(T, dtype=torch.long, device=idx.device)  # [T]
        tok_emb = self.transformer.wte(idx)  # [B, T, C]
        pos_emb = self.transformer.wpe(pos)  # [T, C], broadcast over B
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # [B, T, vocab_size]

        loss = None
        if targets is not None:
            # Flatten to [B*T, V] vs [B*T]. Computed in fp32 even under bf16
            # autocast so the loss (which peers compare and average) is accurate.
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)), targets.reshape(-1)
            )
        return logits, loss


def build_model(cfg: ModelConfig, seed: int = 0) -> nn.Module:
    """Build a model whose initial weights depend only on (cfg, seed).

    The model is created on the CPU under a forked RNG seeded with `seed`, so
    every peer with the same config and seed gets bit-identical weights (CPU
    init is deterministic across machines) and the caller's global RNG state
    is left untouched. Move it to the training device afterwards.

    cfg.arch "gpt" is the embedded GPT below; "llama" and "hf" are Hugging Face
    `transformers` models (peer/hf.py), called the same way: model(x, y) -> (logits, loss).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if cfg.arch != "gpt":
        from .hf import build_hf_model
        model = build_hf_model(cfg, seed)
        if cfg.block_size > model.block_size:
            raise ValueError(f"model.block_size {cfg.block_size} exceeds the model's {model.block_size} positions")
        return model
    # devices=[]: only fork the CPU generator (init happens on the CPU), and seed
    # only that generator too, so CUDA RNG state is neither touched nor initialised.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        model = GPT(cfg)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights are counted once)."""
    # nn.Module.parameters() already de-duplicates shared tensors.
    return sum(p.numel() for p in model.parameters())
