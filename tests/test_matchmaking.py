"""Matchmaking when peers' views of the DHT differ: a peer that misses the earliest
candidate's declaration elects the next one, who follows the earliest itself; it must be
sent on to the earliest and join the same group, not wait out the window and fail.

Views differ in real swarms when records are spread over several DHT nodes and a read
misses one of them; here the difference is injected at the seam the matchmaker reads
through (its DHT's `aget_signed`), on real DHT nodes and real TCPStores on 127.0.0.1."""
from __future__ import annotations

import threading

import pytest

from averaging import MatchmakingConfig, SwarmDHT
from averaging.errors import MatchmakingError
from averaging.matchmaking import Candidate, Group, Matchmaker

from .conftest import wait_for

RUN, FP, ROUND = "mm-views", "fp", 0


class PartialView:
    """A SwarmDHT whose reads never return the records of the peers in `hidden`."""

    def __init__(self, dht: SwarmDHT, hidden: set[str]) -> None:
        self._dht, self._hidden = dht, hidden

    def __getattr__(self, name: str):
        return getattr(self._dht, name)

    async def aget_signed(self, name: str) -> dict:
        return {pid: rec for pid, rec in (await self._dht.aget_signed(name)).items() if pid not in self._hidden}


class Attempts:
    """`form_group` for several matchmakers at once, each in a thread of its own."""

    def __init__(self, mms: list[Matchmaker], expected: int) -> None:
        self.mms, self.expected = mms, expected
        self.groups: dict[int, Group] = {}
        self.errors: dict[int, Exception] = {}
        self.threads: list[threading.Thread] = []

    def _run(self, i: int) -> None:
        try:
            self.groups[i] = self.mms[i].form_group(ROUND, FP, lambda: self.expected)
        except Exception as e:  # noqa: BLE001 - reported by wait()
            self.errors[i] = e

    def start(self, i: int) -> None:
        self.threads.append(threading.Thread(target=self._run, args=(i,), daemon=True))
        self.threads[-1].start()

    def wait(self) -> dict[int, Group]:
        """Every attempt's group; fails if any attempt failed (or is still running after 60 s)."""
        for t in self.threads:
            t.join(timeout=60)
        assert not self.errors and not any(t.is_alive() for t in self.threads), self.errors
        return self.groups


def _declared(dht: SwarmDHT, peer_id: str) -> bool:
    """Whether `peer_id` is a candidate for ROUND in `dht`'s view."""
    return Candidate.from_record(peer_id, dht.get_signed(f"mm.{FP}.{ROUND}").get(peer_id)) is not None


@pytest.mark.timeout(90)
def test_a_peer_that_misses_the_earliest_candidate_is_redirected_into_its_group():
    boot = SwarmDHT.start(RUN, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dhts = [SwarmDHT.start(RUN, initial_peers=boot.visible_maddrs()[:1], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
            for _ in range(3)]
    first, second, third = dhts  # declare in this order: first is the rightful leader
    cfg = MatchmakingConfig(window=20, join_timeout=5)
    views = [first, second, PartialView(third, {first.peer_id})]  # third never sees first's declaration
    mms = [Matchmaker(v, listen_host="127.0.0.1", announce_host="127.0.0.1", cfg=cfg) for v in views]  # type: ignore[arg-type]
    attempts = Attempts(mms, expected=3)
    try:
        for i in range(3):  # each declares only once the one before it is visible
            attempts.start(i)
            wait_for(lambda: _declared(boot, dhts[i].peer_id), 20, f"peer {i}'s declaration")
        groups = attempts.wait()
        members = {groups[i].members for i in range(3)}
        assert len(members) == 1, members  # one group
        (group,) = members
        assert set(group) == {d.peer_id for d in dhts}
        assert all(groups[i].leader == first.peer_id for i in range(3))
    finally:
        for m in mms:
            m.close()
        for d in [*dhts, boot]:
            d.shutdown()


@pytest.mark.timeout(90)
def test_a_failed_attempt_does_not_lure_the_next_peers_into_its_dead_group():
    """A peer whose attempt at a round failed (it was alone) leaves its declaration in the DHT
    until the record expires. Peers that arrive at the same round right after must not elect
    that dead declaration (its group is closed, or nobody answers under it) and fail their own
    round too: found in the chaos test, where 4 peers retrying one round every ~15 s kept
    electing each other's previous attempts and failed 20 rounds in a row."""
    boot = SwarmDHT.start(RUN, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dhts = [SwarmDHT.start(RUN, initial_peers=boot.visible_maddrs()[:1], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
            for _ in range(3)]
    cfg = MatchmakingConfig(window=4, join_timeout=5)
    mms = [Matchmaker(d, listen_host="127.0.0.1", announce_host="127.0.0.1", cfg=cfg) for d in dhts]
    try:
        with pytest.raises(MatchmakingError, match="only 1 peer"):  # alone: its attempt fails
            mms[0].form_group(ROUND, FP, lambda: 1 + 1)
        withdrawn = not _declared(boot, dhts[0].peer_id)  # checked below, after what a user sees
        attempts = Attempts(mms, expected=2)
        attempts.start(1)
        attempts.start(2)
        groups = attempts.wait()
        assert groups[1].members == groups[2].members and set(groups[1].members) == {dhts[1].peer_id, dhts[2].peer_id}
        assert withdrawn  # how: the failed attempt withdrew its declaration
    finally:
        for m in mms:
            m.close()
        for d in [*dhts, boot]:
            d.shutdown()
