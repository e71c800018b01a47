"""A bootstrap node: a DHT node with a persistent identity that also watches the run.

It reads the peers' signed records every `poll_every` seconds (RunMonitor), keeps the
contribution ledger on disk, optionally serves the web dashboard, and optionally archives
the swarm's state (Archivist).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

from averaging.access import Allowlist, load_credential
from averaging.dht import SwarmDHT
from averaging.errors import StateError
from averaging.identity import ensure_identity
from peer.config import validate_multiaddr
from peer.configlib import doc
from peer.membership import record_validator

from .archive import Archivist
from .dashboard import Dashboard
from .ledger import Ledger
from .monitor import RunMonitor

log = logging.getLogger("swarmtrain.bootstrap")


@dataclass(kw_only=True)
class BootstrapConfig:
    identity: str = doc("bootstrap.key", "private key file; created on first start, reused after (keeps the address)")
    host: str = doc("0.0.0.0", "IP address to listen on")
    port: int = doc(31337, "TCP port to listen on (keep it fixed so the address stays the same; 0 = any)")
    announce_host: str = doc("", "public IP address to advertise, if different from the listen address")
    run_id: str = doc("swarmtrain-demo", "run to watch and to put in the printed join command")
    initial_peers: list[str] = doc([], "other bootstrap nodes or peers of the same swarm (optional)")
    monitor_every: float = doc(10.0, "seconds between status lines (0 = no status lines)")
    maddrs_file: str = doc("", "also write this node's multiaddrs to this file, one per line")
    checkpoint_dir: str = doc("", "archivist mode: keep the swarm's state here and serve it ('' = off)")
    keep_last: int = doc(5, "archivist: number of newest checkpoints to keep (0 = all)")
    archive_every: float = doc(5.0, "archivist: seconds between checks for a newer swarm state")
    dashboard: int = doc(-1, "serve the web dashboard, JSON API and /metrics on this port (0 = any free port, -1 = off)")
    dashboard_host: str = doc("", "address the dashboard listens on ('' = same as host)")
    ledger: str = doc("ledger.json", "contribution ledger file, kept across restarts, CSV export beside it ('' = memory only)")
    poll_every: float = doc(2.0, "seconds between reads of the peers' records (dashboard, ledger)")
    secret_file: str = doc("", "private run: file with the run's shared secret ('' = open run; create with `keygen`)")
    allowlist_file: str = doc("", "private run: file of the peer ids allowed to take part, one per line ('' = none); "
                                  "the node itself need not be listed: it only checks and stores others' records")

    def __post_init__(self) -> None:
        if self.secret_file and self.allowlist_file:
            raise ValueError("a private run uses secret_file or allowlist_file, not both")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.monitor_every < 0:
            raise ValueError(f"monitor_every must be >= 0, got {self.monitor_every}")
        for a in self.initial_peers:
            validate_multiaddr(a)
        if self.announce_host and self.port == 0:
            raise ValueError("announce_host needs a fixed --port (the advertised address must not change)")
        if self.keep_last < 0 or self.archive_every <= 0:
            raise ValueError("keep_last must be >= 0 and archive_every > 0")
        if not -1 <= self.dashboard < 65536:
            raise ValueError(f"dashboard must be a port in 0..65535, or -1 for off; got {self.dashboard}")
        if not self.poll_every > 0:
            raise ValueError(f"poll_every must be > 0, got {self.poll_every}")


class BootstrapNode:
    """Lifecycle: `start()`, `serve(stop)` until the event is set, `close()`."""

    def __init__(self, cfg: BootstrapConfig) -> None:
        self.cfg = cfg
        self.dht: SwarmDHT | None = None
        self.archivist: Archivist | None = None
        self.monitor: RunMonitor | None = None
        self.dashboard: Dashboard | None = None

    def start(self) -> list[str]:
        """Start the DHT node (and dashboard); return its multiaddrs.

        Raises StateError (bad identity or ledger file, left untouched) / NetworkError (port
        in use, unreachable initial peers), one line each. The ledger is read first, so a
        damaged one stops the node before it joins anything.
        """
        ledger = Ledger(self.cfg.ledger or None)
        if ledger.entries:
            log.info("ledger: %d contributor(s) loaded from %s", len(ledger.entries), self.cfg.ledger)
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
        self.monitor = RunMonitor(self.dht, self.cfg.run_id, ledger)
        if self.cfg.dashboard >= 0:
            self.dashboard = Dashboard(self.monitor, self.cfg.dashboard_host or self.cfg.host, self.cfg.dashboard)
            self.dashboard.start()
        if self.cfg.checkpoint_dir:
            host = self.cfg.announce_host or (self.cfg.host if self.cfg.host != "0.0.0.0" else "127.0.0.1")
            self.archivist = Archivist(self.dht, ckpt_dir=self.cfg.checkpoint_dir, keep_last=self.cfg.keep_last,
                                       listen_host=self.cfg.host, announce_host=host)
        if self.cfg.maddrs_file:
            tmp = f"{self.cfg.maddrs_file}.tmp"
            with open(tmp, "w") as f:  # atomic: a reader never sees half a file
                f.write("\n".join(maddrs) + "\n")
            os.replace(tmp, self.cfg.maddrs_file)
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
        next_poll = next_status = next_archive = next_save = time.monotonic()
        while not stop.wait(min(self.cfg.poll_every, 1.0)):
            now = time.monotonic()
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
            log.warning("could not save the ledger to %s: %s (will retry)", self.cfg.ledger, e)

    def close(self) -> None:
        """Stop the dashboard, archivist and DHT; save the ledger. Idempotent."""
        if self.dashboard is not None:
            self.dashboard.close()
            self.dashboard = None
        self._save_ledger()
        if self.archivist is not None:
            self.archivist.close()
            self.archivist = None
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None
