"""Matchmaking: peers at the same sync round agree on a group, with no fixed coordinator.

Protocol, for round r (every peer runs the same code):
1. Declare: store (host, port, arrival time t, nonce) in the DHT under mm.<fingerprint>.<r>.
   The fingerprint is the model schema's hash, so incompatible models never meet.
2. Elect: the leader is the candidate with the smallest (t, peer_id): the earliest
   arrival. Later arrivals therefore always pick a peer that is already waiting, and the
   choice is the same on every peer that sees the same records.
3. Join: a follower connects to the leader's TCPStore (every peer runs one), takes a slot
   with an atomic counter, and writes its id into it. The leader closes the group once
   every expected peer has joined, or when its window ends, and publishes the member list.
4. Race repair: two peers arriving together may both think they are first (the DHT is
   eventually consistent). A leader that later sees an earlier candidate dissolves its
   group by publishing a redirect; its followers, and itself, follow the earlier leader.
   Redirects only ever point to a strictly earlier (t, id), so this terminates.
5. Withdraw: a peer whose attempt fails overwrites its declaration with a tombstone, and
   candidates whose window has ended are not elected, so the peers arriving next never
   elect an attempt that is over (and a leader that closed with too few peers is skipped).

The group's leader then hosts the rendezvous for the round's gloo process group, so a
different peer coordinates each round and none is special.

Failure behaviour: every wait is bounded by the window plus `join_timeout`. A leader that
is unreachable or silent is excluded and the election is rerun. If no group of at least
`min_group_size` forms before the window ends, `form_group` raises MatchmakingError and
the caller keeps training and retries later.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Awaitable, Callable, Iterator

from torch.distributed import Store, TCPStore

from .access import Credential
from .config import MatchmakingConfig
from .dht import SwarmDHT, dht_time
from .errors import MatchmakingError
from .identity import short_id

log = logging.getLogger(__name__)

_POLL_S = 0.05  # how often a leader checks its join counter
# Most members one round's group admits (a bound against a flood of joins, not a tuning knob:
# max_group_size sets the size of the subgroups that actually all-reduce together).
MAX_MEMBERS = 1024
_RESCAN_S = 0.5  # how often a leader re-reads the DHT (for earlier candidates and expected size)


@dataclass(frozen=True, order=True)
class Candidate:
    """A peer's declaration for one round. Ordering = election order (earliest first)."""

    t: float
    peer_id: str
    host: str = field(compare=False)
    port: int = field(compare=False)
    nonce: str = field(compare=False)

    def to_record(self) -> dict[str, Any]:
        return {"t": self.t, "host": self.host, "port": self.port, "nonce": self.nonce}

    @classmethod
    def from_record(cls, peer_id: str, rec: Any) -> "Candidate | None":
        """Parse an untrusted DHT record; None if malformed."""
        if not isinstance(rec, dict):
            return None
        t, host, port, nonce = rec.get("t"), rec.get("host"), rec.get("port"), rec.get("nonce")
        try:
            t_ok = _is_number(t) and math.isfinite(t)
        except OverflowError:  # an int beyond float range (JSON can carry one)
            return None
        if not (t_ok and isinstance(host, str) and isinstance(nonce, str)):
            return None
        if not (isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536 and 0 < len(host) <= 255 and 0 < len(nonce) <= 64):
            return None
        return cls(float(t), peer_id, host, port, nonce)


@dataclass(frozen=True)
class Group:
    """The outcome of matchmaking: who averages together this round, and where they meet."""

    round: int
    members: tuple[str, ...]  # peer ids in rank order; the leader is rank 0
    rank: int  # this peer's rank
    prefix: str  # store namespace unique to this group
    store: Store = field(compare=False, repr=False)  # the leader's store (a client for followers)
    leader: str = ""
    # Peers behind NAT that cannot accept connections: they hand their contribution to the
    # leader, who averages on their behalf. A client itself gets rank -1.
    clients: tuple[str, ...] = ()

    @property
    def is_client(self) -> bool:
        return self.rank < 0

    @property
    def size(self) -> int:
        return len(self.members)


class _Redirect(Exception):
    def __init__(self, target: Candidate) -> None:
        self.target = target


class Matchmaker:
    """Forms groups for sync rounds. Owns a TCPStore server that it serves as a leader.

    Lifecycle: construct, call `form_group` once per sync attempt, `close()` at the end.
    """

    def __init__(
        self, dht: SwarmDHT, *, listen_host: str, announce_host: str, cfg: MatchmakingConfig, client_mode: bool = False,
        banned: set[str] | None = None, secret: Credential | None = None,
    ) -> None:
        self.dht = dht
        self.cfg = cfg
        # Private run: joins and member lists carry HMAC tags that only members can compute.
        self.secret = secret
        # Peers this node refuses to group with (shared with the averager, which bans them).
        self.banned: set[str] = banned if banned is not None else set()
        self.announce_host = announce_host
        self.client_mode = client_mode
        # A TCPStore master is a small C++ server thread; port 0 lets the OS pick a port.
        # A client-mode peer (behind NAT) never listens: it only ever follows.
        self._server = None if client_mode else TCPStore(
            listen_host, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=cfg.join_timeout)
        )
        self.port: int = self._server.port if self._server is not None else 0

    @property
    def store(self) -> Store | None:
        """This peer's store server (None in client mode)."""
        return self._server

    def close(self) -> None:
        """Stop serving as a leader. Idempotent."""
        self._server = None  # type: ignore[assignment]  # the C++ server stops when released

    # ---------------------------------------------------------------- public
    def form_group(self, round_: int, fingerprint: str, expected_size: Callable[[], int | Awaitable[int]]) -> Group:
        """`form_group_async`, blocking the calling thread (which must not run an event loop)."""
        return asyncio.run(self.form_group_async(round_, fingerprint, expected_size))

    async def form_group_async(self, round_: int, fingerprint: str, expected_size: Callable[[], int | Awaitable[int]]) -> Group:
        """Meet the other peers at `round_` and return the agreed group.

        `expected_size()` returns how many live peers are expected at this round (self
        included); the leader stops waiting once that many have joined. Every wait is an
        await on the caller's loop; blocking store calls to another peer run in its executor.

        Failure: raises MatchmakingError within `window + 2 * join_timeout` seconds if no group
        of at least `min_group_size` peers forms (the last `join_timeout` bounds withdrawing
        the declaration). Cancellable at any wait (a follower's
        slot is then left empty, which its leader skips after `join_timeout`).
        """
        key = f"mm.{fingerprint}.{round_}"
        me = Candidate(dht_time(), self.dht.peer_id, self.announce_host, self.port, uuid.uuid4().hex[:16])
        if self.client_mode:  # clients are never elected, so they do not declare
            return await self._elect(round_, key, me, expected_size)
        # Signed under our owner subkey: a candidate's peer id is proven by its key, so nobody can
        # declare (or be elected) under another peer's id.
        await self.dht.aput_signed(key, me.to_record(), ttl=self._ttl)
        try:
            return await self._elect(round_, key, me, expected_size)
        except BaseException:
            # Withdraw the declaration of a failed (or cancelled) attempt. Left in place, it
            # outlives the attempt by up to its TTL, and peers arriving at this round meanwhile
            # elect it and join a group that is closed or that nobody serves: they fail too,
            # and, retrying at a similar rhythm, elect each other's dead attempts round after
            # round (seen in the chaos test: 4 live peers, 20 failed rounds). The tombstone
            # lives as long as a declaration, since a DHT value is replaced only by one that
            # expires later; the next attempt's declaration replaces it in turn.
            with contextlib.suppress(Exception):  # best effort: stale candidates are also filtered by age
                await asyncio.wait_for(self.dht.aput_signed(key, {"withdrawn": me.nonce}, ttl=self._ttl),
                                       self.cfg.join_timeout)
            raise

    @property
    def _ttl(self) -> float:
        return self.cfg.window + 2 * self.cfg.join_timeout

    async def _elect(self, round_: int, key: str, me: Candidate, expected_size: Callable[[], int | Awaitable[int]]) -> Group:
        """Elect a leader among the round's candidates and lead or follow it, until a group forms
        or the window ends (MatchmakingError)."""
        deadline = time.monotonic() + self.cfg.window
        excluded: set[str] = set()
        hint: Candidate | None = None  # a redirect target we may not see in the DHT yet
        last_error = "no other peer arrived"
        while time.monotonic() < deadline:
            # A candidate whose window ended (with a margin for clock skew) no longer leads anything:
            # its group has closed, or its attempt failed and its withdrawal has not reached us.
            fresh_after = dht_time() - self.cfg.window - self.cfg.join_timeout
            cands = {c.peer_id: c for c in await self._candidates(key) if c.t >= fresh_after}
            if not self.client_mode:
                cands[me.peer_id] = me
            if hint is not None:
                cands.setdefault(hint.peer_id, hint)
            live = [c for pid, c in cands.items()
                    if pid == me.peer_id or (pid not in excluded and pid not in self.banned)]
            if not live:  # a client waits for a peer that can lead
                await asyncio.sleep(_RESCAN_S)
                continue
            leader = min(live)
            try:
                if leader.peer_id == me.peer_id:
                    return await self._lead(round_, key, me, expected_size, deadline, excluded)
                with self._pointing_to(round_, me, leader):
                    return await self._follow(round_, leader, me, deadline)
            except _Redirect as r:
                hint = r.target
                last_error = f"redirected to {short_id(r.target.peer_id)}"
            except _Unreachable as u:  # _Closed included
                excluded.add(leader.peer_id)
                last_error = str(u)
        raise MatchmakingError(f"no group formed for round {round_} within {self.cfg.window:.0f}s ({last_error})")

    # ---------------------------------------------------------------- roles
    async def _candidates(self, key: str) -> list[Candidate]:
        out = []
        for pid, rec in (await self.dht.aget_signed(key)).items():
            c = Candidate.from_record(pid, rec)
            if c is not None:
                out.append(c)
        return out

    async def _lead(
        self, round_: int, key: str, me: Candidate, expected_size: Callable[[], int | Awaitable[int]], deadline: float, excluded: set[str]
    ) -> Group:
        """Wait for joins, then publish the member list (or a redirect to an earlier leader)."""
        store = self._server
        prefix = f"{round_}/{me.nonce}/"
        expected = max(1, await resolve_size(expected_size))
        next_scan = time.monotonic() + _RESCAN_S
        while True:
            joined = store.add(prefix + "n", 0)
            # Everyone expected is admitted: a round with more than max_group_size members
            # reduces in subgroups (hierarchy.py), so nobody is left out for lack of room.
            target = min(expected, MAX_MEMBERS)
            if joined + 1 >= target and joined + 1 >= self.cfg.min_group_size:
                # Re-read once before closing: a peer that has just caught up with this state (or
                # is downloading it) may have appeared since the last scan; then keep waiting for it.
                expected = max(1, await resolve_size(expected_size))
                if joined + 1 >= min(expected, MAX_MEMBERS):
                    break
            if time.monotonic() >= deadline:
                break
            if time.monotonic() >= next_scan:
                next_scan = time.monotonic() + _RESCAN_S
                expected = max(1, await resolve_size(expected_size))
                earlier = [c for c in await self._candidates(key) if c < me and c.peer_id not in excluded
                           and c.peer_id not in self.banned]
                if earlier:
                    # Two leaders raced; the earlier one wins. Tell our followers where to go.
                    target_c = min(earlier)
                    self._reply(store, prefix, {"redirect": {"peer_id": target_c.peer_id, **target_c.to_record()}})
                    raise _Redirect(target_c)
            await asyncio.sleep(_POLL_S)

        # Close: later joiners will find themselves missing from the list and retry later.
        n = store.add(prefix + "n", 0)
        members, clients = [me.peer_id], []
        slots_by = time.monotonic() + self.cfg.join_timeout  # one bound for all slots, however many were taken
        for slot in range(1, min(n, MAX_MEMBERS - 1) + 1):
            try:
                # Our own store (a local server): check() is quick, and the wait is an await.
                if not await _until(lambda: store.check([f"{prefix}slot/{slot}"]), slots_by):
                    raise RuntimeError("the joiner never wrote its slot")
                rec = json.loads(store.get(f"{prefix}slot/{slot}"))
            except (RuntimeError, ValueError) as e:  # joiner died between add() and set()
                log.debug("slot %d of round %d unusable: %s", slot, round_, e)
                continue
            pid = rec.get("peer_id") if isinstance(rec, dict) else None
            if isinstance(pid, str) and self.secret is not None and not self.secret.verify_hex(rec.get("auth"), pid, "join", prefix, pid):
                log.warning("round %d: refused peer %s: no valid credential for this private run", round_, short_id(pid))
                continue
            if isinstance(pid, str) and pid in self.banned:
                log.info("round %d: refused banned peer %s", round_, short_id(pid))
                continue
            if isinstance(pid, str) and pid not in members and pid not in clients:
                (clients if rec.get("client") is True else members).append(pid)
        if len(members) + len(clients) < self.cfg.min_group_size:
            self._reply(store, prefix, {"closed": "too few peers"})
            raise MatchmakingError(
                f"round {round_}: only {len(members) + len(clients)} peer(s) arrived within {self.cfg.window:.0f}s "
                f"(need {self.cfg.min_group_size})"
            )
        self._reply(store, prefix, {"members": members, "clients": clients})
        log.debug("round %d: leading group of %d (+%d clients)", round_, len(members), len(clients))
        return Group(round_, tuple(members), 0, prefix, store, leader=me.peer_id, clients=tuple(clients))

    @contextlib.contextmanager
    def _pointing_to(self, round_: int, me: Candidate, leader: Candidate) -> Iterator[None]:
        """While this peer follows `leader`, its own store answers anyone who joins *it* with a
        redirect to `leader`.

        Why: views of the DHT differ. When records are spread over several DHT nodes (peers
        whose nodes reach each other), a read may miss a declaration for a whole round, so a
        peer that does not see the earliest candidate E elects the next one, X, who does see E
        and follows it. Without an answer from X, that peer would wait out X's window ("did
        not close its group") and every such peer would fail the round: with views that
        stay different, round after round. With it, the redirect, always to a strictly
        earlier candidate, brings them to E. Kept if the follow succeeds (a late peer is then
        sent to a group that has closed, and retries); removed if it does not, so that this
        peer can still lead under the same prefix."""
        prefix = f"{round_}/{me.nonce}/"
        store = self._server
        if store is not None:
            self._reply(store, prefix, {"redirect": {"peer_id": leader.peer_id, **leader.to_record()}})
        ok = False
        try:
            yield
            ok = True
        finally:
            if store is not None and not ok:
                store.delete_key(prefix + "members")

    def _reply(self, store: Store, prefix: str, reply: dict[str, Any]) -> None:
        """Publish the leader's reply to its followers (tagged in a private run)."""
        if self.secret is not None:
            reply = {**reply, "auth": self.secret.sign_hex("reply", prefix, json.dumps(reply, sort_keys=True))}
        store.set(prefix + "members", json.dumps(reply))

    async def _follow(self, round_: int, leader: Candidate, me: Candidate, deadline: float) -> Group:
        """Join `leader`'s group; return it, or raise _Redirect / _Unreachable / MatchmakingError.
        Every call to the leader's store blocks (bounded by `join_timeout`), so each runs in
        the loop's executor; the wait for the member list is polled from the loop."""
        prefix = f"{round_}/{leader.nonce}/"
        timeout = timedelta(seconds=self.cfg.join_timeout)
        join = {"peer_id": me.peer_id, "client": self.client_mode}
        if self.secret is not None:
            join["auth"] = self.secret.sign_hex("join", prefix, me.peer_id)

        def take_slot() -> tuple[Store, int]:
            store = TCPStore(leader.host, leader.port, is_master=False, timeout=timeout)
            slot = store.add(prefix + "n", 1)
            store.set(f"{prefix}slot/{slot}", json.dumps(join))
            return store, slot

        try:
            store, slot = await asyncio.to_thread(take_slot)
        except RuntimeError as e:  # torch raises DistStoreError / DistNetworkError, both RuntimeErrors
            raise _Unreachable(f"leader {short_id(leader.peer_id)} at {leader.host}:{leader.port} unreachable: {e}") from e
        # The leader closes at the latest at its own arrival + window; allow for clock skew.
        wait_s = max(self.cfg.join_timeout, leader.t + self.cfg.window - dht_time() + self.cfg.join_timeout)
        try:
            if not await _until(lambda: store.check([prefix + "members"]), time.monotonic() + wait_s, blocking=True):
                raise RuntimeError(f"no member list within {wait_s:.0f}s")
            reply = json.loads(await asyncio.to_thread(store.get, prefix + "members"))
        except (RuntimeError, ValueError) as e:
            raise _Unreachable(f"leader {short_id(leader.peer_id)} did not close its group: {e}") from e
        if self.secret is not None and not (isinstance(reply, dict) and self.secret.verify_hex(
                reply.pop("auth", None), leader.peer_id, "reply", prefix, json.dumps(reply, sort_keys=True))):
            raise _Unreachable(f"leader {short_id(leader.peer_id)}'s reply is not authenticated for this private run")
        if isinstance(reply, dict) and isinstance(reply.get("redirect"), dict):
            r = reply["redirect"]
            target = Candidate.from_record(str(r.get("peer_id", "")), r)
            if target is None or not target < leader:
                raise _Unreachable(f"leader {short_id(leader.peer_id)} sent an invalid redirect")
            # Give the slot back: if this peer leads later under the same prefix (its own follow
            # failed), a slot left holding our id would put us in a group we are not in.
            with contextlib.suppress(RuntimeError):  # best effort: the redirect stands either way
                await asyncio.to_thread(store.set, f"{prefix}slot/{slot}", json.dumps({"withdrawn": True}))
            raise _Redirect(target)
        if isinstance(reply, dict) and reply.get("closed") is not None:  # the leader failed its own attempt: elect again
            raise _Closed(f"leader {short_id(leader.peer_id)} closed its group: {str(reply['closed'])[:80]}")
        members = reply.get("members") if isinstance(reply, dict) else None
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            reason = reply.get("closed", "malformed member list") if isinstance(reply, dict) else "malformed reply"
            raise MatchmakingError(f"round {round_}: leader {short_id(leader.peer_id)} closed its group: {reason}")
        clients = reply.get("clients", [])
        if not isinstance(clients, list) or not all(isinstance(c, str) for c in clients):
            raise MatchmakingError(f"round {round_}: leader {short_id(leader.peer_id)} sent a malformed client list")
        if me.peer_id in clients:
            return Group(round_, tuple(members), -1, prefix, store, leader=leader.peer_id, clients=tuple(clients))
        if me.peer_id not in members:
            raise MatchmakingError(f"round {round_}: arrived after the group of {short_id(leader.peer_id)} closed")
        return Group(round_, tuple(members), members.index(me.peer_id), prefix, store, leader=leader.peer_id,
                     clients=tuple(clients))


async def resolve_size(expected_size: Callable[[], int | Awaitable[int]]) -> int:
    """`expected_size` may be a plain function or a coroutine function (one that reads the DHT)."""
    n = expected_size()
    return await n if inspect.isawaitable(n) else n


async def _until(ready: Callable[[], bool], deadline: float, *, blocking: bool = False) -> bool:
    """Poll `ready()` every _POLL_S until it is true (True) or `deadline` passes (False).
    `blocking`: `ready` may block (a call to another peer's store), so it runs in the executor."""
    while True:
        if await asyncio.to_thread(ready) if blocking else ready():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_POLL_S)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class _Unreachable(Exception):
    """The chosen leader cannot be used; exclude it and elect again."""


class _Closed(_Unreachable):
    """The chosen leader's attempt failed (too few peers) and formed no group; elect again."""
