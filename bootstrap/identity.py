"""A bootstrap node's persistent identity: a libp2p private key in a file.

The peer id (and so the node's multiaddrs) is derived from the key, so keeping the file
keeps the address that everyone's join command points at. The file is created on first
start (mode 0400) and reused after; a damaged file is reported, never overwritten.
"""
from __future__ import annotations

from pathlib import Path

from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID

from averaging.errors import StateError


def ensure_identity(path: str | Path) -> tuple[str, bool]:
    """Return (peer id, created) for the key at `path`, creating the key if it is missing.

    Raises StateError (one line) if the file exists but is not a valid private key, or if
    the directory cannot be written.
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
    try:
        data = p.read_bytes()
    except OSError as e:
        raise StateError(f"cannot read identity file {p}: {e.strerror or e}") from e
    try:
        peer_id = PeerID.from_identity(data).to_base58()
    except Exception as e:  # protobuf DecodeError, ValueError from the key parser, ...
        raise StateError(f"identity file {p} is not a valid libp2p private key ({type(e).__name__}); "
                         "restore it from a backup or point --identity at a new path") from e
    return peer_id, created
