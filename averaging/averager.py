"""One sync round from the averaging layer's point of view: matchmaking, then all-reduce.

This layer knows nothing about models or training: it averages a flat vector, weighted,
with whoever is at the same round, and says honestly whether it worked.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from typing import Awaitable, Callable

import torch

from .allreduce import Compression, RoundResult, weighted_allreduce
from .config import AveragerConfig, MatchmakingConfig  # noqa: F401  (re-exported)
from .dht import SwarmDHT
from .errors import MatchmakingError
from .faults import Tamper
from .hierarchy import hierarchical_allreduce
from .identity import short_id
from .matchmaking import Group, Matchmaker, resolve_size
from .relay import client_round, collect_clients, publish_to_clients
from .robust import AggregatorConfig  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


class Averager:
    """Averages flat tensors with the swarm. Lifecycle: construct, `average()` per round, `close()`."""

    def __init__(self, dht: SwarmDHT, cfg: AveragerConfig, *, tamper: Tamper | None = None) -> None:
        """`tamper`: fault injection for the hostile-peer tests only (see faults.py)."""
        self.dht = dht
        self.cfg = cfg
        self.tamper = tamper
        # Error-feedback state lives across rounds, one per stream: the fragments a streaming
        # peer syncs in turn each keep their own residual (peer.rounds, sync.fragments).
        self._compressions: dict[int, Compression] = {}
        self.strikes: Counter[str] = Counter()  # rounds in which a peer's contribution was rejected
        self.banned: set[str] = set()  # shared with the matchmaker: never grouped with again
        self.matchmaker = Matchmaker(
            dht, listen_host=cfg.listen_host, announce_host=cfg.announce_host, cfg=cfg.matchmaking,
            client_mode=cfg.client_mode, banned=self.banned, secret=cfg.secret,
        )

    def average(
        self, round_: int, fingerprint: str, delta: torch.Tensor, weight: float, expected_size: Callable[[], int],
        *, refill: Callable[[], object] | None = None, ready: Callable[[], Awaitable[object]] | None = None,
        stream: int = 0,
    ) -> RoundResult:
        """`average_async`, blocking the calling thread (which must not run an event loop)."""
        return asyncio.run(self.average_async(round_, fingerprint, delta, weight, expected_size, refill=refill,
                                              ready=ready, stream=stream))

    @property
    def compression(self) -> Compression:
        """The codec and error-feedback state of stream 0 (the whole vector, without fragments)."""
        return self.compression_of(0)

    def compression_of(self, stream: int) -> Compression:
        if stream not in self._compressions:
            self._compressions[stream] = Compression.named(self.cfg.codec.name, self.cfg.codec.error_feedback_decay)
        return self._compressions[stream]

    async def average_async(
        self, round_: int, fingerprint: str, delta: torch.Tensor, weight: float,
        expected_size: Callable[[], int | Awaitable[int]], *, refill: Callable[[], object] | None = None,
        ready: Callable[[], Awaitable[object]] | None = None, stream: int = 0,
    ) -> RoundResult:
        """Meet the peers at `round_` and average `delta` with them.

        Matchmaking awaits on the caller's loop; the all-reduce (gloo collectives, which block)
        runs in its executor. Cancelling the call during matchmaking leaves the round at once;
        an all-reduce already running ends within `allreduce_timeout` on its own.

        A member that dies or is cut off in the middle of the round does not cost the others
        the round (PCCL's rule): when the all-reduce of a group of 3 or more fails, the
        survivors meet again at once, under a key only that group's members know, and run the
        round among themselves (expecting one member fewer). Still honest: a round is
        `complete` only if every final member's contribution is in every part; the lost
        member's contribution is dropped, never half-applied. One retry, no more.

        In place (`refill` given): the round works in `delta` itself (fp32 [P], CPU) and needs
        no vector of its own; a complete round's `mean_delta` is `delta`, holding Δ̄. An attempt
        that fails may leave garbage there, so `refill()` (called in the executor) must write
        Δ into `delta` again before the retry. Without `refill`, `delta` is never modified.

        `ready`: `delta` is still being written (Δ computed while we meet the group, so that
        work hides behind matchmaking): awaited once a group has formed, before the first
        byte of `delta` is read. If matchmaking fails it is not awaited: the caller owns the
        writer and must let it finish before it reuses the buffer.

        `stream`: whose error-feedback residual a lossy codec uses (a streaming peer averages
        one fragment of its parameters per round, each with its own residual).

        Failure behaviour: never raises for network faults; returns a `failed` RoundResult
        within about 2 × (window + join_timeout + 2·allreduce_timeout) seconds.
        """
        t0 = time.monotonic()
        out = delta if refill is not None else None
        comp = self.compression_of(stream)
        result, group = await self._attempt(round_, fingerprint, delta, weight, expected_size, out, ready, comp)
        if not result.ok and group is not None and group.size >= 3 and not group.is_client:
            survivors = group.size - 1
            log.info("round %d: a member failed mid-round (%s); retrying at once with the others", round_, result.error)
            # The retry meets under the failed group's nonce (in its prefix "round/nonce/"): only
            # its members know it, and no stale declaration of the first attempt is in the way.

            async def fewer() -> int:
                return min(await resolve_size(expected_size), survivors)

            if refill is not None:
                await asyncio.to_thread(refill)
            retry, _ = await self._attempt(round_, f"{fingerprint}.retry-{group.prefix.split('/')[1]}", delta, weight,
                                           fewer, out, None, comp)
            result = dataclasses.replace(retry, bytes_sent=retry.bytes_sent + result.bytes_sent)
        # Report the whole round's duration, matchmaking (and a retry) included.
        return dataclasses.replace(result, duration_s=time.monotonic() - t0)

    async def _attempt(
        self, round_: int, topic: str, delta: torch.Tensor, weight: float,
        expected_size: Callable[[], int | Awaitable[int]], out: torch.Tensor | None = None,
        ready: Callable[[], Awaitable[object]] | None = None, comp: Compression | None = None,
    ) -> tuple[RoundResult, Group | None]:
        """One matchmaking (among the peers declaring `topic`) + all-reduce; the group, if one formed."""
        t0 = time.monotonic()
        try:
            group = await self.matchmaker.form_group_async(round_, topic, expected_size)
        except MatchmakingError as e:
            return RoundResult(round_, "failed", (self.dht.peer_id,), (), time.monotonic() - t0, 0, str(e)), None
        if ready is not None:  # the group waits for us here: Δ is (nearly) written by now
            await ready()
        result = await asyncio.to_thread(self._reduce, group, delta, weight, out, comp or self.compression)
        self._strike(result)
        return dataclasses.replace(result, transfer_s=result.duration_s), group

    def _reduce(self, group: Group, delta: torch.Tensor, weight: float, out: torch.Tensor | None = None,
                comp: Compression | None = None) -> RoundResult:
        """The all-reduce of a formed group (blocking: gloo collectives and store waits)."""
        timeout = self.cfg.allreduce.timeout
        need = self.cfg.aggregator.min_members
        if not group.is_client and group.size < need:
            # A leader with other settings (or other code) formed a group too small for our
            # aggregator to outvote one bad member: averaging in it would silently be `mean`.
            msg = f"group of {group.size} is too small for {self.cfg.aggregator.name} (needs {need})"
            log.warning("round %d: %s; not averaging", group.round, msg)
            return RoundResult(group.round, "failed", group.members, (), 0.0, 0, msg)
        if group.is_client:
            return client_round(group, self.dht.peer_id, delta, weight, timeout_s=2 * timeout + self.cfg.matchmaking.join_timeout)
        if group.clients:  # we lead and relay for peers behind NAT
            uploads = collect_clients(group, delta.numel(), timeout_s=self.cfg.matchmaking.join_timeout)
            total = weight + sum(w for _, w, _ in uploads)
            combined = (delta.detach().reshape(-1).cpu().float() * weight + sum(x for _, _, x in uploads)) / total
            result = self._allreduce(group, combined, total, comp=comp)
            included = [pid for pid, _, _ in uploads]
            # Report the clients whose contributions went in as members of the round.
            result = dataclasses.replace(result, members=result.members + tuple(included),
                                         mean_delta=None if result.mean_delta is None else result.mean_delta.to(delta.device))
            publish_to_clients(group, result, included)
            return result
        return self._allreduce(group, delta, weight, out, comp=comp)

    def _allreduce(self, group: Group, delta: torch.Tensor, weight: float, out: torch.Tensor | None = None, *,
                   comp: Compression | None = None) -> RoundResult:
        comp = comp or self.compression
        cap = max(2, self.cfg.matchmaking.max_group_size)  # a "subgroup" of 1 would average nothing
        if group.size > cap:  # more peers than one group holds: subgroups, combined exactly
            return hierarchical_allreduce(group, delta, weight, cap=cap, host=self.cfg.announce_host,
                                          timeout_s=self.cfg.allreduce.timeout, codec=comp,
                                          aggregator=self.cfg.aggregator, trusted=self.cfg.allreduce.trusted, tamper=self.tamper,
                                          secret=self.cfg.secret)
        return weighted_allreduce(group, delta, weight, host=self.cfg.announce_host, timeout_s=self.cfg.allreduce.timeout,
                                  codec=comp, aggregator=self.cfg.aggregator, trusted=self.cfg.allreduce.trusted,
                                  tamper=self.tamper, secret=self.cfg.secret, out=out)

    def _strike(self, result: RoundResult) -> None:
        """One strike per round against each peer whose contribution this peer rejected."""
        for pid in {pid for pid, _ in result.rejected if pid != self.dht.peer_id}:
            self.strike(pid, "; ".join(sorted({why for p, why in result.rejected if p == pid})))

    def strike(self, pid: str, why: str) -> None:
        """Count one offence by `pid` (a rejected contribution, a state claim no download backed);
        `ban_after` strikes and it is banned: never grouped with again in this run."""
        self.strikes[pid] += 1
        if self.strikes[pid] >= self.cfg.allreduce.ban_after and pid not in self.banned:
            self.banned.add(pid)
            log.warning("banned peer %s for the rest of the run: %d strikes (last: %s)", short_id(pid), self.strikes[pid], why)

    def reset_compression(self) -> None:
        """Forget error-feedback residuals (after adopting a downloaded state they are stale)."""
        self._compressions.clear()

    def close(self) -> None:
        self.matchmaker.close()
