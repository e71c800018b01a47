"""The archivist: a bootstrap node that keeps the swarm's state on disk and serves it.

Every `every` seconds it looks at the peers' records; when the swarm has agreed on a newer
round (the majority θ_sync digest at the newest round), it downloads that state from a
trainer, verifies it against the announced digest, and saves it as a checkpoint (the last
K are kept). It announces itself with role "archivist": newcomers can download the state
from it, but matchmaking never waits for it. So a run survives even if every trainer
leaves: the next trainer to join continues from the archived round.
"""
from __future__ import annotations

import logging
from datetime import timedelta

from torch.distributed import TCPStore

from averaging.dht import SwarmDHT
from averaging.errors import StateError, StateMovedError
from averaging.flat import tensor_digest
from peer.loop import PeerLoop
from peer.membership import Announcer, PeerRecord, better_states, donors_for, live_peers
from peer.state import CheckpointDir, SwarmState
from peer.transfer import StateServer, download_state

log = logging.getLogger("swarmtrain.archivist")


class Archivist:
    """Lifecycle: construct (loads the newest checkpoint, starts serving it), `poll()` periodically, `close()`."""

    def __init__(self, dht: SwarmDHT, loop: PeerLoop, *, ckpt_dir: str, keep_last: int, listen_host: str, announce_host: str,
                 announce_period: float = 2.0, ttl: float = 10.0, timeout: float = 30.0) -> None:
        self.dht = dht
        self.ckpts = CheckpointDir(ckpt_dir, keep_last)
        self.announce_host = announce_host
        self.timeout = timeout
        self.state: SwarmState | None = None
        self._unbacked: set[tuple[str, int, str]] = set()  # (peer id, round, digest) claims no download backed
        self._digest_of: SwarmState | None = None  # the state whose digest _digest_value is
        self._digest_value = ""
        latest = self.ckpts.latest()
        if latest is not None:  # a damaged newest checkpoint is reported, never overwritten
            self.state = CheckpointDir.load(latest, fingerprint=None, numel=None)
            log.info("archive: loaded round %d from %s", self.state.round, latest)
        self._store = TCPStore(listen_host, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout))
        self._server = StateServer(self._store, lambda: self.state)  # type: ignore[arg-type,return-value]
        self._server.start(loop)
        self._announcer = Announcer(dht, period=announce_period, ttl=ttl)
        if self.state is not None:
            self._announce()
        self._announcer.start(loop)

    def _digest(self) -> str:
        """sha256 of the archived θ_sync, computed once per state (a 100M model takes ~1 s)."""
        assert self.state is not None
        if self._digest_of is not self.state:
            self._digest_of, self._digest_value = self.state, tensor_digest(self.state.theta_sync)
        return self._digest_value

    def _announce(self) -> None:
        assert self.state is not None
        self._announcer.update(PeerRecord(
            round=self.state.round, fingerprint=self.state.fingerprint, schema="archive",
            digest=self._digest(), host=self.announce_host, port=self._store.port,
            samples=0, role="archivist", version="archivist",
        ), now=True)

    def poll(self) -> bool:
        """Archive the swarm's newest agreed state if it is newer than ours. True if saved.

        Failure behaviour: a failed download is logged and retried at the next poll.
        """
        trainers = [r for r in live_peers(self.dht).values() if r.role == "trainer"
                    and (r.peer_id, r.round, r.digest) not in self._unbacked]
        mine = (self.state.round, self._digest()) if self.state is not None else (-1, "")
        # Newer states only, best supported first (one record claiming round 1023 is not the swarm).
        for top, digest, supporters in better_states(trainers, *mine):
            if top <= mine[0]:
                continue
            donors = donors_for(trainers, top, digest)
            try:
                state = download_state(donors, fingerprint=donors[0].fingerprint if donors else "", numel=None,
                                       timeout=self.timeout)
            except StateMovedError:  # the swarm moved on meanwhile: the next poll fetches the newer state
                return False
            except StateError as e:
                log.warning("archive: could not fetch round %d: %s", top, e)
                self._unbacked.update((pid, top, digest) for pid in supporters)
                continue
            break
        else:
            return False
        path = self.ckpts.save(state)
        self.state = state
        self._announce()
        log.info("archive: saved round %d to %s", state.round, path)
        return True

    def close(self) -> None:
        self._announcer.close()
        self._server.close()
