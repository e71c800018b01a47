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
       parts (fp32: as a second all-to-all, straight into `out`). All members decode the
       same bytes, so they agree exactly.
Compressed codecs use error feedback (see codecs.ErrorFeedback), committed only if the
round completes. Limitation: the owner of a part is trusted for that part (1/m of the
vector); BTARD-style verification of owners is not implemented (docs/security.md).
"""
from __future__ import annotations

import atexit
import datetime
import logging
import math
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed import PrefixStore

from .access import Credential
from .codecs import Codec, CodecError, ErrorFeedback, get_codec, partition
from .faults import Tamper
from .identity import short_id
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
    # The all-reduce's own seconds (duration_s is the whole round, matchmaking included, once
    # the Averager has run it).
    transfer_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "complete"


class _Reaper:
    """Releases finished per-round gloo groups off the critical path. A group's teardown
    (joining its worker threads, closing n−1 connections) takes 15–50 ms of CPU and some of
    the GIL; run at once, it ran while the round's caller went on, and made the round 40 ms
    slower on a busy machine (1 Gbit/s, 4 peers). So each group is released DELAY_S after
    its round, while the peer trains. One daemon thread, owned by this module, only ever
    drops references; `drain` (registered with atexit) releases what is left at exit: a
    gloo group still alive when the interpreter stops aborts the process."""

    DELAY_S = 0.3

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._now = threading.Event()  # set by drain(): no more waiting
        self._thread: threading.Thread | None = None

    def retire(self, pg: object) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="swarmtrain-pg-reaper", daemon=True)
                self._thread.start()
        self._queue.put((time.monotonic() + self.DELAY_S, pg))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:  # drain()
                return
            due, pg = item
            self._now.wait(max(0.0, due - time.monotonic()))
            del item, pg  # the C++ destructor runs here

    def drain(self, timeout_s: float = 10.0) -> None:
        """Release every queued group now and stop the thread (at exit)."""
        with self._lock:
            thread = self._thread
            self._thread = None
        if thread is None or not thread.is_alive():
            return
        self._now.set()
        self._queue.put(None)
        thread.join(timeout_s)  # bounded: a teardown takes milliseconds


_REAPER = _Reaper()
atexit.register(_REAPER.drain)


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
    # gloo runs each collective on one of these threads; the part-wise pipeline keeps several
    # in flight (WINDOW per phase), and with gloo's default of 2 the link idles between them
    # (1 Gbit/s, 4 peers, 40 MB: 1.39x the ring bound with 2 threads, 1.20x with 4).
    opts._threads = GLOO_THREADS
    # gloo binds to and advertises this address; it must be reachable by the other members.
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(PrefixStore(group.prefix + "pg/", group.store), group.rank, group.size, opts)


@dataclass
class Compression:
    """A peer's codec and its error-feedback state, kept across rounds."""

    codec: Codec
    decay: float = 1.0  # of this peer's own residual (ErrorFeedback); the mean parts' is kept whole
    contrib: ErrorFeedback | None = None  # residual of this peer's own w·Δ
    mean: ErrorFeedback | None = None  # residual of the mean parts this peer encodes

    @classmethod
    def named(cls, name: str, decay: float = 1.0) -> "Compression":
        return cls(get_codec(name), decay)

    def ensure(self, numel: int) -> None:
        if self.contrib is None or self.contrib.residual.numel() != numel:
            self.contrib = ErrorFeedback(self.codec, numel, self.decay)
            self.mean = ErrorFeedback(self.codec, numel)


def weighted_allreduce(
    group: Group, delta: torch.Tensor, weight: float, *, host: str, timeout_s: float,
    codec: str | Compression = "fp32", pipeline_chunk: int = 0, aggregator: AggregatorConfig | None = None,
    trusted: bool = False, tamper: Tamper | None = None, secret: Credential | None = None,
    out: torch.Tensor | None = None,
) -> RoundResult:
    """Aggregate `delta` [P] over the group (by default the mean weighted by each member's `weight`).

    Failure behaviour: never raises for network faults. A member that dies or stalls makes
    gloo raise within `timeout_s` (sooner when its sockets close); the result is then
    `failed`. Blocks for at most about 2·timeout_s (rendezvous + transfer). Bad contributions
    (wrong size, NaN/Inf, undecodable) are dropped on the part-wise path and listed in
    `rejected`; on the trusted fp32 SUM path they fail the round.
    `tamper` is the fault-injection seam of the hostile-peer tests (see faults.py).
    `secret` (a private run): members prove they hold it before any data is exchanged; a
    member that cannot is excluded (part-wise path) or fails the round (SUM path).

    Memory: `out` (fp32 [P] on the CPU) receives the result, and may be `delta` itself: the
    round then needs no vector of its own, only chunk-sized temporaries (a round of a 100M
    model would otherwise allocate several 0.4 GB vectors). A chunk of `delta` is read
    before that chunk of `out` is written. After a `failed` round, `out` holds garbage (so
    `delta` too, when they are the same tensor). Without `out`, a new vector is returned
    and `delta` is never modified.
    """
    if not (weight > 0 and math.isfinite(weight)):
        raise ValueError(f"weight must be positive and finite, got {weight}")
    P = delta.numel()
    if out is None:
        out = torch.empty(P, dtype=torch.float32)
    elif out.numel() != P or out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp32 CPU tensor of {P} values")
    out = out.reshape(-1)
    comp = Compression.named(codec) if isinstance(codec, str) else codec
    agg = aggregator or AggregatorConfig()
    if comp.codec.sparse:  # top-k contributions do not add up part-wise: all-gathered instead
        from .allgather import sparse_allreduce
        return sparse_allreduce(group, delta, weight, host=host, timeout_s=timeout_s, comp=comp, agg=agg, tamper=tamper,
                                secret=secret, out=out)
    if not (comp.codec.lossless and trusted and agg.name == "mean" and tamper is None):
        return _partwise_allreduce(group, delta, weight, host=host, timeout_s=timeout_s, comp=comp,
                                   chunk=pipeline_chunk or (PIPELINE_CHUNK // 4 if comp.codec.lossless else PIPELINE_CHUNK),
                                   agg=agg, tamper=tamper, secret=secret, out=out)
    t0 = time.monotonic()
    n, r = group.size, group.rank
    # gloo reduces in place (and corrupts the buffer if a peer dies): `out` is that buffer.
    buf = out
    torch.mul(delta.reshape(-1).to("cpu", torch.float32), weight, out=buf)
    tally = torch.zeros(2 * n, dtype=torch.float32)  # [w_0..w_{n-1} | one-hot counts], summed in a second all-reduce
    tally[r] = weight
    tally[n + r] = 1.0
    sent = ring_bytes((P + 2 * n) * 4, n)

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
                return failed(f"members without this run's credential: {', '.join(short_id(p) for p in unauthorized)}")
        pg.allreduce([buf]).wait()
        pg.allreduce([tally]).wait()
    except RuntimeError as e:  # gloo reports peer death, timeouts and rendezvous failures as RuntimeError
        return failed(f"all-reduce over {n} peers failed: {_first_line(e)}")
    finally:
        if pg is not None:
            _REAPER.retire(pg)

    weights = tuple(float(w) for w in tally[:n])
    counts = tally[n:]
    if not torch.equal(counts, torch.ones(n)):
        return failed(f"incomplete: contributions received per member = {counts.tolist()}", weights)
    total = sum(weights)
    if not (total > 0 and math.isfinite(total)):
        return failed(f"invalid total weight {total}", weights)
    mean = buf.div_(total)
    if not all_finite(mean):
        return failed("non-finite values in the averaged result", weights)
    return RoundResult(group.round, "complete", group.members, weights, time.monotonic() - t0, sent, None, mean)


# Compressed rounds are pipelined in chunks of this many values: while gloo sends chunk k,
# this thread encodes chunk k+1, so the codec's CPU time hides behind the transfer.
PIPELINE_CHUNK = 1 << 20


GLOO_THREADS = 4

# Chunks in flight at once in each phase: enough to keep the link busy while this thread
# encodes or reduces the next one, few enough that a round's temporaries are O(WINDOW · chunk)
# (a few tens of MB), not O(P).
WINDOW = 4


def declare(pg: dist.ProcessGroupGloo, group: Group, weight: float, numel: int, secret: Credential | None,
            rejected: list[tuple[str, str]], tamper: Tamper | None = None) -> tuple[tuple[float, ...], list[int], int]:
    """Phase 1 of a checked round: all-gather every member's metadata row [w, declared size,
    credential votes for each member], in fp64 (sizes stay exact), one row per member (so no
    member can write into another's entries). Completes only if every member takes part.

    Returns (every member's weight, the *valid* ranks, the agreed size). Every member computes
    the same from the same table, so the collectives after it stay consistent: the size most
    members declare; a member is valid if it declared it, a positive finite weight and, in a
    private run, a majority vouches for it (an outsider vouching for itself, and against
    everyone else, is outvoted). The others are appended to `rejected`, with the reason.
    `tamper` (the hostile-peer seam) may lie about `numel`, and is told when the transfer starts.
    Raises RuntimeError (gloo) if a member is gone.
    """
    n = group.size
    meta = torch.zeros(2 + n, dtype=torch.float64)
    meta[0], meta[1] = weight, numel if tamper is None else tamper.declared_numel(numel)
    if secret is not None:  # each member vouches for the members whose tag it can verify
        meta[2:] = torch.tensor(_check_credentials(pg, group, secret), dtype=torch.float64)
    rows = [torch.empty(2 + n, dtype=torch.float64) for _ in range(n)]
    pg.allgather([rows], [meta]).wait()
    if tamper is not None:
        tamper.transfer_started()
    table = torch.stack(rows)  # [n, 2 + n]: row i is what member i declared
    weights = tuple(float(w) for w in table[:, 0])
    declared = [float(v) for v in table[:, 1]]
    votes = table[:, 2:].sum(0)
    sizes = Counter(int(v) if math.isfinite(v) else -1 for v in declared)
    size = min(sizes, key=lambda v: (-sizes[v], v))  # the size most members declare
    valid = []
    for i in range(n):
        if secret is not None and 2 * float(votes[i]) <= n:
            rejected.append((group.members[i], "no valid credential for this private run"))
        elif not (math.isfinite(declared[i]) and int(declared[i]) == size and size > 0):
            rejected.append((group.members[i], f"wrong size {declared[i]:.0f} (expected {size})"))
        elif not (0 < weights[i] < math.inf):
            rejected.append((group.members[i], f"invalid weight {weights[i]}"))
        else:
            valid.append(i)
    return weights, valid, size


def _partwise_allreduce(
    group: Group, delta: torch.Tensor, weight: float, *, host: str, timeout_s: float, comp: Compression, chunk: int,
    agg: AggregatorConfig, tamper: Tamper | None, secret: Credential | None = None, out: torch.Tensor,
) -> RoundResult:
    t0 = time.monotonic()
    n, r = group.size, group.rank
    P = delta.numel()
    codec = comp.codec
    lossless = codec.lossless
    if not lossless:  # fp32 needs no error-feedback residuals
        comp.ensure(P)
        assert comp.contrib is not None and comp.mean is not None
    # What goes out. fp32 sends Δ itself, unscaled: for an fp32 CPU vector that is a view, so
    # nothing is copied, and the owner of a part multiplies by the weights that every member
    # declared in the metadata (the same bytes everywhere). A compressed codec sends w·Δ,
    # because its error feedback keeps the residual of exactly what it encoded.
    src = delta.detach().reshape(-1)
    scale = 1.0 if lossless else weight
    if tamper is not None:  # the hostile-peer seam works on the whole (test-sized) weighted vector
        src, scale = tamper.apply(src.to("cpu", torch.float32) * weight, group.round), (1 / weight if lossless else 1.0)

    def contribution(s0: int, e0: int) -> torch.Tensor:
        """scale·Δ[s0:e0], fp32 on the CPU. fp32: a view of `delta` when it is one already
        (safe even when `out` is `delta`: chunk k of `out` is written only after chunk k's
        all-to-all has finished); otherwise a new chunk-sized tensor."""
        piece = src[s0:e0].to("cpu", torch.float32)
        return piece if scale == 1.0 else torch.mul(piece, scale)

    pending: list = []  # error-feedback residuals, committed only if the round completes
    sent = (n - 1) * (2 + n) * 8  # the metadata rows
    weights: tuple[float, ...] = ()
    rejected: list[tuple[str, str]] = []

    def failed(msg: str) -> RoundResult:
        log.warning("round %d failed: %s", group.round, msg)
        return RoundResult(group.round, "failed", group.members, weights, time.monotonic() - t0, sent, msg,
                           rejected=tuple(rejected))

    pg = None
    try:
        pg = make_gloo_group(group, host=host, timeout_s=timeout_s)
        weights, valid, size = declare(pg, group, weight, P, secret, rejected, tamper)
        if r in valid and size != P:  # cannot happen for an honest peer; a guard against misuse
            return failed(f"this peer's update has {P} values but the group agreed on {size}")
        if size != P:  # excluded with the wrong size: nothing of ours goes out, nothing comes back to us
            out = torch.empty(size, dtype=torch.float32)
        owner = {i: j for j, i in enumerate(valid)}  # rank -> index of the part it reduces
        m = len(valid)
        me_in = r in owner
        if m == 0:
            return failed("no member's contribution is valid")

        def scatter(parts: list[tuple[int, int]]):
            """Phase 2, reduce-scatter of one chunk: encode it and issue its all-to-all (not waited for)."""
            nonlocal sent
            c0, c1 = parts[0][0], parts[-1][1]
            x = contribution(c0, c1) if me_in else None  # [c1 − c0] scale·Δ; part j starts at parts[j][0] − c0
            if lossless:
                # The chunk goes out as it is: part j to valid[j], our own part to ourselves
                # (a local copy inside gloo, smaller than concatenating the others' parts).
                mine = parts[owner[r]][1] - parts[owner[r]][0] if me_in else 0
                splits = [parts[owner[i]][1] - parts[owner[i]][0] if me_in and i in owner else 0 for i in range(n)]
                recv_splits = [mine if i in owner else 0 for i in range(n)]
                received = pool.get(sum(recv_splits))  # [m · mine]: row j from valid[j]
                send = x if me_in else torch.empty(0, dtype=torch.float32)
                sent += 4 * (sum(splits) - splits[r])
                return parts, None, received, recv_splits, pg.alltoall_base(received, send, recv_splits, splits), send
            own = None
            encoded = []
            for i in range(n):
                if not me_in or i not in owner:
                    encoded.append(torch.empty(0, dtype=torch.uint8))
                    continue
                s0, e0 = parts[owner[i]]
                seg = x[s0 - c0 : e0 - c0]
                if i == r:  # nothing crosses the wire for our own part
                    own = seg
                    encoded.append(torch.empty(0, dtype=torch.uint8))
                elif lossless:  # fp32: the bytes themselves, no error feedback to keep
                    encoded.append(seg.view(torch.uint8))
                else:
                    data, _, res = comp.contrib.compress(seg, s0)
                    encoded.append(data)
                    pending.append((comp.contrib, s0, res))
            part_bytes = codec.wire_bytes(parts[owner[r]][1] - parts[owner[r]][0]) if me_in else 0
            recv_splits = [part_bytes if me_in and i != r and i in owner else 0 for i in range(n)]
            received = torch.empty(sum(recv_splits), dtype=torch.uint8)
            splits = [d.numel() for d in encoded]
            sent += sum(splits)
            send = torch.cat(encoded)  # [Σ splits] bytes, chunk-sized
            return parts, own, received, recv_splits, pg.alltoall_base(received, send, recv_splits, splits), send

        def gather(item):
            """Phase 3 of one chunk: once its parts have arrived, reduce ours and issue the all-gather."""
            nonlocal sent
            parts, own, received, recv_splits, work, _send = item
            work.wait()
            lengths = {e - s for s, e in parts}
            if lossless and len(lengths) == 1:
                # Equal parts (every chunk but perhaps the last): the result parts go out in an
                # all-to-all too, straight into `out` (the valid members' parts, in rank order,
                # are exactly this chunk of it). gloo's all-gather would copy them out of a
                # fresh buffer of its own, page faults included.
                q = lengths.pop()
                send = pool.get(n * q) if me_in else torch.empty(0)  # our part, once per member
                if me_in:
                    _reduce_part(group, received, recv_splits, None, weights, valid, codec, agg, rejected, dest=send[:q])
                    send.view(n, q)[1:].copy_(send[:q].expand(n - 1, q))
                pool.give(received)
                c0, c1 = parts[0][0], parts[-1][1]
                sent += (n - 1) * 4 * q if me_in else 0
                work = pg.alltoall_base(out[c0:c1], send, [q if i in owner else 0 for i in range(n)],
                                        [q if me_in else 0] * n)
                return None, (c0, c1), work, send
            max_bytes = codec.wire_bytes(max(lengths))
            padded = torch.zeros(max_bytes, dtype=torch.uint8)
            if me_in:
                my_s, my_e = parts[owner[r]]
                if lossless:
                    _reduce_part(group, received, recv_splits, None, weights, valid, codec, agg, rejected,
                                 dest=padded[: 4 * (my_e - my_s)].view(torch.float32))
                else:
                    result = _reduce_part(group, received, recv_splits, own + comp.contrib.residual[my_s:my_e],
                                          weights, valid, codec, agg, rejected)
                    # Our own contribution went in exact, plus any residual left on this range from rounds in
                    # which another member owned it (that residual is now spent).
                    pending.append((comp.contrib, my_s, torch.zeros(my_e - my_s)))
                    mean_data, _, res = comp.mean.compress(result, my_s)
                    pending.append((comp.mean, my_s, res))
                    padded[: mean_data.numel()] = mean_data
            gathered = torch.empty(n, max_bytes, dtype=torch.uint8)
            sent += (n - 1) * max_bytes
            return parts, gathered, pg.allgather([list(gathered.unbind(0))], [padded]), padded

        def land(item) -> None:
            """The chunk's result parts have arrived: decode them into `out` (this chunk of
            `delta` was read in `scatter`, long before)."""
            parts, gathered, work, _padded = item
            work.wait()
            if parts is None:  # it landed in `out` already: check it while it is in the cache
                c0, c1 = gathered
                if not all_finite(out[c0:c1]):
                    nonfinite.append(c0)
                if _padded.numel():
                    pool.give(_padded)
                return
            for j, (s0, e0) in enumerate(parts):
                got = gathered[valid[j], : codec.wire_bytes(e0 - s0)]
                out[s0:e0] = got.view(torch.float32) if lossless else codec.decode(got, e0 - s0)
                if not all_finite(out[s0:e0]):
                    nonfinite.append(s0)

        # Each chunk [c0, c1) is split into m parts; part j of every valid member's chunk goes to
        # valid[j]. A pipeline, in the same order on every member (gloo matches collectives by
        # order): at most WINDOW chunks are between scatter and gather, and WINDOW between
        # gather and landing.
        pool = _Pool()
        nonfinite: list[int] = []  # chunks of the result with NaN/Inf, checked as they land
        scattering: deque = deque()
        gathering: deque = deque()
        # fp32 chunks are a multiple of m values, so that their parts are equal (see gather).
        # (Measured, 1 Gbit/s, 4 peers: larger chunks, or small ones ramping up to large ones
        # in the middle, were slower; smaller ones, or smaller ones only at both ends, no faster.)
        step = max(m, chunk // m * m) if lossless else chunk
        for c0 in range(0, size, step):
            scattering.append(scatter([(c0 + a, c0 + b) for a, b in partition(min(c0 + step, size) - c0, m)]))
            if len(scattering) > WINDOW:
                gathering.append(gather(scattering.popleft()))
            if len(gathering) > WINDOW:
                land(gathering.popleft())
        while scattering:
            gathering.append(gather(scattering.popleft()))
            if len(gathering) > WINDOW:
                land(gathering.popleft())
        while gathering:
            land(gathering.popleft())
    except RuntimeError as e:
        return failed(f"{codec.name} all-reduce over {n} peers failed: {_first_line(e)}")
    except CodecError as e:
        return failed(f"undecodable result part from a peer: {e}")
    finally:
        if pg is not None:
            _REAPER.retire(pg)
    if rejected:
        log.warning("round %d: dropped contributions: %s", group.round,
                    "; ".join(f"{short_id(pid)}: {why}" for pid, why in sorted(set(rejected))))
    if not me_in:
        return failed("this peer's contribution was excluded by the group (see the other peers' logs)")
    if nonfinite:
        return failed("non-finite values in the averaged result")
    for fb, s0, res in pending:  # the round completed: the quantization errors are now "sent"
        fb.commit(s0, res)
    return RoundResult(group.round, "complete", group.members, weights, time.monotonic() - t0, sent, None,
                       out, rejected=tuple(sorted(set(rejected))))


class _Pool:
    """fp32 chunk buffers reused within one round. A peer fixes glibc's mmap threshold
    (memory.steady_malloc), so every fresh chunk-sized buffer is an mmap plus a page fault
    per 4 KiB: at 1 Gbit/s that was a visible share of a round's CPU. Only this round's
    thread uses it."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []

    def get(self, numel: int) -> torch.Tensor:
        while self._free:
            base = self._free.pop()
            if base.numel() >= numel:
                return base[:numel]
        return torch.empty(numel, dtype=torch.float32)

    def give(self, t: torch.Tensor) -> None:
        """Return a buffer from get() once nothing (gloo included) uses it any more."""
        self._free.append(t if t._base is None else t._base)


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
    group: Group, received: torch.Tensor, recv_splits: list[int], own: torch.Tensor | None, weights: tuple[float, ...],
    valid: list[int], codec: Codec, agg: AggregatorConfig, rejected: list[tuple[str, str]],
    dest: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce the part this peer owns, from every valid member's contribution to it, into
    `dest` [L] float32 (a new tensor if None), and return it.

    Two layouts. Compressed: `own` [L] is this peer's exact w·Δ and `received` holds the
    other members' encoded w·Δ. fp32 (`own` None): `received` holds every valid member's
    raw, unscaled Δ for the range, ours included, and the weights come from the metadata.
    Drops (and names) any contribution that does not decode or is not finite; the result
    is the aggregate of Δ over the rest.

    Never raises: the other members are waiting for this part in the all-gather. If nothing
    usable is left, the part is NaN, so every member fails the round instead of applying it.
    """
    scaled = own is not None  # rows are w·Δ (compressed) or Δ (fp32)
    L = own.numel() if own is not None else max(recv_splits)
    out = dest if dest is not None else torch.empty(L, dtype=torch.float32)
    rows, ws = [], []

    def take(i: int, row: torch.Tensor) -> None:
        if all_finite(row):
            rows.append(row)
            ws.append(weights[i])
        else:  # a diverged update (ours too) must not poison the group
            rejected.append((group.members[i], "NaN/Inf values"))

    if agg.name == "mean" and not scaled and len(recv_splits) and not any(
            n != 0 and n != L for n in recv_splits):
        # fp32 mean, optimistically: Σ w·Δ is finite only if every row is (a NaN or Inf in
        # any row, times a positive weight, stays in the sum), so the rows are checked one by
        # one only when it is not; it saves m reads of the part per chunk.
        members = [i for i, nb in enumerate(recv_splits) if nb]
        view = received.view(len(members), L) if L else None
        if view is not None:
            torch.mul(view[0], weights[members[0]], out=out)
            for k in range(1, len(members)):
                out.add_(view[k], alpha=weights[members[k]])
            if all_finite(out):
                return out.div_(sum(weights[i] for i in members))
    if own is not None:
        take(group.rank, own)
    offset = 0
    for i, nbytes in enumerate(recv_splits):
        if nbytes == 0:
            continue
        if not scaled:  # fp32: `received` is float32 and the splits count values; a view, no copy
            take(i, received[offset : offset + nbytes])
            offset += nbytes
            continue
        chunk_bytes, offset = received[offset : offset + nbytes], offset + nbytes
        try:
            row = codec.decode(chunk_bytes, L)
        except CodecError as e:
            rejected.append((group.members[i], f"undecodable: {e}"))
            continue
        take(i, row)
    if not rows:
        return out.fill_(float("nan"))
    total = sum(ws)
    if agg.name == "mean":  # the fast path: Σ w·Δ / Σ w over the accepted contributions
        if scaled:
            out.copy_(rows[0])
            for row in rows[1:]:
                out.add_(row)
        else:
            torch.mul(rows[0], ws[0], out=out)
            for row, w in zip(rows[1:], ws[1:]):
                out.add_(row, alpha=w)
        return out.div_(total)
    w = torch.tensor(ws, dtype=torch.float32)
    try:
        # Robust aggregators see Δ_i, not w_i·Δ_i; trimming counts the whole group (see aggregate).
        stacked = torch.stack(rows)
        return out.copy_(aggregate(stacked / w[:, None] if scaled else stacked, w, agg, group_size=group.size))
    except ValueError as e:  # e.g. Δ = w·Δ / w overflowing: fail the round, do not hang the group
        log.warning("round %d: could not aggregate this part: %s", group.round, e)
        return out.fill_(float("nan"))


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else type(e).__name__
