"""Private runs: a shared secret that every member of the run holds.

Open runs (no secret) accept anyone. A private run is protected at three boundaries, each
with an HMAC-SHA256 tag that only holders of the secret can compute:

    DHT records   every value stored by a node carries a tag over (key, subkey, value,
                  expiration); every node rejects untagged or mis-tagged records, so an
                  outsider cannot write any record of the run (peers, matchmaking).
    matchmaking   a follower's join slot carries a tag over (group, peer id); the leader
                  refuses a join without it. The leader's member list carries a tag too,
                  so nobody else can forge or redirect a group.
    all-reduce    members exchange tags over (group, rank, peer id) before any data;
                  a member with a bad tag is excluded from the round (see allreduce.py).

Rotation: the secret file may hold several secrets, one per line. A node signs with the
first and accepts any of them, so a new secret can be rolled out (added second, then
moved first once every node has it, then the old one removed) without stopping the run.
What this does not do: encrypt traffic; stop an outsider who can reach the peers' ports
from disrupting a round (which then fails); or authenticate the NAT relay's store keys
(client uploads and results, averaging/relay.py). See docs/security.md.
"""
from __future__ import annotations

import hmac
import os
import re
import secrets as _secrets
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer

from .errors import StateError

_HEX_RE = re.compile(r"^[0-9a-f]{64}$")


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
