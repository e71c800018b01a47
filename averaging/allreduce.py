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

That single SUM is the fastest path, but a sum cannot drop a bad contribution: one NaN
fails the round. It is used only for fp32 + mean in a *trusted* run (`trusted=True`).

Every other round takes the part-wise path (the same byte count as a ring: 2·(n−1)/n of
the encoded size), where each contribution is seen, checked and reduced on its own:
    1. metadata rows [w_i, declared size_i, credential votes_i] all-gathered in fp64 (one
       row per member, so nobody can write another's): proves everyone is there, and
       every member computes the same set of *valid* members (the size most
       members declare, a positive finite weight); the others are excluded from the round;
    2. reduce-scatter: the vector is split into parts, one per valid member; part j of every
       valid member's encoded w·Δ goes to its owner (gloo all-to-all), which decodes each,
       DROPS any with NaN/Inf or undecodable bytes (naming the sender in `rejected`), and
       reduces the rest with the run's aggregator (mean, trimmed_mean, centered_clip);
    3. all-gather: each owner encodes its part of the result and every member receives all
       parts. All members decode the same bytes, so they agree exactly.
Compressed codecs use error feedback (see codecs.ErrorFeedback), committed only if the
round completes. Limitation: the owner of a part is trusted for that part (1/m of the
vector); BTARD-style verification of owners is not implemented (docs/security.md).
"""
from __future__ import annotations

import datetime
import logging
import math
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed import PrefixStore

from .access import Credential
from .codecs import Codec, CodecError, ErrorFeedback, get_codec, partition
from .faults import Tamper
from .matchmaking import Group
from .robust import AggregatorConfig, aggregate

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
    # Contributions this peer refused in this round: (peer id, reason). The averager counts
    # them as strikes against the sender and bans repeat offenders.
    rejected: tuple[tuple[str, str], ...] = ()

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
    codec: str | Compression = "fp32", pipeline_chunk: int = 0, aggregator: AggregatorConfig | None = None,
    trusted: bool = False, tamper: Tamper | None = None, secret: Credential | None = None,
) -> RoundResult:
    """Aggregate `delta` [P] over the group (by default the mean weighted by each member's `weight`).

    Failure behaviour: never raises for network faults. A member that dies or stalls makes
    gloo raise within `timeout_s` (sooner when its sockets close); the result is then
    `failed` and `delta` is untouched. Blocks for at most about 2·timeout_s (rendezvous +
    transfer). Bad contributions (wrong size, NaN/Inf, undecodable) are dropped on the
    part-wise path and listed in `rejected`; on the trusted fp32 SUM path they fail the round.
    `tamper` is the fault-injection seam of the hostile-peer tests (see faults.py).
    `secret` (a private run): members prove they hold it before any data is exchanged; a
    member that cannot is excluded (part-wise path) or fails the round (SUM path).
    """
    if not (weight > 0 and math.isfinite(weight)):
        raise ValueError(f"weight must be positive and finite, got {weight}")
    comp = Compression.named(codec) if isinstance(codec, str) else codec
    agg = aggregator or AggregatorConfig()
    if not (comp.codec.lossless and trusted and agg.name == "mean" and tamper is None):
        return _partwise_allreduce(group, delta, weight, host=host, timeout_s=timeout_s, comp=comp,
                                   chunk=pipeline_chunk or (PIPELINE_CHUNK // 4 if comp.codec.lossless else PIPELINE_CHUNK), agg=agg, tamper=tamper, secret=secret)
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
        if secret is not None:
            votes = torch.tensor(_check_credentials(pg, group, secret), dtype=torch.float64)
            pg.allreduce([votes]).wait()
            unauthorized = [pid for pid, v in zip(group.members, votes.tolist()) if 2 * v <= n]
            if unauthorized:  # a SUM cannot leave anyone out: fail rather than mix in an outsider
                return failed(f"members without this run's credential: {', '.join(p[-8:] for p in unauthorized)}")
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


def _partwise_allreduce(
    group: Group, delta: torch.Tensor, weight: float, *, host: str, timeout_s: float, comp: Compression, chunk: int,
    agg: AggregatorConfig, tamper: Tamper | None, secret: Credential | None = None,
) -> RoundResult:
    t0 = time.monotonic()
    n, r = group.size, group.rank
    P = delta.numel()
    codec = comp.codec
    lossless = codec.lossless
    if not lossless:  # fp32 needs no error-feedback residuals
        comp.ensure(P)
        assert comp.contrib is not None and comp.mean is not None
    # This member's metadata row: [w, declared size, credential votes for each member (n)].
    # All-gathered, not summed, so no member can write into another member's entries; fp64 keeps sizes exact.
    meta = torch.zeros(2 + n, dtype=torch.float64)
    meta[0], meta[1] = weight, P if tamper is None else tamper.declared_numel(P)
    x = delta.detach().reshape(-1).to("cpu", torch.float32) * weight  # private copy [P]
    if tamper is not None:
        x = tamper.apply(x, group.round)
    pending: list = []  # error-feedback residuals, committed only if the round completes
    sent = (n - 1) * meta.numel() * 8
    weights: tuple[float, ...] = ()
    rejected: list[tuple[str, str]] = []

    def failed(msg: str) -> RoundResult:
        log.warning("round %d failed: %s", group.round, msg)
        return RoundResult(group.round, "failed", group.members, weights, time.monotonic() - t0, sent, msg,
                           rejected=tuple(rejected))

    pg = None
    try:
        pg = make_gloo_group(group, host=host, timeout_s=timeout_s)
        if secret is not None:  # each member vouches for the members whose tag it can verify
            meta[2:] = torch.tensor(_check_credentials(pg, group, secret), dtype=torch.float64)
        rows = [torch.empty(2 + n, dtype=torch.float64) for _ in range(n)]
        pg.allgather([rows], [meta]).wait()  # completes only if every member takes part
        if tamper is not None:
            tamper.transfer_started()
        table = torch.stack(rows)  # [n, 2 + n]: row i is what member i declared
        weights = tuple(float(w) for w in table[:, 0])
        declared = [float(v) for v in table[:, 1]]
        # A member is authorized if a majority vouches for it: an outsider vouching for itself
        # (and against everyone else) is outvoted, and every member reads the same table.
        votes = table[:, 2:].sum(0)
        unauthorized = [group.members[i] for i in range(n) if secret is not None and 2 * float(votes[i]) <= n]
        # Every member computes the same valid set from the same table, so the collectives
        # below stay consistent: excluded members send and receive nothing in phase 2.
        sizes = Counter(int(v) if math.isfinite(v) else -1 for v in declared)
        size = min(sizes, key=lambda v: (-sizes[v], v))  # the size most members declare
        valid = []
        for i in range(n):
            if group.members[i] in unauthorized:
                rejected.append((group.members[i], "no valid credential for this private run"))
            elif not (math.isfinite(declared[i]) and int(declared[i]) == size and size > 0):
                rejected.append((group.members[i], f"wrong size {declared[i]:.0f} (expected {size})"))
            elif not (0 < weights[i] < math.inf):
                rejected.append((group.members[i], f"invalid weight {weights[i]}"))
            else:
                valid.append(i)
        if r in valid and size != P:  # cannot happen for an honest peer; a guard against misuse
            return failed(f"this peer's update has {P} values but the group agreed on {size}")
        owner = {i: j for j, i in enumerate(valid)}  # rank -> index of the part it reduces
        m = len(valid)
        me_in = r in owner
        # Each chunk [c0, c1) is split into m parts; part j of every valid member's chunk goes to valid[j].
        chunks = [[(c0 + s, c0 + e) for s, e in partition(min(c0 + chunk, size) - c0, m)] for c0 in range(0, size, chunk)]
        # Phase 2, reduce-scatter: encode each chunk and issue its all-to-all without waiting.
        scatters = []
        for parts in chunks:
            encoded = []
            for i in range(n):
                if not me_in or i == r or i not in owner:  # nothing crosses the wire for our own part
                    encoded.append(torch.empty(0, dtype=torch.uint8))
                    continue
                s0, e0 = parts[owner[i]]
                if lossless:  # fp32: the bytes themselves, no error feedback to keep
                    encoded.append(x[s0:e0].view(torch.uint8))
                    continue
                data, _, res = comp.contrib.compress(x[s0:e0], s0)
                encoded.append(data)
                pending.append((comp.contrib, s0, res))
            part_bytes = codec.wire_bytes(parts[owner[r]][1] - parts[owner[r]][0]) if me_in else 0
            recv_splits = [part_bytes if me_in and i != r and i in owner else 0 for i in range(n)]
            received = torch.empty(sum(recv_splits), dtype=torch.uint8)
            splits = [d.numel() for d in encoded]
            sent += sum(splits)
            work = pg.alltoall_base(received, torch.cat(encoded), recv_splits, splits)
            scatters.append((parts, received, recv_splits, work))
        # Phase 3, all-gather: as each chunk's parts arrive, reduce ours and send the encoded result part.
        gathers = []
        for parts, received, recv_splits, work in scatters:
            work.wait()
            max_bytes = codec.wire_bytes(max(e - s for s, e in parts))
            padded = torch.zeros(max_bytes, dtype=torch.uint8)
            if me_in:
                my_s, my_e = parts[owner[r]]
                if lossless:
                    result = _reduce_part(group, received, recv_splits, x[my_s:my_e], weights, valid, codec, agg, rejected)
                    padded[: 4 * (my_e - my_s)] = result.view(torch.uint8)
                else:
                    result = _reduce_part(group, received, recv_splits, x[my_s:my_e] + comp.contrib.residual[my_s:my_e],
                                          weights, valid, codec, agg, rejected)
                    # Our own contribution went in exact, plus any residual left on this range from rounds in
                    # which another member owned it (that residual is now spent).
                    pending.append((comp.contrib, my_s, torch.zeros(my_e - my_s)))
                    mean_data, _, res = comp.mean.compress(result, my_s)
                    pending.append((comp.mean, my_s, res))
                    padded[: mean_data.numel()] = mean_data
            gathered = [torch.empty(max_bytes, dtype=torch.uint8) for _ in range(n)]
            sent += (n - 1) * max_bytes
            gathers.append((parts, gathered, pg.allgather([gathered], [padded])))
        mean = torch.empty(size, dtype=torch.float32)
        for parts, gathered, work in gathers:
            work.wait()
            for j, (s0, e0) in enumerate(parts):
                got = gathered[valid[j]][: codec.wire_bytes(e0 - s0)]
                mean[s0:e0] = got.view(torch.float32) if lossless else codec.decode(got, e0 - s0)
    except RuntimeError as e:
        return failed(f"{codec.name} all-reduce over {n} peers failed: {_first_line(e)}")
    except CodecError as e:
        return failed(f"undecodable result part from a peer: {e}")
    finally:
        if pg is not None:
            _REAPER.retire(pg)
    if rejected:
        log.warning("round %d: dropped contributions: %s", group.round,
                    "; ".join(f"{pid[-8:]}: {why}" for pid, why in sorted(set(rejected))))
    if not me_in:
        return failed("this peer's contribution was excluded by the group (see the other peers' logs)")
    if not all_finite(mean):
        return failed("non-finite values in the averaged result")
    for fb, s0, res in pending:  # the round completed: the quantization errors are now "sent"
        fb.commit(s0, res)
    return RoundResult(group.round, "complete", group.members, weights, time.monotonic() - t0, sent, None,
                       mean.to(delta.device), rejected=tuple(sorted(set(rejected))))


def _check_credentials(pg: dist.ProcessGroupGloo, group: Group, secret: Credential) -> list[float]:
    """All-gather each member's proof over (group, rank, peer id): an HMAC tag, or a signature
    with the public key (allowlist). Return this member's votes: 1.0 for each member whose
    proof it can verify, else 0.0 (summed by the caller)."""
    proof = secret.sign("allreduce", group.prefix, str(group.rank), group.members[group.rank])
    mine = torch.zeros(secret.proof_size, dtype=torch.uint8)  # fixed size, zero-padded
    mine[: len(proof)] = torch.frombuffer(bytearray(proof), dtype=torch.uint8)
    proofs = [torch.empty(secret.proof_size, dtype=torch.uint8) for _ in range(group.size)]
    pg.allgather([proofs], [mine]).wait()
    # The credential reads its own format: an HMAC tag fills all 32 bytes, an allowlist
    # proof strips the zero padding itself.
    return [1.0 if secret.verify(bytes(proofs[i].tolist()), pid, "allreduce", group.prefix, str(i), pid)
            else 0.0 for i, pid in enumerate(group.members)]


def _reduce_part(
    group: Group, received: torch.Tensor, recv_splits: list[int], own: torch.Tensor, weights: tuple[float, ...],
    valid: list[int], codec: Codec, agg: AggregatorConfig, rejected: list[tuple[str, str]],
) -> torch.Tensor:
    """Reduce the part this peer owns: `own` [L] is its exact w·Δ; `received` holds the other
    valid members' encoded w·Δ for the same range. Drops (and names) any contribution that does
    not decode or is not finite; returns the aggregate of Δ over the rest, [L] float32.

    Never raises: the other members are waiting for this part in the all-gather. If nothing
    usable is left, the part is NaN, so every member fails the round instead of applying it.
    """
    L = own.numel()
    rows, ws = [], []
    if all_finite(own):
        rows.append(own)
        ws.append(weights[group.rank])
    else:  # our own update diverged: it must not poison the group either
        rejected.append((group.members[group.rank], "NaN/Inf values"))
    offset = 0
    for i, nbytes in enumerate(recv_splits):
        if nbytes == 0:
            continue
        chunk_bytes, offset = received[offset : offset + nbytes], offset + nbytes
        try:
            # fp32: a view, no copy (the buffer is fresh, and every part's byte offset is a multiple of 4)
            row = chunk_bytes.view(torch.float32) if codec.lossless and nbytes == 4 * L else codec.decode(chunk_bytes, L)
        except CodecError as e:
            rejected.append((group.members[i], f"undecodable: {e}"))
            continue
        if not all_finite(row):
            rejected.append((group.members[i], "NaN/Inf values"))
            continue
        rows.append(row)
        ws.append(weights[i])
    if not rows:
        return torch.full((L,), float("nan"))
    if agg.name == "mean":  # the fast path: Σ w·Δ / Σ w over the accepted contributions
        acc = rows[0].clone()
        for row in rows[1:]:
            acc += row
        return acc.div_(sum(ws))
    w = torch.tensor(ws, dtype=torch.float32)
    try:
        # Robust aggregators see Δ_i, not w_i·Δ_i; trimming counts the whole group (see aggregate).
        return aggregate(torch.stack(rows) / w[:, None], w, agg, group_size=group.size)
    except ValueError as e:  # e.g. Δ = w·Δ / w overflowing: fail the round, do not hang the group
        log.warning("round %d: could not aggregate this part: %s", group.round, e)
        return torch.full((L,), float("nan"))


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else type(e).__name__
