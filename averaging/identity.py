"""A node's identity: one RSA key gives both its libp2p peer id and the signatures on its records.

hivemind's p2pd derives the peer id from the key in an identity file (sha256 multihash of
the public key), and hivemind's RSASignatureValidator signs DHT records whose subkey holds
the owner's public key ("[owner:ssh-rsa ...]"). swarmtrain uses the *same* key for both, so
a record's subkey proves which peer wrote it: `peer_id_of(public key)` must equal the peer
id the record claims, and only the holder of the private key can produce the signature
every honest DHT node checks. Nobody can write or overwrite another peer's record.

A peer without a configured identity file gets a fresh key in a private temporary file
(removed once p2pd has read it), so every node has a key it can sign with.
"""
from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import multihash
from cryptography.hazmat.primitives import serialization
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from .errors import StateError


@dataclass(frozen=True)
class Identity:
    """A loaded private key. `path` is the libp2p identity file p2pd reads at start."""

    path: str
    private_key: RSAPrivateKey
    peer_id: str
    temporary: bool = False

    @property
    def owner_subkey(self) -> bytes:
        """The DHT subkey under which only this identity can write: b"[owner:ssh-rsa ...]"."""
        return RSASignatureValidator(self.private_key).local_public_key

    def validator(self) -> RSASignatureValidator:
        return RSASignatureValidator(self.private_key)

    def discard(self) -> None:
        """Delete a temporary key file (p2pd has read it already). No-op for a persistent one."""
        if self.temporary:
            Path(self.path).unlink(missing_ok=True)
            Path(self.path).parent.rmdir()


def ensure_identity(path: str | Path) -> tuple[str, bool]:
    """Return (peer id, created) for the key at `path`, creating the key if it is missing.

    Raises StateError (one line) if the file exists but is not a valid private key, or if
    the directory cannot be written. A damaged file is reported, never overwritten.
    """
    p = Path(path)
    created = False
    if not p.exists():
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            P2P.generate_identity(str(p))
        except OSError as e:
            raise StateError(f"cannot create identity file {p}: {e.strerror or e}") from e
        created = True
    return load_identity(p).peer_id, created


def load_identity(path: str | Path, *, temporary: bool = False) -> Identity:
    """Read a libp2p identity file (protobuf PrivateKey, RSA). Raises StateError (one line)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise StateError(f"cannot read identity file {p}: {e.strerror or e}") from e
    try:
        proto = crypto_pb2.PrivateKey.FromString(data)
        if proto.key_type != crypto_pb2.KeyType.RSA:
            raise ValueError("not an RSA key")
        key = RSAPrivateKey.__new__(RSAPrivateKey)  # hivemind's wrapper has no from_bytes
        key._private_key = serialization.load_der_private_key(proto.data, password=None)
        peer_id = PeerID.from_identity(data).to_base58()
    except Exception as e:  # protobuf DecodeError, ValueError/UnsupportedAlgorithm from the key parser
        raise StateError(f"identity file {p} is not a valid libp2p private key ({type(e).__name__}; an RSA key is needed); "
                         "restore it from a backup or point the identity option at a new path") from e
    return Identity(str(p), key, peer_id, temporary)


def ephemeral_identity() -> Identity:
    """A fresh key in a private temporary directory (mode 0700); `discard()` it after the DHT starts."""
    d = tempfile.mkdtemp(prefix="swarmtrain-id-")
    path = os.path.join(d, "identity.key")
    P2P.generate_identity(path)
    return load_identity(path, temporary=True)


@functools.lru_cache(maxsize=4096)
def peer_id_of(owner_subkey: bytes) -> str | None:
    """The libp2p peer id of the key in b"[owner:ssh-rsa ...]", or None if it is not one.

    Mirrors PeerID.from_identity: sha256 multihash of the protobuf-wrapped DER public key.
    Cached: matchmaking reads the same few records many times a second.
    """
    m = RSASignatureValidator._PUBLIC_KEY_RE.fullmatch(owner_subkey) if isinstance(owner_subkey, bytes) else None
    if m is None:
        return None
    try:
        public = RSAPublicKey.from_bytes(m.group(1))._public_key
    except Exception:  # any malformed key text from an untrusted peer: not an owner subkey
        return None
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    proto = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(proto).digest(), multihash.coerce_code("sha2-256"))
    return PeerID(digest).to_base58()


def short_id(peer_id: str) -> str:
    """The last 8 characters of a peer id: how logs, errors and the dashboard name a peer."""
    return peer_id[-8:]
