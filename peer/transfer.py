"""State download: a peer that is behind fetches θ_sync, momentum and the round from a peer ahead.

Transport: every peer already runs a TCPStore server (for matchmaking), announced in its
membership record. A requester takes a request number with an atomic counter on the
donor's store; the donor's server task serializes its latest snapshot (an immutable
reference, so the trainer is never paused for it), writes it in 1 MiB chunks and a
manifest (round, size, chunk count, sha256). The requester checks the sha256 and that the
parameters' digest matches what the swarm announced for that round, then deletes the keys.

Failure behaviour: every wait is bounded by `timeout`. A donor that dies, stalls or sends
bytes that fail a check is skipped, and the next donor is tried. If none works,
`download_state` raises StateError; the caller keeps its own state.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import time
from datetime import timedelta
from typing import Callable, Sequence

from torch.distributed import Store, TCPStore

from averaging.errors import StateError
from averaging.flat import tensor_digest

from .loop import PeerLoop
from .membership import PeerRecord
from .state import SwarmState, digest

log = logging.getLogger(__name__)

CHUNK = 1 << 20
_KEEP_RESPONSES_S = 120.0
# What a requester that will not join the rounds (an archivist) writes as its id: the donor
# does not wait for it. A peer id is never this string.
OBSERVER = "observer"


class StateServer:
    """Serves this peer's latest SwarmState on its store: a task on the peer's event loop.

    Owned by the Peer: `start(loop)`, `close()`. Serializing a state and writing its chunks
    are blocking calls; they run in the loop's executor, so announcing and matchmaking go on
    meanwhile. Failure behaviour: a request that fails is logged and skipped; the task goes on.
    """

    def __init__(self, store: Store, snapshot: Callable[[], SwarmState]) -> None:
        self._store = store
        self._snapshot = snapshot
        self._task: concurrent.futures.Future | None = None
        self._cache: tuple[int, bytes] | None = None
        self._served: list[tuple[float, int, int]] = []  # (time, request, chunks) for cleanup
        self.requests_served = 0
        self.serve_seconds = 0.0
        # Responses posted but not yet taken: the requester deletes a response's keys once it
        # has fetched them all, so a manifest still in the store is a download in progress.
        # request -> (when asked, requester's peer id, whether its manifest is posted yet)
        self._fetching: dict[int, tuple[float, str, bool]] = {}
        self._fetch_lock = threading.Lock()

    def start(self, loop: PeerLoop) -> None:
        self._task = loop.spawn(self.run(), "state server")

    def close(self) -> None:
        """Stop serving. The store is released by the owner once its loop has stopped: torch's
        TCPStore has no close(), and its listening socket goes only with the last reference to it."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def run(self) -> None:
        """Answer request 1, 2, ... in order, until cancelled."""
        k = 1
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.2)
            # check() is non-blocking; a blocking wait() with a timeout logs a c10d warning each time.
            if not self._store.check([f"state/req/{k}"]):
                self._cleanup()
                continue
            try:
                await loop.run_in_executor(None, self._serve, k)
            except RuntimeError as e:
                log.warning("state request %d failed: %s", k, e)
            k += 1

    def _serve(self, k: int) -> None:
        t0 = time.monotonic()
        requester = self._store.get(f"state/req/{k}").decode(errors="replace")[:64]
        joiner = requester not in ("", OBSERVER, "1")  # "1": what requesters before 2026-12 wrote
        if joiner:  # only a joiner is waited for (an archivist's copy must not slow every round)
            # Recorded before the manifest is posted: a requester can fetch everything and
            # delete the keys before this thread runs another line.
            with self._fetch_lock:
                self._fetching[k] = (time.monotonic(), requester, False)
        try:
            state = self._snapshot()
            if self._cache is None or self._cache[0] != state.round:
                self._cache = (state.round, state.to_bytes())
            data = self._cache[1]
            chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
            for i, c in enumerate(chunks):
                self._store.set(f"state/resp/{k}/{i}", c)
            manifest = {"round": state.round, "size": len(data), "chunks": len(chunks), "sha256": digest(data)}
            with self._fetch_lock:  # posted: from now on, the manifest's presence says "still downloading"
                if joiner:
                    self._fetching[k] = (self._fetching[k][0], requester, True)
                self._store.set(f"state/resp/{k}/meta", json.dumps(manifest))
        except BaseException:
            with self._fetch_lock:
                self._fetching.pop(k, None)
            raise
        self._served.append((time.monotonic(), k, len(chunks)))
        self.requests_served += 1
        self.serve_seconds += time.monotonic() - t0
        log.info("served state of round %d (%.1f MB) in %.2fs", state.round, len(data) / 1e6, time.monotonic() - t0)

    def downloads(self, max_age: float = 120.0) -> tuple[int, set[str]]:
        """(joiners' downloads of a state this server posted still in progress, peer ids of the
        joiners that finished within `max_age` seconds; observers are not counted). The requester deletes a response's keys once it
        has fetched it all, so a manifest still in the store is a download in progress."""
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

    def _cleanup(self) -> None:
        """Free responses older than _KEEP_RESPONSES_S (their requester took them or died)."""
        now = time.monotonic()
        while self._served and now - self._served[0][0] > _KEEP_RESPONSES_S:
            _, k, n = self._served.pop(0)
            for key in [f"state/req/{k}", f"state/resp/{k}/meta", *(f"state/resp/{k}/{i}" for i in range(n))]:
                self._store.delete_key(key)


def fetch_state(donor: PeerRecord, *, fingerprint: str, numel: int | None, timeout: float,
                connect_timeout: float = 5.0, requester: str = "") -> SwarmState:
    """Download and verify one donor's state. Raises StateError on any failure.

    A donor that is gone (its record has not expired yet) fails within `connect_timeout`.
    """
    name = f"peer {donor.peer_id[-8:]} ({donor.host}:{donor.port})"
    try:
        store = TCPStore(donor.host, donor.port, is_master=False, timeout=timedelta(seconds=min(connect_timeout, timeout)))
        store.set_timeout(timedelta(seconds=timeout))
        k = store.add("state/req", 1)
        store.set(f"state/req/{k}", requester or OBSERVER)  # who asks: the donor waits for a joiner in its next round
        store.wait([f"state/resp/{k}/meta"], timedelta(seconds=timeout))
        meta = json.loads(store.get(f"state/resp/{k}/meta"))
        n, size = int(meta["chunks"]), int(meta["size"])
        # Bounded: θ and momentum in fp32 plus a little framing; nothing larger is ever read.
        limit = (1 << 40) if numel is None else 8 * numel + (1 << 20)
        if not (0 < n <= 1 + size // CHUNK and size <= limit):
            raise StateError(f"{name} sent an implausible manifest: {meta}")
        data = b"".join(store.get(f"state/resp/{k}/{i}") for i in range(n))
        for key in [f"state/req/{k}", f"state/resp/{k}/meta", *(f"state/resp/{k}/{i}" for i in range(n))]:
            store.delete_key(key)
    except (RuntimeError, ValueError, KeyError, TypeError, OverflowError) as e:  # OverflowError: int(inf) in a manifest
        raise StateError(f"download from {name} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if len(data) != size or digest(data) != meta.get("sha256"):
        raise StateError(f"download from {name} is corrupt (size or sha256 mismatch)")
    return SwarmState.from_bytes(data, source=f"state from {name}", fingerprint=fingerprint, numel=numel)


def download_state(
    donors: Sequence[PeerRecord], *, fingerprint: str, numel: int | None, timeout: float = 30.0, requester: str = ""
) -> SwarmState:
    """Fetch the newest state from the first donor that delivers a verified copy.

    A state is accepted only if its θ_sync digest equals the digest that its donors
    announced for that round in the DHT.
    """
    if not donors:
        raise StateError("no peer to download the state from")
    announced: dict[int, set[str]] = {}
    for d in donors:
        announced.setdefault(d.round, set()).add(d.digest)
    errors = []
    for donor in sorted(donors, key=lambda d: -d.round):
        try:
            state = fetch_state(donor, fingerprint=fingerprint, numel=numel, timeout=timeout, requester=requester)
        except StateError as e:
            errors.append(str(e))
            log.warning("%s; trying another peer", e)
            continue
        if tensor_digest(state.theta_sync) not in announced.get(state.round, set()):
            errors.append(f"state of round {state.round} from {donor.peer_id[-8:]} does not match any announced digest")
            continue
        return state
    raise StateError(f"could not download the swarm state from {len(donors)} peer(s): {errors[-1]}")
