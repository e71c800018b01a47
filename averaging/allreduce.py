"""The weighted group all-reduce, over a torch.distributed gloo group built for one round.

Like torchft, swarmtrain builds a fresh gloo process group per round, from the store of
the round's leader: gloo's ring all-reduce runs near line rate with little CPU (see
docs/benchmarks.md), and the group is formed by decentralized matchmaking, not a fixed
coordinator.

What is sent, for a group of n peers, peer i with weight w_i (samples since last sync):

    buf_i = [ w_i·Δ_i (P values) | w_i·e_i (n values) | e_i (n values) ]

where e_i is the one-hot vector of rank i. After a SUM all-reduce:
    sum[:P]      = Σ w_i·Δ_i          → mean Δ̄ = sum[:P] / Σ w_i
    sum[P:P+n]   = (w_0, ..., w_{n-1}) → every member's weight, for the record
    sum[P+n:]    = (1, ..., 1)         → proof that every member's contribution is in

The result is honest: `complete` only if the transfer finished, every member's
one-hot count is exactly 1, and the mean is finite. Anything else is `failed`, and the
caller's tensors are never touched (the all-reduce works on a private copy).
"""
from __future__ import annotations

import datetime
import logging
import math
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed import PrefixStore

from .matchmaking import Group

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundResult:
    """What happened in one all-reduce. `mean_delta` is set only when status is 'complete'."""

    round: int
    status: Literal["complete", "failed"]
    members: tuple[str, ...]
    weights: tuple[float, ...]  # per member, in rank order (empty if failed before the transfer)
    duration_s: float
    bytes_sent: int  # estimate for the ring algorithm: 2·(n−1)/n·S
    error: str | None = None
    mean_delta: torch.Tensor | None = None

    @property
    def ok(self) -> bool:
        return self.status == "complete"


def ring_bytes(nbytes: int, n: int) -> int:
    """Bytes each peer sends in a ring all-reduce of `nbytes` over n peers."""
    return 0 if n <= 1 else int(2 * (n - 1) / n * nbytes)


def make_gloo_group(group: Group, *, host: str, timeout_s: float) -> dist.ProcessGroupGloo:
    """Create the round's gloo process group. Raises RuntimeError on rendezvous failure/timeout."""
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    # gloo binds to and advertises this address; it must be reachable by the other members.
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(PrefixStore(group.prefix + "pg/", group.store), group.rank, group.size, opts)


def weighted_allreduce(
    group: Group, delta: torch.Tensor, weight: float, *, host: str, timeout_s: float
) -> RoundResult:
    """Average `delta` [P] over the group, weighted by each member's `weight`.

    Failure behaviour: never raises for network faults. A member that dies or stalls makes
    gloo raise within `timeout_s` (sooner when its sockets close); the result is then
    `failed` and `delta` is untouched. Blocks for at most about 2·timeout_s (rendezvous +
    transfer).
    """
    if not (weight > 0 and math.isfinite(weight)):
        raise ValueError(f"weight must be positive and finite, got {weight}")
    t0 = time.monotonic()
    n, r = group.size, group.rank
    P = delta.numel()
    # Private buffer on CPU: gloo reduces in place and corrupts the buffer if a peer dies.
    buf = torch.zeros(P + 2 * n, dtype=torch.float32)
    buf[:P].copy_(delta.reshape(-1)).mul_(weight)
    buf[P + r] = weight
    buf[P + n + r] = 1.0
    sent = ring_bytes(buf.numel() * 4, n)

    def failed(msg: str, weights: tuple[float, ...] = ()) -> RoundResult:
        log.warning("round %d failed: %s", group.round, msg)
        return RoundResult(group.round, "failed", group.members, weights, time.monotonic() - t0, sent, msg)

    try:
        pg = make_gloo_group(group, host=host, timeout_s=timeout_s)
        pg.allreduce([buf]).wait()
    except RuntimeError as e:  # gloo reports peer death, timeouts and rendezvous failures as RuntimeError
        return failed(f"all-reduce over {n} peers failed: {_first_line(e)}")
    finally:
        pg = None  # release sockets now, not at interpreter exit

    weights = tuple(float(w) for w in buf[P : P + n])
    counts = buf[P + n :]
    if not torch.equal(counts, torch.ones(n)):
        return failed(f"incomplete: contributions received per member = {counts.tolist()}", weights)
    total = sum(weights)
    if not (total > 0 and math.isfinite(total)):
        return failed(f"invalid total weight {total}", weights)
    mean = buf[:P].div_(total)
    if not torch.isfinite(mean).all():
        return failed("non-finite values in the averaged result", weights)
    return RoundResult(
        group.round, "complete", group.members, weights, time.monotonic() - t0, sent, None, mean.to(delta.device)
    )


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else type(e).__name__
