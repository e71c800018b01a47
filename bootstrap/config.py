"""`swarm-bootstrap`'s settings: one dataclass, validated on construction.

Free of torch and hivemind imports, so the command line is parsed and checked, and
`--help` printed, before the heavy modules load.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic.dataclasses import dataclass

from averaging.config import SETTINGS
from peer.config import validate_multiaddr


@dataclass(kw_only=True, config=SETTINGS)
class BootstrapConfig:
    identity: str = Field("bootstrap.key", description="private key file; created on first start, reused after (keeps the address)")
    host: str = Field("0.0.0.0", description="IP address to listen on")
    port: int = Field(31337, description="TCP port to listen on (keep it fixed so the address stays the same; 0 = any)")
    announce_host: str = Field("", description="public IP address to advertise, if different from the listen address")
    run_id: str = Field("swarmtrain-demo", description="run to watch and to put in the printed join command")
    initial_peers: list[str] = Field(default_factory=list, description="other bootstrap nodes or peers of the same swarm (optional)")
    monitor_every: float = Field(10.0, description="seconds between status lines (0 = no status lines)")
    maddrs_file: str = Field("", description="also write this node's multiaddrs to this file, one per line")
    checkpoint_dir: str = Field("", description="archivist mode: keep the swarm's state here and serve it ('' = off)")
    keep_last: int = Field(5, description="archivist: number of newest checkpoints to keep (0 = all)")
    archive_every: float = Field(5.0, description="archivist: seconds between checks for a newer swarm state")
    dashboard: int = Field(-1, description="serve the web dashboard, JSON API and /metrics on this port (0 = any free port, -1 = off)")
    dashboard_host: str = Field("", description="address the dashboard listens on ('' = same as host)")
    ledger: str = Field("auto", description="contribution ledger file, kept across restarts, CSV export beside it "
                              "('auto' = beside the identity file: bootstrap.key gives bootstrap.ledger.json; '' = memory only)")
    poll_every: float = Field(2.0, description="seconds between reads of the peers' records (dashboard, ledger)")
    secret_file: str = Field("", description="private run: file with the run's shared secret ('' = open run; create with `keygen`)")
    allowlist_file: str = Field("", description="private run: file of the peer ids allowed to take part, one per line ('' = none); "
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

    @property
    def contacts_path(self) -> str:
        """Where the node keeps the addresses of the peers it has seen, beside its identity file:
        restarted, it calls them back at once, so the swarm it served finds it again."""
        return str(Path(self.identity).with_suffix(".contacts"))

    @property
    def ledger_path(self) -> str:
        """The ledger file ('' = memory only). The default sits beside the identity file, so two
        bootstrap nodes started in one directory, each with its own key, never share a ledger."""
        if self.ledger == "auto":
            return str(Path(self.identity).with_suffix(".ledger.json"))
        return self.ledger
