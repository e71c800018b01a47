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

Compressed codecs (fp16, bf16, int8) cannot be summed on the wire, so they take a
two-phase path (the same byte count as a ring: 2·(n−1)/n of the encoded size):
    1. the 2n metadata values above, all-reduced in fp32 (also proves everyone is there);
    2. reduce-scatter: the vector is split into n parts; part j of every member's encoded
       w·Δ goes to member j (gloo all-to-all), which decodes and sums them in fp32;
    3. all-gather: each member encodes its part of the mean and every member receives
       all parts. All members decode the same bytes, so they agree exactly.
Both encodings use error feedback (see codecs.ErrorFeedback), committed only if the
round completes.
"""
from __future__ import annotations

import datetime
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed import PrefixStore

from .codecs import Codec, CodecError, ErrorFeedback, get_codec, partition
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


class _Reaper:
    """Releases finished per-round gloo groups off the critical path: a group's teardown
    (closing n−1 connections) takes tens of milliseconds. One daemon thread, owned by this
    module, only ever drops references; nothing else runs in it."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def retire(self, pg: object) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="swarmtrain-pg-reaper", daemon=True)
                self._thread.start()
        self._queue.put(pg)

    def _run(self) -> None:
        while True:
            pg = self._queue.get()
            del pg  # the C++ destructor closes the sockets here


_REAPER = _Reaper()


def all_finite(t: torch.Tensor) -> bool:
    """True if t has no NaN/Inf. One reduction instead of a full boolean pass: a NaN or Inf
    anywhere makes the sum non-finite; only if the sum overflows do we check element-wise."""
    s = t.sum()
    return bool(torch.isfinite(s)) or bool(torch.isfinite(t).all())


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


@dataclass
class Compression:
    """A peer's codec and its error-feedback state, kept across rounds."""

    codec: Codec
    contrib: ErrorFeedback | None = None  # residual of this peer's own w·Δ
    mean: ErrorFeedback | None = None  # residual of the mean parts this peer encodes

    @classmethod
    def named(cls, name: str) -> "Compression":
        return cls(get_codec(name))

    def ensure(self, numel: int) -> None:
        if self.contrib is None or self.contrib.residual.numel() != numel:
            self.contrib = ErrorFeedback(self.codec, numel)
            self.mean = ErrorFeedback(self.codec, numel)


def weighted_allreduce(
    group: Group, delta: torch.Tensor, weight: float, *, host: str, timeout_s: float,
    codec: str | Compression = "fp32", pipeline_chunk: int = 0,
) -> RoundResult:
    """Average `delta` [P] over the group, weighted by each member's `weight`.

    Failure behaviour: never raises for network faults. A member that dies or stalls makes
    gloo raise within `timeout_s` (sooner when its sockets close); the result is then
    `failed` and `delta` is untouched. Blocks for at most about 2·timeout_s (rendezvous +
    transfer).
    """
    if not (weight > 0 and math.isfinite(weight)):
        raise ValueError(f"weight must be positive and finite, got {weight}")
    comp = Compression.named(codec) if isinstance(codec, str) else codec
    if not comp.codec.lossless:
        return _compressed_allreduce(group, delta, weight, host=host, timeout_s=timeout_s, comp=comp,
                                     chunk=pipeline_chunk or PIPELINE_CHUNK)
    t0 = time.monotonic()
    n, r = group.size, group.rank
    P = delta.numel()
    # Private buffer on CPU: gloo reduces in place and corrupts the buffer if a peer dies.
    buf = torch.empty(P + 2 * n, dtype=torch.float32)
    torch.mul(delta.reshape(-1).to("cpu", torch.float32), weight, out=buf[:P])
    buf[P:] = 0.0
    buf[P + r] = weight
    buf[P + n + r] = 1.0
    sent = ring_bytes(buf.numel() * 4, n)

    def failed(msg: str, weights: tuple[float, ...] = ()) -> RoundResult:
        log.warning("round %d failed: %s", group.round, msg)
        return RoundResult(group.round, "failed", group.members, weights, time.monotonic() - t0, sent, msg)

    pg = None
    try:
        pg = make_gloo_group(group, host=host, timeout_s=timeout_s)
        pg.allreduce([buf]).wait()
    except RuntimeError as e:  # gloo reports peer death, timeouts and rendezvous failures as RuntimeError
        return failed(f"all-reduce over {n} peers failed: {_first_line(e)}")
    finally:
        if pg is not None:
            _REAPER.retire(pg)

    weights = tuple(float(w) for w in buf[P : P + n])
    counts = buf[P + n :]
    if not torch.equal(counts, torch.ones(n)):
        return failed(f"incomplete: contributions received per member = {counts.tolist()}", weights)
    total = sum(weights)
    if not (total > 0 and math.isfinite(total)):
        return failed(f"invalid total weight {total}", weights)
    mean = buf[:P].div_(total)
    if not all_finite(mean):
        return failed("non-finite values in the averaged result", weights)
    return RoundResult(
        group.round, "complete", group.members, weights, time.monotonic() - t0, sent, None, mean.to(delta.device)
    )


# Compressed rounds are pipelined in chunks of this many values: while gloo sends chunk k,
# this thread encodes chunk k+1, so the codec's CPU time hides behind the transfer.
PIPELINE_CHUNK = 1 << 20


def _compressed_allreduce(
    group: Group, delta: torch.Tensor, weight: float, *, host: str, timeout_s: float, comp: Compression, chunk: int
) -> RoundResult:
    t0 = time.monotonic()
    n, r = group.size, group.rank
    P = delta.numel()
    codec = comp.codec
    comp.ensure(P)
    assert comp.contrib is not None and comp.mean is not None
    meta = torch.zeros(2 * n, dtype=torch.float32)
    meta[r], meta[n + r] = weight, 1.0
    x = delta.detach().reshape(-1).to("cpu", torch.float32) * weight  # private copy [P]
    # Each chunk [c0, c1) is split into n parts; part j of every member's chunk goes to member j.
    chunks = [[(c0 + s, c0 + e) for s, e in partition(min(c0 + chunk, P) - c0, n)] for c0 in range(0, P, chunk)]
    pending: list = []  # error-feedback residuals, committed only if the round completes
    sent = ring_bytes(meta.numel() * 4, n)
    weights: tuple[float, ...] = ()

    def failed(msg: str) -> RoundResult:
        log.warning("round %d failed: %s", group.round, msg)
        return RoundResult(group.round, "failed", group.members, weights, time.monotonic() - t0, sent, msg)

    pg = None
    try:
        pg = make_gloo_group(group, host=host, timeout_s=timeout_s)
        pg.allreduce([meta]).wait()
        weights = tuple(float(w) for w in meta[:n])
        if not torch.equal(meta[n:], torch.ones(n)):
            return failed(f"incomplete: members present = {meta[n:].tolist()}")
        total = sum(weights)
        if not (total > 0 and math.isfinite(total)):
            return failed(f"invalid total weight {total}")
        # Phase 2, reduce-scatter: encode each chunk and issue its all-to-all without waiting.
        scatters = []
        for parts in chunks:
            encoded = []
            for j, (s, e) in enumerate(parts):
                if j == r:  # our own part never crosses the wire: it stays exact (nothing to encode)
                    encoded.append(torch.empty(0, dtype=torch.uint8))
                    continue
                data, _, res = comp.contrib.compress(x[s:e], s)
                encoded.append(data)
                pending.append((comp.contrib, s, res))
            part_bytes = codec.wire_bytes(parts[r][1] - parts[r][0])
            recv_splits = [0 if i == r else part_bytes for i in range(n)]
            received = torch.empty(sum(recv_splits), dtype=torch.uint8)
            splits = [d.numel() for d in encoded]
            sent += sum(splits)
            work = pg.alltoall_base(received, torch.cat(encoded), recv_splits, splits)
            scatters.append((parts, received, part_bytes, work))
        # Phase 3, all-gather: as each chunk's parts arrive, sum ours and send the encoded mean part.
        gathers = []
        for parts, received, part_bytes, work in scatters:
            work.wait()
            my_s, my_e = parts[r]
            # Our own contribution, exact, plus any residual left on this range from rounds in
            # which another member owned it (that residual is now spent).
            acc = x[my_s:my_e] + comp.contrib.residual[my_s:my_e]
            pending.append((comp.contrib, my_s, torch.zeros(my_e - my_s)))
            for k in range(n - 1):
                acc += codec.decode(received[k * part_bytes : (k + 1) * part_bytes], my_e - my_s)
            mean_data, _, res = comp.mean.compress(acc.div_(total), my_s)
            pending.append((comp.mean, my_s, res))
            max_bytes = codec.wire_bytes(max(e - s for s, e in parts))
            padded = torch.zeros(max_bytes, dtype=torch.uint8)
            padded[: mean_data.numel()] = mean_data
            gathered = [torch.empty(max_bytes, dtype=torch.uint8) for _ in range(n)]
            sent += (n - 1) * max_bytes
            gathers.append((parts, gathered, pg.allgather([gathered], [padded])))
        mean = torch.empty(P, dtype=torch.float32)
        for parts, gathered, work in gathers:
            work.wait()
            for j, (s, e) in enumerate(parts):
                mean[s:e] = codec.decode(gathered[j][: codec.wire_bytes(e - s)], e - s)
    except RuntimeError as e:
        return failed(f"{codec.name} all-reduce over {n} peers failed: {_first_line(e)}")
    except CodecError as e:
        return failed(f"undecodable data from a peer: {e}")
    finally:
        if pg is not None:
            _REAPER.retire(pg)
    if not all_finite(mean):
        return failed("non-finite values in the averaged result")
    for fb, s, res in pending:  # the round completed: the quantization errors are now "sent"
        fb.commit(s, res)
    return RoundResult(group.round, "complete", group.members, weights, time.monotonic() - t0, sent, None,
                       mean.to(delta.device))


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else type(e).__name__
