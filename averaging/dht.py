"""A thin, thread-safe facade over hivemind.DHT with run-scoped keys.

hivemind.DHT runs in its own process and is driven over a pipe. Its methods are not
documented as thread-safe, and swarmtrain calls it from the training thread and from the
announcer thread, so every call goes through one lock.

Keys are namespaced by run id: two runs on the same DHT never see each other's records.
Values read from the DHT come from other peers and are untrusted: callers validate them.
"""
from __future__ import annotations

import ctypes
import logging
import signal
import sys
import threading
from typing import Any, Sequence

import hivemind
from hivemind.utils import get_dht_time

from .errors import NetworkError

log = logging.getLogger(__name__)


def dht_time() -> float:
    """The DHT's notion of now (seconds since the epoch)."""
    return get_dht_time()


class _OwnedDHT(hivemind.DHT):
    """hivemind.DHT whose process dies with its parent.

    hivemind runs the DHT in a forked child that outlives a SIGKILLed parent (and keeps
    p2pd alive with it). On Linux, PR_SET_PDEATHSIG makes the kernel kill the child when
    the parent dies, and p2pd follows; so a crashed peer leaves no orphans behind.
    """

    def run(self) -> None:
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        super().run()


class SwarmDHT:
    """Owns one hivemind.DHT process (unless given an existing one) and scopes keys to a run."""

    def __init__(self, dht: hivemind.DHT, run_id: str, *, owned: bool = True) -> None:
        self._dht = dht
        self.run_id = run_id
        self._owned = owned
        self._lock = threading.Lock()
        self.peer_id: str = dht.peer_id.to_base58()

    @classmethod
    def start(
        cls,
        run_id: str,
        *,
        initial_peers: Sequence[str] = (),
        host_maddrs: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",),
        announce_maddrs: Sequence[str] = (),
        client_mode: bool = False,
        identity_path: str | None = None,
        startup_timeout: float = 30.0,
    ) -> "SwarmDHT":
        """Start a DHT node and join the swarm through `initial_peers`.

        Failure: raises NetworkError (one line) if p2pd cannot start or none of the initial
        peers answers. hivemind's daemon gives up on unreachable peers within seconds,
        and `startup_timeout` bounds the rest, so this never hangs.
        """
        kwargs: dict[str, Any] = dict(
            initial_peers=list(initial_peers) or None,
            # A client (behind NAT) opens no listening socket at all: p2pd dials out only.
            host_maddrs=[] if client_mode else list(host_maddrs),
            client_mode=client_mode,
            startup_timeout=startup_timeout,
            start=True,
        )
        if announce_maddrs:
            kwargs["announce_maddrs"] = list(announce_maddrs)
        if identity_path is not None:
            kwargs["identity_path"] = identity_path
        try:
            dht = _OwnedDHT(**kwargs)
        except Exception as e:  # hivemind raises P2PDaemonError, RuntimeError, TimeoutError...
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            where = f" through {', '.join(initial_peers)}" if initial_peers else ""
            raise NetworkError(f"could not join the swarm{where}: {first_line}") from e
        return cls(dht, run_id)

    def key(self, name: str) -> str:
        return f"{self.run_id}.{name}"

    def visible_maddrs(self) -> list[str]:
        with self._lock:
            try:
                return [str(m) for m in self._dht.get_visible_maddrs()]
            except ValueError:  # hivemind: "No multiaddrs found" for a client that does not listen
                return []

    def put(self, name: str, subkey: str, value: Any, ttl: float) -> bool:
        """Store `value` under (run.name, subkey) for `ttl` seconds. Returns False if no node accepted it."""
        with self._lock:
            return bool(self._dht.store(self.key(name), value, expiration_time=dht_time() + ttl, subkey=subkey))

    def get_all(self, name: str) -> dict[str, Any]:
        """All unexpired subkey → value pairs under run.name ({} if none). Values are untrusted."""
        with self._lock:
            found = self._dht.get(self.key(name), latest=True)
        if found is None or not isinstance(found.value, dict):
            return {}
        now = dht_time()
        return {
            str(subkey): item.value
            for subkey, item in found.value.items()
            if getattr(item, "expiration_time", 0) > now
        }

    @property
    def hivemind_dht(self) -> hivemind.DHT:
        return self._dht

    def shutdown(self) -> None:
        """Stop the DHT process if this object owns it. Idempotent."""
        if self._owned and self._dht.is_alive():
            with self._lock:
                self._dht.shutdown()
