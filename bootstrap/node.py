"""A bootstrap node: a DHT node with a persistent identity that also watches the run."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from averaging.dht import SwarmDHT
from averaging.identity import ensure_identity
from peer.config import validate_multiaddr
from peer.configlib import doc
from peer.membership import record_validator

from .archive import Archivist
from .monitor import run_status

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

    def __post_init__(self) -> None:
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


class BootstrapNode:
    """Lifecycle: `start()`, `serve(stop)` until the event is set, `close()`."""

    def __init__(self, cfg: BootstrapConfig) -> None:
        self.cfg = cfg
        self.dht: SwarmDHT | None = None
        self.archivist: Archivist | None = None

    def start(self) -> list[str]:
        """Start the DHT node; return its multiaddrs. Raises StateError / NetworkError (one line)."""
        peer_id, created = ensure_identity(self.cfg.identity)
        log.info("%s identity %s (%s)", "created" if created else "loaded", peer_id, self.cfg.identity)
        announce = [f"/ip4/{self.cfg.announce_host}/tcp/{self.cfg.port}"] if self.cfg.announce_host else []
        self.dht = SwarmDHT.start(
            self.cfg.run_id, initial_peers=self.cfg.initial_peers,
            host_maddrs=[f"/ip4/{self.cfg.host}/tcp/{self.cfg.port}"], announce_maddrs=announce,
            identity_path=self.cfg.identity, record_validators=[record_validator(self.cfg.run_id)],
        )
        maddrs = self.dht.visible_maddrs()
        if self.cfg.checkpoint_dir:
            host = self.cfg.announce_host or (self.cfg.host if self.cfg.host != "0.0.0.0" else "127.0.0.1")
            self.archivist = Archivist(self.dht, ckpt_dir=self.cfg.checkpoint_dir, keep_last=self.cfg.keep_last,
                                       listen_host=self.cfg.host, announce_host=host)
        if self.cfg.maddrs_file:
            with open(self.cfg.maddrs_file, "w") as f:
                f.write("\n".join(maddrs) + "\n")
        return maddrs

    def join_command(self, maddrs: list[str]) -> str:
        # Prefer a non-loopback address: that is what other machines can reach.
        best = next((m for m in maddrs if "/127.0.0.1/" not in m), maddrs[0])
        run = f" --swarm.run-id {self.cfg.run_id}" if self.cfg.run_id != "swarmtrain-demo" else ""
        return f"swarm-peer --join {best}{run}"

    def serve(self, stop: threading.Event) -> None:
        """Log the run's status (and archive its state) periodically until `stop` is set."""
        assert self.dht is not None
        periods = [p for p in (self.cfg.monitor_every, self.cfg.archive_every if self.archivist else 0) if p]
        tick = min(periods, default=3600.0)
        next_status = next_archive = time.monotonic()
        while not stop.wait(min(tick, 1.0)):
            now = time.monotonic()
            if self.archivist is not None and now >= next_archive:
                next_archive = now + self.cfg.archive_every
                self.archivist.poll()
            if self.cfg.monitor_every and now >= next_status:
                next_status = now + self.cfg.monitor_every
                log.info("run %r: %s", self.cfg.run_id, run_status(self.dht).line())

    def close(self) -> None:
        if self.archivist is not None:
            self.archivist.close()
            self.archivist = None
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None
