"""State download: a donor that dies mid-download is replaced by the next one; bad data is refused."""
from __future__ import annotations

import json
import threading

import pytest
import torch
from torch.distributed import TCPStore

from averaging.errors import StateError
from averaging.flat import tensor_digest
from peer.loop import PeerLoop
from peer.membership import PeerRecord
from peer.state import SwarmState
from peer.transfer import StateServer, download_state


@pytest.fixture
def loop():
    """The event loop a state server runs on (a peer's own, in a real peer)."""
    lp = PeerLoop("test").start()
    yield lp
    lp.close()


def record(peer_id: str, store: TCPStore, state: SwarmState) -> PeerRecord:
    return PeerRecord(peer_id=peer_id, round=state.round, fingerprint=state.fingerprint, schema="s",
                      digest=tensor_digest(state.theta_sync), host="127.0.0.1", port=store.port)


def dying_donor(store: TCPStore, stop: threading.Event) -> None:
    """Answers the first request with a manifest and one chunk of three, then goes silent (as if killed)."""
    while not stop.is_set() and not store.check(["state/req/1"]):
        stop.wait(0.05)
    store.set("state/resp/1/0", b"x" * 10)
    store.set("state/resp/1/meta", json.dumps({"round": 5, "size": 3 << 20, "chunks": 3, "sha256": "0" * 64}))


@pytest.mark.timeout(60)
def test_donor_dying_mid_download_falls_back_to_next_donor(loop):
    state = SwarmState(5, "fp", torch.randn(1_000_000), torch.randn(1_000_000))
    a = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    b = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    stop = threading.Event()
    t = threading.Thread(target=dying_donor, args=(a, stop))
    t.start()
    good = StateServer(b, lambda: state)
    good.start(loop)
    try:
        # The dying donor is newest-first in the list (same round; listed first).
        got = download_state([record("dying", a, state), record("good", b, state)], fingerprint="fp",
                             numel=1_000_000, timeout=3)
        assert got.round == 5 and torch.equal(got.theta_sync, state.theta_sync)
        assert torch.equal(got.momentum_buf, state.momentum_buf)
        assert good.requests_served == 1
    finally:
        stop.set()
        t.join()
        good.close()


@pytest.mark.timeout(60)
def test_state_not_matching_announced_digest_is_refused(loop):
    real = SwarmState(2, "fp", torch.zeros(1000), None)
    forged = SwarmState(2, "fp", torch.ones(1000), None)  # what the donor actually serves
    s = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    server = StateServer(s, lambda: forged)
    server.start(loop)
    try:
        with pytest.raises(StateError, match="does not match any announced digest"):
            download_state([record("liar", s, real)], fingerprint="fp", numel=1000, timeout=3)
    finally:
        server.close()


@pytest.mark.timeout(60)
def test_donor_waits_for_a_joiner_but_not_for_an_archivist(loop):
    """A joiner's finished download is reported until it joins (the donor holds its next round
    for it); an observer's (the archivist's copy, every round) is never reported. Before, the
    archivist's copy held every donor 0.8 × the matchmaking window, every round."""
    state = SwarmState(3, "fp", torch.randn(1000), None)
    s = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    server = StateServer(s, lambda: state)
    server.start(loop)
    try:
        donor = [record("donor", s, state)]
        download_state(donor, fingerprint="fp", numel=1000, timeout=5)  # an archivist: no requester
        assert server.downloads() == (0, set())
        download_state(donor, fingerprint="fp", numel=1000, timeout=5, requester="QmJoiner")
        assert server.downloads() == (0, {"QmJoiner"})
        server.forget("QmJoiner")
        assert server.downloads() == (0, set())
        assert server.requests_served == 2
    finally:
        server.close()
