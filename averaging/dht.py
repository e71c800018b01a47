"""A thin, thread-safe facade over hivemind.DHT with run-scoped keys.

hivemind.DHT runs in its own process and is driven over a pipe. Its methods are not
documented as thread-safe, and swarmtrain calls it from the training thread and from the
peer's event loop, so every request is sent under one lock (answers are awaited outside it).

Keys are namespaced by run id: two runs on the same DHT never see each other's records.
Values read from the DHT come from other peers and are untrusted: callers validate them.

Signed records: every node installs hivemind's RSASignatureValidator with its own key (the
same key as its libp2p identity, see identity.py). `put_signed` stores a value under this
node's owner subkey; every honest node rejects a value under an owner subkey that is not
signed by that owner, and `get_signed` returns only owner-keyed values, by peer id.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import logging
import os
import signal
import sys
import threading
from typing import Any, Sequence

import hivemind
from hivemind.utils import get_dht_time

from hivemind.dht.validation import RecordValidatorBase

from .access import Credential
from .errors import NetworkError
from .identity import Identity, ensure_identity, ephemeral_identity, load_identity, peer_id_of

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
        # The child is forked from a multi-threaded process (training, announcer, sync worker).
        # Python 3.11 frees the other threads' frame stacks in the child, and frame objects the
        # parent still references may point into them: a garbage collection that walks those
        # inherited objects segfaults (seen when the DHT's record validators allocate heavily).
        # gc.freeze() moves everything inherited to the permanent generation, never traversed.
        gc.freeze()
        # Leave the terminal's process group (p2pd, started from here, follows): a Ctrl+C goes
        # to the whole foreground group, and a DHT and p2pd that stopped on their own, before
        # their owner asked them to, printed go-libp2p errors and made the owner's shutdown
        # wait out a grace period. The owner handles the signal and stops them in order; if
        # it dies instead, PR_SET_PDEATHSIG below still takes this process down.
        os.setpgid(0, 0)
        # The owner's Python signal handlers were copied by the fork: a SIGTERM to this process
        # (hivemind's "hard way" after a failed graceful shutdown) must end it, not set an
        # Event in a copy of the owner's memory. (hivemind itself ignores SIGINT here.)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        super().run()


class SwarmDHT:
    """Owns one hivemind.DHT process (unless given an existing one) and scopes keys to a run."""

    def __init__(self, dht: hivemind.DHT, run_id: str, *, owned: bool = True, identity: Identity | None = None) -> None:
        self._dht = dht
        self.run_id = run_id
        self._owned = owned
        self._lock = threading.Lock()
        self.peer_id: str = dht.peer_id.to_base58()
        self.identity = identity

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
        record_validators: Sequence[RecordValidatorBase] = (),
        secret: Credential | None = None,
        startup_timeout: float = 30.0,
    ) -> "SwarmDHT":
        """Start a DHT node and join the swarm through `initial_peers`.

        `identity_path`: a libp2p RSA key file, created if missing (a fresh temporary key if None).
        `record_validators` are installed next to the signature validator; every node of a
        run must install the same ones, or it would store records the others reject.
        `secret`: a private run's shared secret; every record then carries its HMAC tag.

        Failure: raises NetworkError (one line) if p2pd cannot start or none of the initial
        peers answers, StateError if the identity file is unusable. hivemind's daemon gives
        up on unreachable peers within seconds, and `startup_timeout` bounds the rest.
        """
        if identity_path is not None:
            ensure_identity(identity_path)  # created on first use, reused after: a stable peer id
        identity = load_identity(identity_path) if identity_path is not None else ephemeral_identity()
        kwargs: dict[str, Any] = dict(
            initial_peers=list(initial_peers) or None,
            # A client (behind NAT) opens no listening socket at all: p2pd dials out only.
            host_maddrs=[] if client_mode else list(host_maddrs),
            client_mode=client_mode,
            startup_timeout=startup_timeout,
            identity_path=identity.path,
            # hivemind checks that a key file is not in use by starting a second, anonymous p2pd
            # with default listen addresses. A fresh random key cannot be taken, and a client
            # (behind NAT) must not listen even for that moment, so the check runs only for a
            # persistent identity on a listening node.
            check_if_identity_free=not (client_mode or identity.temporary),
            record_validators=[identity.validator(), *record_validators,
                               *([secret.record_validator()] if secret is not None else [])],
            start=True,
        )
        if announce_maddrs:
            kwargs["announce_maddrs"] = list(announce_maddrs)
        try:
            dht = _OwnedDHT(**kwargs)
        except Exception as e:  # hivemind raises P2PDaemonError, RuntimeError, TimeoutError...
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            where = f" through {', '.join(initial_peers)}" if initial_peers else ""
            raise NetworkError(f"could not join the swarm{where}: {first_line}") from e
        finally:
            identity.discard()  # a temporary key is no longer needed on disk once p2pd has it
        return cls(dht, run_id, identity=identity)

    def key(self, name: str) -> str:
        # "_" (not ".") joins run and name: hivemind's SchemaValidator names keys prefix + "_" + field.
        return f"{self.run_id}_{name}"

    def visible_maddrs(self) -> list[str]:
        with self._lock:
            try:
                return [str(m) for m in self._dht.get_visible_maddrs()]
            except ValueError:  # hivemind: "No multiaddrs found" for a client that does not listen
                return []

    # Every call sends one request down hivemind's pipe to the DHT process and gets an MPFuture
    # back. Only the send is serialized (a pipe written from two threads at once interleaves);
    # the answer is awaited outside the lock, so a slow lookup never holds up another caller.
    # The `a`-prefixed forms are the same calls for coroutines on an event loop (an MPFuture
    # created on a running loop is awaitable); the plain forms block the calling thread.

    def _redial_future(self, maddrs: Sequence[str], timeout: float) -> Any:
        with self._lock:
            return self._dht.run_coroutine(functools.partial(_redial, list(maddrs), timeout), return_future=True)

    def redial(self, maddrs: Sequence[str], timeout: float = 5.0) -> int:
        """Connect to each full multiaddr (…/p2p/<id>) and ping its DHT node, which puts the two
        nodes back in each other's routing tables. Returns how many answered.

        hivemind drops a node from its routing table after failed requests and never looks for
        it again: after a link cut or a restart, two live nodes can stay invisible to each
        other for good (hivemind issue #624). Dialing with the address also teaches p2pd where
        the peer is, which its own routing cannot find for 198.18.0.0/15 (treated as
        unroutable). Failure: unreachable addresses just do not count; bounded by `timeout`.
        """
        return int(self._redial_future(maddrs, timeout).result()) if maddrs else 0

    async def aredial(self, maddrs: Sequence[str], timeout: float = 5.0) -> int:
        """`redial` for a coroutine."""
        return int(await self._redial_future(maddrs, timeout)) if maddrs else 0

    def _store_future(self, name: str, subkey: str | bytes, value: Any, ttl: float) -> Any:
        with self._lock:
            return self._dht.store(self.key(name), value, expiration_time=dht_time() + ttl, subkey=subkey,
                                   return_future=True)

    def put(self, name: str, subkey: str | bytes, value: Any, ttl: float) -> bool:
        """Store `value` under (run.name, subkey) for `ttl` seconds. Returns False if no node accepted it."""
        return bool(self._store_future(name, subkey, value, ttl).result())

    async def aput(self, name: str, subkey: str | bytes, value: Any, ttl: float) -> bool:
        """`put` for a coroutine."""
        return bool(await self._store_future(name, subkey, value, ttl))

    def _get_future(self, name: str) -> Any:
        with self._lock:
            return self._dht.get(self.key(name), latest=True, return_future=True)

    @staticmethod
    def _unexpired(found: Any) -> dict[Any, Any]:
        if found is None or not isinstance(found.value, dict):
            return {}
        now = dht_time()
        return {
            subkey if isinstance(subkey, bytes) else str(subkey): item.value
            for subkey, item in found.value.items()
            if getattr(item, "expiration_time", 0) > now
        }

    def get_all(self, name: str) -> dict[Any, Any]:
        """All unexpired subkey → value pairs under run.name ({} if none). Values are untrusted."""
        return self._unexpired(self._get_future(name).result())

    async def aget_all(self, name: str) -> dict[Any, Any]:
        """`get_all` for a coroutine."""
        return self._unexpired(await self._get_future(name))

    def _owner_subkey(self) -> bytes:
        if self.identity is None:
            raise RuntimeError("this DHT has no identity to sign with (use SwarmDHT.start)")
        return self.identity.owner_subkey

    def put_signed(self, name: str, value: Any, ttl: float) -> bool:
        """Store `value` under this node's owner subkey: signed, and writable by nobody else."""
        return self.put(name, self._owner_subkey(), value, ttl)

    async def aput_signed(self, name: str, value: Any, ttl: float) -> bool:
        """`put_signed` for a coroutine."""
        return await self.aput(name, self._owner_subkey(), value, ttl)

    @staticmethod
    def _by_owner(values: dict[Any, Any]) -> dict[str, Any]:
        out = {}
        for subkey, value in values.items():
            pid = peer_id_of(subkey) if isinstance(subkey, bytes) else None
            if pid is not None:
                out[pid] = value
        return out

    async def aget_signed(self, name: str) -> dict[str, Any]:
        """`get_signed` for a coroutine."""
        return self._by_owner(await self.aget_all(name))

    def get_signed(self, name: str) -> dict[str, Any]:
        """peer id → value for every record under an owner subkey. The DHT nodes already checked
        the signatures; values are still untrusted input (only their author is certain)."""
        return self._by_owner(self.get_all(name))

    @property
    def hivemind_dht(self) -> hivemind.DHT:
        return self._dht

    def shutdown(self) -> None:
        """Stop the DHT process if this object owns it. Idempotent."""
        if self._owned and self._dht.is_alive():
            with self._lock:
                self._dht.shutdown()  # graceful, then SIGTERM after hivemind's grace period
                self._dht.join(timeout=5)
                if self._dht.is_alive():  # never leave an owner waiting on its DHT process
                    log.warning("the DHT process did not stop; killing it")
                    self._dht.kill()
                    self._dht.join(timeout=5)


async def _redial(maddrs: list[str], timeout: float, _dht: hivemind.DHT, node: Any) -> int:
    """Runs inside the DHT process (hivemind's run_coroutine): dial and ping every address at once."""
    from hivemind.p2p import PeerID
    from multiaddr import Multiaddr

    async def one(addr: str) -> bool:
        try:
            m = Multiaddr(addr)
            pid = PeerID.from_base58(m.value_for_protocol("p2p"))
        except Exception:  # py-multiaddr and base58 raise several types; a bad address is skipped
            return False
        if pid == node.peer_id:
            return False
        # Unreachable or refused: nothing to do here, the ping below says whether it answers at all
        # (p2pd's client raises several exception types).
        with contextlib.suppress(Exception):
            await asyncio.wait_for(node.protocol.p2p._client.connect(pid, [m]), timeout)
        try:
            return await asyncio.wait_for(node.protocol.call_ping(pid), timeout) is not None
        except asyncio.TimeoutError:
            return False

    return sum(await asyncio.gather(*(one(a) for a in maddrs)))
