"""Private runs: who may take part, proven at every boundary.

Open runs (no credential) accept anyone. A private run has a `Credential`, one of:

    RunSecret   a shared secret every member holds; proofs are HMAC-SHA256 tags.
    Allowlist   a file of the peer ids (= hashes of RSA public keys) that may take part;
                proofs are RSA signatures made with the peer's own identity key.

Either one protects three boundaries, with a proof only a member can make (described here
for the secret; the allowlist's proofs follow below):

    DHT records   every value stored by a node carries a tag over (key, subkey, value,
                  expiration); every node rejects untagged or mis-tagged records, so an
                  outsider cannot write any record of the run (peers, matchmaking).
    matchmaking   a follower's join slot carries a tag over (group, peer id); the leader
                  refuses a join without it. The leader's member list carries a tag too,
                  so nobody else can forge or redirect a group.
    all-reduce    members exchange tags over (group, rank, peer id) before any data;
                  a member with a bad tag is excluded from the round (see allreduce.py).

With an allowlist the DHT records need no extra tag: every record of the run must sit under
an owner subkey (signed with that key, checked by RSASignatureValidator) whose peer id is on
the list. Join slots, leader replies and all-reduce proofs carry the signer's public key and
an RSA signature over the same parts as the HMAC would cover.

Rotation: the secret file may hold several secrets, one per line. A node signs with the
first and accepts any of them, so a new secret can be rolled out (added second, then
moved first once every node has it, then the old one removed) without stopping the run.
What this does not do: encrypt traffic; stop an outsider who can reach the peers' ports
from disrupting a round (which then fails); or authenticate the NAT relay's store keys
(client uploads and results, averaging/relay.py). See docs/security.md.
"""
from __future__ import annotations

import functools
import hmac
import logging
import os
import re
import secrets as _secrets
import threading
import time
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Protocol

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer
from hivemind.utils.crypto import RSAPublicKey

from .errors import StateError
from .identity import Identity, peer_id_of

log = logging.getLogger(__name__)
_HEX_RE = re.compile(r"^[0-9a-f]{64}$")


class Credential(Protocol):
    """What a private run's members prove at each boundary (RunSecret or Allowlist).

    `sign(*parts)` makes this node's proof over the parts; `verify(proof, signer, *parts)`
    says whether `signer` (a peer id) made it and may take part. Proofs are at most
    `proof_size` bytes, so a fixed-size buffer carries one through a collective."""

    proof_size: int

    def sign(self, *parts: str | bytes) -> bytes: ...

    def verify(self, proof: bytes, signer: str, *parts: str | bytes) -> bool: ...

    def sign_hex(self, *parts: str | bytes) -> str: ...

    def verify_hex(self, proof: object, signer: str, *parts: str | bytes) -> bool: ...

    def record_validator(self) -> RecordValidatorBase: ...


@dataclass(frozen=True)
class RunSecret:
    """One or more 32-byte secrets; the first signs, any verifies."""

    keys: tuple[bytes, ...] = field(repr=False)

    def __post_init__(self) -> None:
        if not self.keys or any(len(k) != 32 for k in self.keys):
            raise ValueError("a run secret is one or more 32-byte keys")

    def tag(self, *parts: str | bytes) -> bytes:
        """HMAC-SHA256 of the parts (length-prefixed, so ("ab", "c") != ("a", "bc"))."""
        return _mac(self.keys[0], parts)

    def check(self, tag: bytes, *parts: str | bytes) -> bool:
        return isinstance(tag, bytes) and any(hmac.compare_digest(_mac(k, parts), tag) for k in self.keys)

    def tag_hex(self, *parts: str | bytes) -> str:
        return self.tag(*parts).hex()

    def check_hex(self, tag: object, *parts: str | bytes) -> bool:
        if not isinstance(tag, str) or not _HEX_RE.match(tag):
            return False
        return self.check(bytes.fromhex(tag), *parts)

    # Credential: the signer's peer id is always one of the parts, so the tag binds it.
    proof_size = 32

    def sign(self, *parts: str | bytes) -> bytes:
        return self.tag(*parts)

    def verify(self, proof: bytes, signer: str, *parts: str | bytes) -> bool:
        return self.check(proof, *parts)

    def sign_hex(self, *parts: str | bytes) -> str:
        return self.tag_hex(*parts)

    def verify_hex(self, proof: object, signer: str, *parts: str | bytes) -> bool:
        return self.check_hex(proof, *parts)

    def record_validator(self) -> RecordValidatorBase:
        return SecretValidator(self)


def _mac(key: bytes, parts: tuple[str | bytes, ...]) -> bytes:
    m = hmac.new(key, digestmod=sha256)
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        m.update(len(b).to_bytes(8, "big"))
        m.update(b)
    return m.digest()


def generate_secret_file(path: str | Path) -> None:
    """Write a new random secret (64 hex characters) to `path`, mode 0600. Refuses to overwrite."""
    p = Path(path)
    if p.exists():
        raise StateError(f"{p} already exists; refusing to overwrite a secret (delete it first, or choose another path)")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(_secrets.token_hex(32) + "\n")


def load_secret_file(path: str | Path) -> RunSecret:
    """Read a secret file: one or more lines of 64 hex characters. Raises StateError (one line)."""
    p = Path(path)
    try:
        lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    except (OSError, UnicodeDecodeError) as e:
        raise StateError(f"cannot read run secret {p}: {getattr(e, 'strerror', None) or e}") from e
    if not lines or not all(_HEX_RE.match(ln) for ln in lines):
        raise StateError(f"run secret {p} must hold one or more lines of 64 hex characters "
                         "(create one with: swarm-bootstrap keygen --out FILE)")
    return RunSecret(tuple(bytes.fromhex(ln) for ln in lines))


class SecretValidator(RecordValidatorBase):
    """Every record of a private run's DHT carries an HMAC tag; records without a valid one
    are rejected by every node. Outermost layer: it signs last and validates first."""

    _TAG_RE = re.compile(rb"\[swarm-hmac:([0-9a-f]{64})\]$")

    def __init__(self, secret: RunSecret) -> None:
        self._secret = secret

    def _parts(self, record: DHTRecord, value: bytes) -> tuple[bytes, ...]:
        return (record.key, record.subkey, value, MSGPackSerializer.dumps(record.expiration_time))

    def sign_value(self, record: DHTRecord) -> bytes:
        return record.value + b"[swarm-hmac:" + self._secret.tag_hex(*self._parts(record, record.value)).encode() + b"]"

    def validate(self, record: DHTRecord) -> bool:
        m = self._TAG_RE.search(record.value)
        if m is None:
            return False
        value = record.value[: m.start()]
        return self._secret.check(bytes.fromhex(m.group(1).decode()), *self._parts(record, value))

    def strip_value(self, record: DHTRecord) -> bytes:
        m = self._TAG_RE.search(record.value)
        return record.value if m is None else record.value[: m.start()]

    @property
    def priority(self) -> int:
        return 20  # above RSASignatureValidator (10): the tag wraps the signed value

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False


# ---------------------------------------------------------------------------- allowlist
_PEER_ID_RE = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{40,60}$")  # base58 sha256 multihash ("Qm...")
_ALLOWLIST_RELOAD_S = 1.0  # stat the file at most this often


class Allowlist:
    """The peer ids that may take part in a private run, read from a file; the file is
    re-read when it changes, so members can be added or removed without a restart.

    `identity`: this node's key, to sign with (None for a node that only checks, such as a
    bootstrap node or `swarm-peer status`). A proof is the signer's OpenSSH public key, a
    newline and the base64 RSA-PSS signature (~730 bytes); `verify` checks that the key
    hashes to `signer`, that `signer` is on the list, and the signature."""

    proof_size = 1024

    def __init__(self, path: str | Path, identity: Identity | None = None) -> None:
        self.path = Path(path)
        self.identity = identity
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._checked = 0.0
        self._peers: frozenset[str] = _read_allowlist(self.path)  # raises StateError: fail at start
        self._mtime = _mtime(self.path)
        self._public_key = (b"" if identity is None else
                            identity.private_key.get_public_key().to_bytes())

    @property
    def peers(self) -> frozenset[str]:
        """The current list. A file that became unreadable or invalid keeps the last good list
        (logged), so a bad edit cannot open a private run or stop it."""
        now = time.monotonic()
        with self._lock:
            if now - self._checked >= _ALLOWLIST_RELOAD_S:
                self._checked = now
                m = _mtime(self.path)
                if m != self._mtime:
                    try:
                        self._peers = _read_allowlist(self.path)
                        self._mtime = m
                        log.info("allowlist %s reloaded: %d peer(s)", self.path, len(self._peers))
                    except StateError as e:
                        log.warning("%s; keeping the previous list of %d peer(s)", e, len(self._peers))
                        self._mtime = m
            return self._peers

    def allows(self, peer_id: str) -> bool:
        return peer_id in self.peers

    def sign(self, *parts: str | bytes) -> bytes:
        if self.identity is None:
            raise RuntimeError("this node has no identity to sign with")
        return self._public_key + b"\n" + self.identity.private_key.sign(_message(parts))

    def verify(self, proof: bytes, signer: str, *parts: str | bytes) -> bool:
        if not isinstance(proof, bytes) or not self.allows(signer):
            return False
        proof = proof.rstrip(b"\0")  # fixed-size buffers are zero-padded
        public, sep, signature = proof.partition(b"\n")
        if not sep or peer_id_of(b"[owner:" + public + b"]") != signer:
            return False
        key = _public_key(public)
        return key is not None and key.verify(_message(parts), signature)

    def sign_hex(self, *parts: str | bytes) -> str:
        return self.sign(*parts).hex()

    def verify_hex(self, proof: object, signer: str, *parts: str | bytes) -> bool:
        if not isinstance(proof, str) or len(proof) > 2 * self.proof_size:
            return False
        try:
            raw = bytes.fromhex(proof)
        except ValueError:
            return False
        return self.verify(raw, signer, *parts)

    def record_validator(self) -> RecordValidatorBase:
        return AllowlistValidator(self)


def _message(parts: tuple[str | bytes, ...]) -> bytes:
    """What an allowlist proof signs: the length-prefixed parts under a domain label."""
    out = [b"swarmtrain-allowlist-v1"]
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        out += [len(b).to_bytes(8, "big"), b]
    return b"".join(out)


@functools.lru_cache(maxsize=1024)
def _public_key(openssh: bytes) -> RSAPublicKey | None:
    try:
        return RSAPublicKey.from_bytes(openssh)
    except Exception:  # any malformed key text from an untrusted peer
        return None


def _mtime(p: Path) -> float | None:
    try:
        return p.stat().st_mtime_ns / 1e9
    except OSError:
        return None


def _read_allowlist(p: Path) -> frozenset[str]:
    """One peer id per line; blank lines and '#' comments (also after an id) are ignored.
    Raises StateError (one line) naming the file and the first bad line."""
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise StateError(f"cannot read allowlist {p}: {getattr(e, 'strerror', None) or e}") from e
    peers = set()
    for n, line in enumerate(text.splitlines(), 1):
        item = line.split("#", 1)[0].strip()
        if not item:
            continue
        if not _PEER_ID_RE.match(item):
            raise StateError(f"allowlist {p} line {n}: {item[:70]!r} is not a peer id "
                             "(one per line, as printed by: swarm-bootstrap keygen --identity FILE)")
        peers.add(item)
    if not peers:
        raise StateError(f"allowlist {p} lists no peer ids (one per line; get yours with: swarm-bootstrap keygen --identity FILE)")
    return frozenset(peers)


def load_allowlist(path: str | Path, identity: Identity | None = None) -> Allowlist:
    """Read an allowlist file. Raises StateError (one line) if it is unreadable, empty or has a
    line that is not a peer id."""
    return Allowlist(path, identity)


class AllowlistValidator(RecordValidatorBase):
    """Every record of an allowlisted run must be written under an owner marker (key or
    subkey "[owner:ssh-rsa ...]") whose peer id is on the list. The RSA signature validator,
    installed on every node, already guarantees that only the key's holder wrote it. Values
    are not changed."""

    def __init__(self, allowlist: Allowlist) -> None:
        self._allowlist = allowlist

    def validate(self, record: DHTRecord) -> bool:
        owners = _OWNER_RE.findall(record.key) + _OWNER_RE.findall(record.subkey or b"")
        return bool(owners) and all(self._allowlist.allows(peer_id_of(b"[owner:" + o + b"]") or "") for o in owners)

    def sign_value(self, record: DHTRecord) -> bytes:
        return record.value

    def strip_value(self, record: DHTRecord) -> bytes:
        return record.value

    @property
    def priority(self) -> int:
        return 20

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False


_OWNER_RE = RSASignatureValidator._PUBLIC_KEY_RE


def load_credential(*, secret_file: str = "", allowlist_file: str = "",
                    identity: Identity | None = None) -> Credential | None:
    """The run's credential from the configured file (None = open run). Raises StateError."""
    if secret_file and allowlist_file:
        raise StateError("a private run uses a shared secret or an allowlist, not both")
    if secret_file:
        return load_secret_file(secret_file)
    if allowlist_file:
        return load_allowlist(allowlist_file, identity)
    return None
