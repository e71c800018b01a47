"""A bootstrap node: a DHT node with a persistent identity that also watches the run.

It reads the peers' signed records every `poll_every` seconds (RunMonitor), keeps the
contribution ledger on disk, optionally serves the web dashboard, and optionally archives
the swarm's state (Archivist).
"""
from __future__ import annotations

import logging
import threading
import time

from averaging.access import Allowlist, load_credential
from averaging.dht import SwarmDHT
from averaging.errors import StateError
from averaging.identity import ensure_identity
from peer.fsutil import write_text_atomic
from peer.heartbeat import Heartbeat
from peer.loop import PeerLoop
from peer.membership import Rediscovery, record_validator

from .archive import Archivist
from .config import BootstrapConfig
from .dashboard import Dashboard
from .ledger import Ledger
from .monitor import RunMonitor

log = logging.getLogger("swarmtrain.bootstrap")


class BootstrapNode:
    """Lifecycle: `start()`, `serve(stop)` until the event is set, `close()`."""

    def __init__(self, cfg: BootstrapConfig) -> None:
        self.cfg = cfg
        self.dht: SwarmDHT | None = None
        self.archivist: Archivist | None = None
        self.monitor: RunMonitor | None = None
        self.dashboard: Dashboard | None = None
        self.rediscovery: Rediscovery | None = None
        self.loop: PeerLoop | None = None  # rediscovery, the archivist's announcer and state server run on it

    def start(self) -> list[str]:
        """Start the DHT node (and dashboard); return its multiaddrs.

        Raises StateError (bad identity or ledger file, left untouched) / NetworkError (port
        in use, unreachable initial peers), one line each. The ledger is read first, so a
        damaged one stops the node before it joins anything.
        """
        ledger = Ledger(self.cfg.ledger_path or None)
        if ledger.entries:
            log.info("ledger: %d contributor(s) loaded from %s", len(ledger.entries), self.cfg.ledger_path)
        peer_id, created = ensure_identity(self.cfg.identity)
        log.info("%s identity %s (%s)", "created" if created else "loaded", peer_id, self.cfg.identity)
        announce = [f"/ip4/{self.cfg.announce_host}/tcp/{self.cfg.port}"] if self.cfg.announce_host else []
        credential = load_credential(secret_file=self.cfg.secret_file, allowlist_file=self.cfg.allowlist_file)
        if isinstance(credential, Allowlist) and self.cfg.checkpoint_dir and not credential.allows(peer_id):
            # an archivist announces itself (a record under its key); an unlisted one would be refused by every node
            raise StateError(f"this archivist ({peer_id}) is not on the run's allowlist {self.cfg.allowlist_file}; "
                             "add its id there, or run without --checkpoint-dir")
        self.dht = SwarmDHT.start(
            self.cfg.run_id, initial_peers=self.cfg.initial_peers,
            host_maddrs=[f"/ip4/{self.cfg.host}/tcp/{self.cfg.port}"], announce_maddrs=announce,
            identity_path=self.cfg.identity, record_validators=[record_validator(self.cfg.run_id)], secret=credential,
        )
        maddrs = self.dht.visible_maddrs()
        self.loop = PeerLoop("bootstrap").start()
        self.rediscovery = Rediscovery(self.dht, initial=list(self.cfg.initial_peers), contacts_file=self.cfg.contacts_path)
        self.rediscovery.start(self.loop)
        self.monitor = RunMonitor(self.dht, self.cfg.run_id, ledger)
        if self.cfg.dashboard >= 0:
            self.dashboard = Dashboard(self.monitor, self.cfg.dashboard_host or self.cfg.host, self.cfg.dashboard)
            self.dashboard.start()
        if self.cfg.checkpoint_dir:
            host = self.cfg.announce_host or (self.cfg.host if self.cfg.host != "0.0.0.0" else "127.0.0.1")
            self.archivist = Archivist(self.dht, self.loop, ckpt_dir=self.cfg.checkpoint_dir, keep_last=self.cfg.keep_last,
                                       listen_host=self.cfg.host, announce_host=host)
        if self.cfg.maddrs_file:
            write_text_atomic(self.cfg.maddrs_file, "\n".join(maddrs) + "\n")  # a reader never sees half a file
        return maddrs

    def join_command(self, maddrs: list[str]) -> str:
        # Prefer a non-loopback address: that is what other machines can reach.
        best = next((m for m in maddrs if "/127.0.0.1/" not in m), maddrs[0])
        run = f" --swarm.run-id {self.cfg.run_id}" if self.cfg.run_id != "swarmtrain-demo" else ""
        return f"swarm-peer --join {best}{run}"

    def serve(self, stop: threading.Event) -> None:
        """Watch the run (and archive its state) periodically until `stop` is set.

        Failure behaviour: a failed DHT read or ledger write is logged and retried at the
        next period; the loop only ends when `stop` is set.
        """
        assert self.dht is not None and self.monitor is not None
        next_poll = next_status = next_archive = next_save = read_at = time.monotonic()
        # For a supervisor (the images' HEALTHCHECK, peer/heartbeat.py): unhealthy once the run's
        # records have not been read for max_gap (a DHT that stopped answering). A beat may be
        # late by an archivist's download.
        max_gap = max(120.0, 10 * self.cfg.poll_every)
        late = 60.0 + (4 * self.archivist.timeout if self.archivist is not None else 0.0)
        with Heartbeat.from_env("bootstrap") as heartbeat:
            while not stop.wait(min(self.cfg.poll_every, 1.0)):
                now = time.monotonic()
                heartbeat.beat(ok=now - read_at < max_gap, stale_after=late,
                               detail=f"run {self.cfg.run_id!r}: records read {now - read_at:.0f} s ago")
                if self.archivist is not None and now >= next_archive:
                    next_archive = now + self.cfg.archive_every
                    self.archivist.poll()
                if now >= next_poll:
                    next_poll = now + self.cfg.poll_every
                    try:
                        status = self.monitor.poll()
                    except Exception as e:  # hivemind surfaces pipe/daemon errors with many types; keep watching
                        log.warning("could not read the run's records: %s", e)
                        continue
                    read_at = now
                    if self.cfg.monitor_every and now >= next_status:
                        next_status = now + self.cfg.monitor_every
                        log.info("run %r: %s", self.cfg.run_id, status.line())
                if now >= next_save:
                    next_save = now + 10.0
                    self._save_ledger()

    def _save_ledger(self) -> None:
        if self.monitor is None:
            return
        try:
            self.monitor.save()
        except OSError as e:
            log.warning("could not save the ledger to %s: %s (will retry)", self.cfg.ledger_path, e)

    def close(self) -> None:
        """Stop the dashboard, archivist, event loop and DHT; save the ledger. Idempotent."""
        if self.dashboard is not None:
            self.dashboard.close()
            self.dashboard = None
        self._save_ledger()
        if self.archivist is not None:
            self.archivist.close()
            self.archivist = None
        if self.rediscovery is not None:
            self.rediscovery.close()
            self.rediscovery = None
        if self.loop is not None:
            self.loop.close()
            self.loop = None
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None
