"""State download: a peer that is behind streams θ_sync, momentum and the round from peers ahead.

Transport: every peer already runs a TCPStore server (for matchmaking), announced in its
membership record. The state is a virtual vector of fp32 chunks of CHUNK bytes: θ_sync's
chunks, then the momentum's (each vector's last chunk may be short). A requester takes a
request number k with an atomic counter on the donor's store and writes what it wants:

    state/req/{k}            {"who": peer id or "observer", "part": [j, m]}   chunks i with i % m == j
                             or {"who": ..., "chunks": [i, ...]}              these chunks
    state/resp/{k}/meta      {"format", "round", "fingerprint", "samples", "numel", "momentum",
                              "chunk", "chunks" (the total), "serving" (the indices, in order)}
    state/resp/{k}/{i}       chunk i's raw bytes; b"" = the donor moved on to a newer state
    state/resp/{k}/ack/{i}   the requester took chunk i (and deleted it)
    state/req/{k}/gone       the requester gave up on request k (a timeout, a bad chunk)

A request also says how long the requester waits for each key ("timeout", seconds); the
donor waits no longer than that for an acknowledgement. Requests are answered in order, so a
request that nobody will take must not hold up the ones behind it: the donor skips a request
marked gone, stops a stream when its requester marks it gone or acknowledges nothing for its
timeout, and skips a number that was taken but never written (a requester that died between
the two) once a later request exists.

A stream, not a copy: the donor reads each chunk from its live θ_sync and momentum under the
round loop's state lock (the outer step changes them in place), checking that the state is
still the one its manifest announced, and posts at most WINDOW chunks ahead of the
requester's acknowledgements. So serving costs the donor WINDOW MiB per download, never a
serialized copy of the state, and the trainer is never paused for longer than one chunk's
memcpy.

Several donors at the same (round, digest) serve one requester at once, each a stripe
(`part`); a stripe whose donor fails is asked from the others. The assembled θ_sync must
hash to the digest the donors announced in the DHT; if it does not (a lying donor in the
team), the requester falls back to one donor at a time, so a liar is identified by its own
download.

Failure behaviour: no deadline for the whole download, so a large state on a slow link is
never cut off while it makes progress; `timeout` bounds each wait (connecting, the manifest,
every chunk). A donor that dies, stalls or sends bytes that fail a check is skipped. If no
donor works, `download_state` raises StateError; the caller keeps its own state. Donors
that moved on to a newer round (a round ended during the download) raise StateMovedError: the
caller reads the records again and fetches the newer state, blaming nobody.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import math
import socket
import threading
import time
from contextlib import nullcontext
from datetime import timedelta
from typing import Callable, ContextManager, Sequence

import numpy as np
import torch
from torch.distributed import Store, TCPStore

from averaging.errors import StateError, StateMovedError
from averaging.flat import tensor_digest
from averaging.identity import short_id

from .loop import PeerLoop
from .membership import PeerRecord
from .state import SwarmState

log = logging.getLogger(__name__)

FORMAT = "swarmtrain-stream/1"
CHUNK = 1 << 20  # bytes per chunk: 262,144 fp32 values
# Chunks a donor posts ahead of the requester's acknowledgements: the donor's store holds at
# most this many MiB per download in flight.
WINDOW = 8
MAX_DONORS = 4  # donors one requester streams from at once
MAX_STREAMS = 2  # downloads a donor serves at once (more wait): its training keeps the CPU
_KEEP_RESPONSES_S = 120.0
# How long a request number may stay unwritten while later ones exist before it is skipped:
# the requester writes it right after taking it, so only a dead requester leaves it empty.
_UNWRITTEN_S = 5.0
# What a requester that will not join the rounds (an archivist) writes as its id: the donor
# does not wait for it. A peer id is never this string.
OBSERVER = "observer"
# Seconds a donor has to accept a plain TCP connection before a download skips it. A crashed
# peer's record outlives it by up to its TTL; a refused port answers at once, a vanished host
# never does. TCPStore's own connect retries for its whole timeout (5 s, twice, with a C++
# stack trace in the log each time), so dead donors are weeded out with this probe first.
PROBE_S = 2.0


def _layout(numel: int, momentum: bool) -> tuple[int, int]:
    """(θ chunks, total chunks) of a state of `numel` parameters."""
    per = max(1, math.ceil(4 * numel / CHUNK))
    return per, per * (2 if momentum else 1)


def _selection(req: dict, total: int) -> list[int]:
    """The chunk indices a request asks for (ValueError if malformed)."""
    if "chunks" in req:
        idx = req["chunks"]
        if not (isinstance(idx, list) and all(isinstance(i, int) and 0 <= i < total for i in idx)):
            raise ValueError("bad chunk list")
        return sorted(set(idx))
    j, m = req.get("part", [0, 1])
    if not (isinstance(j, int) and isinstance(m, int) and 0 <= j < m <= 64):
        raise ValueError("bad part")
    return list(range(j, total, m))


class StateServer:
    """Streams this peer's current SwarmState from its store: a task on the peer's event loop.

    Owned by the Peer (or the archivist): `start(loop)`, `close()`. `snapshot()` returns the
    current state; `lock` is held while that state's tensors change in place (None: they
    never do, e.g. the archivist's downloaded copy). Streaming runs in the loop's executor,
    at most MAX_STREAMS at once. Failure behaviour: a request that fails (the requester
    vanished, the state moved on) is logged and its keys removed; the task goes on.
    """

    def __init__(self, store: Store, snapshot: Callable[[], SwarmState | None], lock: ContextManager | None = None,
                 *, stall_timeout: float = 60.0, throttle_s: float = 0.0, rate_mb_s: float | None = None,
                 training: Callable[[], bool] | None = None) -> None:
        if rate_mb_s is not None and not rate_mb_s > 0:
            raise ValueError(f"rate_mb_s must be > 0 or None, got {rate_mb_s}")
        self._store = store
        # While `training()` says the owner computes, all streams together send at most this
        # many MB/s (None: no cap): serving costs the owner's CPU (measured: +53% step time at
        # 139 MB/s on one shared core). While the owner waits for the swarm (often for this
        # very joiner, at its sync point) it streams at full speed.
        self.rate_mb_s = rate_mb_s
        self._training = training if training is not None else (lambda: True)
        self._pace_lock = threading.Lock()
        self._pace_t = 0.0  # when the capped streams may send their next byte
        self.paced_s = 0.0  # seconds the cap has held streams back
        self._snapshot = snapshot
        self._lock = lock if lock is not None else nullcontext()
        self.stall_timeout = stall_timeout
        self.throttle_s = throttle_s  # seconds added per chunk: the slow-donor seam of the tests
        self._task: concurrent.futures.Future | None = None
        self._streams: set[asyncio.Future] = set()
        self._closed = threading.Event()
        # (time, request, chunks whose keys may be left) for cleanup; kept in order of time
        self._served: list[tuple[float, int, list[int]]] = []
        self.requests_served = 0
        self.bytes_served = 0  # chunks posted, finished streams or not
        self.serve_seconds = 0.0
        # Responses posted but not yet taken: the requester deletes a response's manifest once
        # it has every chunk, so a manifest still in the store is a download in progress.
        # request -> (when asked, requester's peer id, whether its manifest is posted yet)
        self._fetching: dict[int, tuple[float, str, bool]] = {}
        self._fetch_lock = threading.Lock()

    def start(self, loop: PeerLoop) -> None:
        self._task = loop.spawn(self.run(), "state server")

    def close(self) -> None:
        """Stop serving (streams in progress stop at their next chunk). The store is released
        by the owner once its loop has stopped: torch's TCPStore has no close(), and its
        listening socket goes only with the last reference to it."""
        self._closed.set()
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def run(self) -> None:
        """Answer request 1, 2, ... in order (each streamed in the executor), until cancelled."""
        k = 1
        unwritten_since: float | None = None  # when request k was seen taken but not written
        loop = asyncio.get_running_loop()
        try:
            while True:
                await asyncio.sleep(0.05 if self._streams else 0.2)
                self._streams = {f for f in self._streams if not f.done()}
                if len(self._streams) >= MAX_STREAMS:
                    self._cleanup()
                    continue
                # check() is non-blocking; a blocking wait() with a timeout logs a c10d warning each time.
                if not self._store.check([f"state/req/{k}"]):
                    # add(0) reads the counter: a later number taken means k's requester died
                    if self._store.add("state/req", 0) > k:
                        now = time.monotonic()
                        unwritten_since = unwritten_since or now
                        if now - unwritten_since >= _UNWRITTEN_S:
                            log.info("state request %d was never written (its requester is gone); skipped", k)
                            self._served.append((now, k, []))
                            k, unwritten_since = k + 1, None
                    self._cleanup()
                    continue
                unwritten_since = None
                if self._gone(k):  # it gave up while waiting behind other streams
                    log.info("state request %d: its requester gave up before it was served; skipped", k)
                    self._served.append((time.monotonic(), k, []))
                else:
                    self._streams.add(loop.run_in_executor(None, self._serve_logged, k))
                k += 1
        finally:
            self._closed.set()

    def _serve_logged(self, k: int) -> None:
        try:
            self._serve(k)
        except (RuntimeError, ValueError) as e:  # the store (a requester gone), a malformed request
            log.warning("state request %d failed: %s", k, str(e).splitlines()[0] if str(e) else type(e).__name__)
            self._drop(k)

    def _serve(self, k: int) -> None:
        t0 = time.monotonic()
        raw = self._store.get(f"state/req/{k}").decode(errors="replace")[:1 << 16]
        try:
            req = json.loads(raw)
        except ValueError:
            req = None
        if not isinstance(req, dict):
            raise ValueError(f"malformed request {raw[:60]!r}")
        requester = str(req.get("who", ""))[:64]
        patience = req.get("timeout")  # the requester's wait for each key: no point waiting longer
        stall = (min(self.stall_timeout, float(patience) + 1.0)
                 if isinstance(patience, (int, float)) and not isinstance(patience, bool) and patience > 0
                 else self.stall_timeout)
        joiner = requester not in ("", OBSERVER)
        if joiner:  # only a joiner is waited for (an archivist's copy must not slow every round)
            # Recorded before the manifest is posted: a requester can fetch everything and
            # delete the keys before this thread runs another line.
            with self._fetch_lock:
                self._fetching[k] = (time.monotonic(), requester, False)
        state = self._snapshot()
        if state is None:
            raise ValueError("nothing to serve yet")
        theta, mom = state.theta_sync.reshape(-1), state.momentum_buf
        numel = theta.numel()
        per, total = _layout(numel, mom is not None)
        serving = _selection(req, total)
        manifest = {"format": FORMAT, "round": state.round, "fingerprint": state.fingerprint,
                    "samples": state.samples, "numel": numel, "momentum": mom is not None, "chunk": CHUNK,
                    "chunks": total, "serving": serving}
        with self._fetch_lock:  # posted: from now on, the manifest's presence says "still downloading"
            if joiner:
                self._fetching[k] = (self._fetching[k][0], requester, True)
            self._store.set(f"state/resp/{k}/meta", json.dumps(manifest))
        vals = CHUNK // 4
        sent = 0
        for q, i in enumerate(serving):
            if q >= WINDOW:  # flow control: the requester has taken chunk q − WINDOW
                ack = f"state/resp/{k}/ack/{serving[q - WINDOW]}"
                self._wait(ack, k, stall)
                self._store.delete_key(ack)
            if self._closed.is_set():
                raise RuntimeError("server closed")
            if self.throttle_s:
                time.sleep(self.throttle_s)
            vec, c = (theta, i) if i < per else (mom, i - per)
            with self._lock:
                if self._snapshot() is not state:  # the state moved on (a round applied): tell the requester
                    self._store.set(f"state/resp/{k}/{i}", b"")
                    log.info("state request %d: round %d is no longer this peer's state; stream stopped", k, state.round)
                    self._served.append((time.monotonic(), k, serving))
                    return
                data = vec[c * vals : (c + 1) * vals].numpy().tobytes()  # one chunk, copied under the lock
            self._store.set(f"state/resp/{k}/{i}", data)
            sent += len(data)
            self.bytes_served += len(data)
            self._pace(len(data))
        self._served.append((time.monotonic(), k, serving[-WINDOW:]))  # the requester deleted the others
        self.requests_served += 1
        self.serve_seconds += time.monotonic() - t0
        log.info("served state of round %d (%.1f MB, %d of %d chunks) in %.2fs", state.round, sent / 1e6,
                 len(serving), total, time.monotonic() - t0)

    def _pace(self, nbytes: int) -> None:
        """The serving cap: while the owner trains, wait until `nbytes` more fit under rate_mb_s
        (a token bucket shared by all streams, with no credit saved up while idle)."""
        if self.rate_mb_s is None or not self._training():
            return
        with self._pace_lock:
            now = time.monotonic()
            self._pace_t = max(self._pace_t, now) + nbytes / (self.rate_mb_s * 1e6)
            wait = self._pace_t - now
            self.paced_s += max(wait, 0.0)
        self._closed.wait(wait)

    def _gone(self, k: int) -> bool:
        return self._store.check([f"state/req/{k}/gone"])

    def _wait(self, key: str, k: int, stall: float) -> None:
        """Wait for `key` of request k, in short steps so that close() stops the stream within
        a second; stop if the requester says it gave up or takes nothing for `stall` seconds."""
        start = time.monotonic()
        asked = start
        pause = 0.001
        while not self._store.check([key]):
            if self._closed.is_set():
                raise RuntimeError("server closed")
            now = time.monotonic()
            if now - start > stall:
                raise RuntimeError(f"the requester took nothing for {stall:.0f}s")
            if now - asked > 0.25:
                asked = now
                if self._gone(k):
                    raise RuntimeError("the requester gave up")
            time.sleep(pause)
            pause = min(2 * pause, 0.02)

    def downloads(self, max_age: float = 120.0) -> tuple[int, set[str]]:
        """(joiners' downloads of a state this server posted still in progress, peer ids of the
        joiners that finished within `max_age` seconds; observers are not counted). The
        requester deletes a response's manifest once it has every chunk, so a manifest still
        in the store is a download in progress."""
        now = time.monotonic()
        busy, done = 0, set()
        with self._fetch_lock:
            for k, (t, who, posted) in list(self._fetching.items()):
                if now - t > max_age or self._task is None:
                    del self._fetching[k]
                elif not posted or self._store.check([f"state/resp/{k}/meta"]):
                    busy += 1
                elif who:
                    done.add(who)
        return busy, done

    def forget(self, requester: str) -> None:
        """That requester has joined (or is given up on): stop reporting it."""
        with self._fetch_lock:
            for k, (_, who, _posted) in list(self._fetching.items()):
                if who == requester:
                    del self._fetching[k]

    def _drop(self, k: int) -> None:
        """Remove what a failed stream left in the store."""
        with self._fetch_lock:
            self._fetching.pop(k, None)
        try:
            meta = json.loads(self._store.get(f"state/resp/{k}/meta")) if self._store.check([f"state/resp/{k}/meta"]) else {}
            serving = meta.get("serving", []) if isinstance(meta, dict) else []
        except (RuntimeError, ValueError):
            serving = []
        self._served.insert(0, (time.monotonic() - _KEEP_RESPONSES_S, k, serving))
        self._cleanup()

    def _cleanup(self) -> None:
        """Free responses older than _KEEP_RESPONSES_S (their requester took them or died)."""
        now = time.monotonic()
        while self._served and now - self._served[0][0] >= _KEEP_RESPONSES_S:
            _, k, serving = self._served.pop(0)
            keys = [f"state/req/{k}", f"state/req/{k}/gone", f"state/resp/{k}/meta"]
            # the requester deletes what it took; what is left: the last WINDOW acknowledgements,
            # or everything of a download that failed
            keys += [f"state/resp/{k}/{i}" for i in serving] + [f"state/resp/{k}/ack/{i}" for i in serving]
            for key in keys:
                self._store.delete_key(key)


class _Assembly:
    """The state being put together from one or more donors' streams (thread-safe)."""

    def __init__(self, *, round_: int, fingerprint: str | None, numel: int | None) -> None:
        self.round, self.fingerprint, self.numel = round_, fingerprint, numel
        self.meta: dict | None = None
        self.theta: torch.Tensor | None = None
        self.mom: torch.Tensor | None = None
        self.done: set[int] = set()
        self.lock = threading.Lock()

    def accept(self, meta: object, name: str, expected: list[int] | None) -> dict:
        """Check a donor's manifest (and that it matches the others'); allocate on the first."""
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise StateError(f"{name} does not stream this format (manifest {str(meta)[:80]})")
        rnd = meta.get("round")
        if isinstance(rnd, int) and not isinstance(rnd, bool) and rnd > self.round:
            raise StateMovedError(f"{name} has moved on from round {self.round} to round {rnd}")
        try:
            numel, mom = meta["numel"], meta["momentum"]
            ok = (isinstance(rnd, int) and rnd == self.round and isinstance(numel, int) and 0 < numel <= 1 << 36
                  and (self.numel is None or numel == self.numel) and isinstance(mom, bool)
                  and meta["chunk"] == CHUNK and meta["chunks"] == _layout(numel, mom)[1]
                  and isinstance(meta["fingerprint"], str)
                  and (self.fingerprint is None or meta["fingerprint"] == self.fingerprint)
                  and isinstance(meta["samples"], int) and not isinstance(meta["samples"], bool) and meta["samples"] >= 0
                  and isinstance(meta["serving"], list)
                  and (expected is None or meta["serving"] == expected))
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise StateError(f"{name} sent an implausible manifest: {json.dumps(meta)[:200]}")
        with self.lock:
            if self.meta is None:
                self.meta = meta
                self.theta = torch.empty(numel, dtype=torch.float32)
                self.mom = torch.empty(numel, dtype=torch.float32) if mom else None
            elif any(meta[f] != self.meta[f] for f in ("numel", "momentum", "fingerprint", "chunks")):
                raise StateError(f"{name}'s manifest does not match the other donors'")
        return meta

    def write(self, i: int, data: bytes, name: str) -> None:
        assert self.meta is not None and self.theta is not None
        per = _layout(self.meta["numel"], self.meta["momentum"])[0]
        vec, c = (self.theta, i) if i < per else (self.mom, i - per)
        assert vec is not None
        vals = CHUNK // 4
        dest = vec[c * vals : (c + 1) * vals]
        if len(data) != 4 * dest.numel():
            raise StateError(f"{name} sent chunk {i} of {len(data)} bytes (expected {4 * dest.numel()})")
        dest.numpy()[:] = np.frombuffer(data, dtype=np.float32)
        with self.lock:
            self.done.add(i)

    def missing(self) -> list[int]:
        if self.meta is None:
            return []
        return [i for i in range(self.meta["chunks"]) if i not in self.done]


def _stream(donor: PeerRecord, dl: _Assembly, req: dict, *, timeout: float, connect_timeout: float,
            expected: list[int] | None = None) -> None:
    """Stream the chunks `req` asks for from one donor into `dl`. Raises StateError."""
    name = f"peer {short_id(donor.peer_id)} ({donor.host}:{donor.port})"
    store: TCPStore | None = None
    k = 0
    try:
        store = TCPStore(donor.host, donor.port, is_master=False, timeout=timedelta(seconds=min(connect_timeout, timeout)))
        store.set_timeout(timedelta(seconds=timeout))
        k = store.add("state/req", 1)
        store.set(f"state/req/{k}", json.dumps({**req, "timeout": timeout}))
        store.wait([f"state/resp/{k}/meta"], timedelta(seconds=timeout))
        meta = dl.accept(json.loads(store.get(f"state/resp/{k}/meta")), name, expected)
        for i in meta["serving"]:
            if not (isinstance(i, int) and 0 <= i < meta["chunks"]):
                raise StateError(f"{name} announced chunk {i!r} of {meta['chunks']}")
            data = store.get(f"state/resp/{k}/{i}")  # waits up to `timeout` for this one chunk
            if not data:
                raise StateMovedError(f"{name} moved on to a newer state during the download")
            dl.write(i, data, name)
            store.delete_key(f"state/resp/{k}/{i}")
            store.set(f"state/resp/{k}/ack/{i}", b"")
        for key in (f"state/resp/{k}/meta", f"state/req/{k}"):
            store.delete_key(key)
    except StateError:
        _give_up(store, k)
        raise
    except (RuntimeError, ValueError, KeyError, TypeError, OverflowError) as e:  # store errors, bad JSON
        _give_up(store, k)
        raise StateError(f"download from {name} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def _give_up(store: TCPStore | None, k: int) -> None:
    """Tell the donor that request k will not be taken, so that it serves the next one now
    rather than after its stall timeout. Best effort: the donor may be the reason we stop."""
    if store is None or k <= 0:
        return
    try:
        store.set_timeout(timedelta(seconds=2))  # a hung donor must not delay the fallback
        store.set(f"state/req/{k}/gone", b"")
    except RuntimeError:  # the donor is unreachable: its own timeout ends the stream
        pass


def fetch_state(donors: PeerRecord | Sequence[PeerRecord], *, fingerprint: str | None, numel: int | None,
                timeout: float, connect_timeout: float = 5.0, requester: str = "") -> SwarmState:
    """Stream one state from `donors` (all at the same round and digest), a stripe each; a
    stripe whose donor fails is asked from the others. Raises StateError (naming a donor) if
    the state cannot be completed; the digest is the caller's to check."""
    team = [donors] if isinstance(donors, PeerRecord) else list(donors)[:MAX_DONORS]
    if not team:
        raise StateError("no peer to download the state from")
    dl = _Assembly(round_=team[0].round, fingerprint=fingerprint, numel=numel)
    who = requester or OBSERVER
    failed: dict[int, StateError] = {}

    def stripe(j: int) -> None:
        try:
            _stream(team[j], dl, {"who": who, "part": [j, len(team)]}, timeout=timeout, connect_timeout=connect_timeout)
        except StateError as e:
            failed[j] = e

    # Owned and joined here; daemon only so that Ctrl+C during a download does not leave the
    # interpreter waiting for a stripe's current wait (each ends within `timeout` anyway).
    threads = [threading.Thread(target=stripe, args=(j,), name=f"swarmtrain-download-{j}", daemon=True)
               for j in range(len(team))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()  # bounded: every wait in a stream is bounded by timeout
    errors = list(failed.values())
    helpers = [d for j, d in enumerate(team) if j not in failed]
    if errors and helpers and dl.missing():
        log.warning("%s; asking the other donors for its chunks", errors[0])
    while dl.meta is not None and dl.missing() and helpers:
        want = dl.missing()
        try:
            _stream(helpers.pop(0), dl, {"who": who, "chunks": want}, timeout=timeout, connect_timeout=connect_timeout,
                    expected=want)
        except StateError as e:
            errors.append(e)
    if dl.meta is None or dl.missing():
        if not errors:
            raise StateError("the donors sent no state")
        raise next((e for e in errors if isinstance(e, StateMovedError)), errors[0])  # moved on: not their fault
    assert dl.theta is not None
    meta = dl.meta
    if not bool(torch.isfinite(dl.theta).all()) or (dl.mom is not None and not bool(torch.isfinite(dl.mom).all())):
        raise StateError(f"state of round {meta['round']} from {', '.join(short_id(d.peer_id) for d in team)} contains NaN or Inf")
    return SwarmState(meta["round"], meta["fingerprint"], dl.theta, dl.mom, meta["samples"])


def reachable(donors: Sequence[PeerRecord], timeout: float = PROBE_S) -> tuple[list[PeerRecord], list[PeerRecord]]:
    """(donors that accept a TCP connection now, those that do not), probing all at once:
    the slowest answer bounds the wait, `timeout` at most."""
    def probe(d: PeerRecord) -> bool:
        try:
            socket.create_connection((d.host, d.port), timeout=timeout).close()
            return True
        except (OSError, ValueError, OverflowError):  # refused, unreachable, timed out; a malformed address
            return False

    with concurrent.futures.ThreadPoolExecutor(min(len(donors), 16) or 1, "swarmtrain-probe") as pool:
        ok = list(pool.map(probe, donors))
    return [d for d, y in zip(donors, ok) if y], [d for d, y in zip(donors, ok) if not y]


def download_state(
    donors: Sequence[PeerRecord], *, fingerprint: str | None, numel: int | None, timeout: float = 30.0,
    requester: str = "",
) -> SwarmState:
    """Fetch the newest announced state from the donors that announce it, verified.

    A state is accepted only if its θ_sync digest equals the digest that its donors
    announced for that round in the DHT. The donors of one (round, digest) stream it
    together; if that fails or does not verify, each is tried alone, newest states first.
    `timeout` bounds each wait, not the download. Donors that do not accept a connection
    within PROBE_S (crashed peers whose records have not expired yet) are skipped up front.
    Raises StateMovedError if the donors moved on to a newer round meanwhile (the caller
    reads the records again; nobody lied), StateError if no donor could serve the state.
    """
    if not donors:
        raise StateError("no peer to download the state from")
    live, dead = reachable(donors)
    if dead:
        log.info("skipping %d donor(s) that do not accept connections: %s", len(dead),
                 ", ".join(f"{short_id(d.peer_id)} ({d.host}:{d.port})" for d in dead))
    if not live:
        raise StateError(f"none of the {len(donors)} peer(s) announcing the state accepts connections "
                         f"(crashed peers' records live until they expire)")
    teams: dict[tuple[int, str], list[PeerRecord]] = {}
    for d in sorted(live, key=lambda d: -d.round):
        teams.setdefault((d.round, d.digest), []).append(d)
    errors: list[str] = []

    def verified(state: SwarmState, whom: str) -> SwarmState | None:
        if tensor_digest(state.theta_sync) in {dg for (r, dg) in teams if r == state.round}:
            return state
        errors.append(f"state of round {state.round} from {whom} does not match any announced digest")
        log.warning("%s", errors[-1])
        return None

    for (_round, _digest), team in teams.items():
        attempts = ([team] if len(team) > 1 else []) + [[d] for d in team]
        for group in attempts:
            whom = ", ".join(short_id(d.peer_id) for d in group)
            try:
                state = fetch_state(group, fingerprint=fingerprint, numel=numel, timeout=timeout, requester=requester)
            except StateMovedError:
                raise  # the others at this state are moving on too: the caller reads the records again
            except StateError as e:
                errors.append(str(e))
                log.warning("%s; trying another peer", e)
                continue
            if (good := verified(state, whom)) is not None:
                return good
    raise StateError(f"could not download the swarm state from {len(donors)} peer(s): {errors[-1]}")
