"""Private runs by allowlist: only the listed peer ids (hashes of RSA identity keys) can write
records, join a group or take part in an all-reduce; honest members are unaffected.
Real keys, DHTs, stores and gloo groups on 127.0.0.1."""
from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest
import torch
from peer.state import CheckpointDir
from torch import nn

from averaging.access import Allowlist, load_allowlist, load_credential
from averaging.allreduce import weighted_allreduce
from averaging.dht import SwarmDHT
from averaging.errors import StateError
from averaging.identity import ensure_identity, load_identity
from averaging.matchmaking import Group
from peer import Peer, PeerConfig, SwarmConfig, SyncConfig
from peer.membership import PEERS_KEY, PeerRecord, live_peers, record_validator

from .test_codecs import _run_group
from .test_private_run import average_together, averagers

RUN = "allowlist-test"
pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def keys(tmp_path):
    """Three member keys and two outsider keys, with an allowlist naming the members."""
    paths = [tmp_path / f"{name}.key" for name in ("m0", "m1", "m2", "x0", "x1")]
    ids = [ensure_identity(p)[0] for p in paths]
    allow = tmp_path / "allow.txt"
    allow.write_text("# the run's members\n" + "".join(f"{i}  # member {n}\n" for n, i in enumerate(ids[:3])))
    return paths, ids, allow


def _record() -> dict:
    return PeerRecord(round=0, fingerprint="f", schema="s", digest="d", host="127.0.0.1", port=1, t=1.0).to_record()


def test_allowlist_file_errors_name_the_problem(tmp_path, keys):
    _, ids, allow = keys
    assert load_allowlist(allow).peers == frozenset(ids[:3])
    cases = {"": "lists no peer ids", "# only a comment\n": "lists no peer ids",
             f"{ids[0]}\nnot-a-peer-id\n": "line 2: 'not-a-peer-id' is not a peer id"}
    for text, msg in cases.items():
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(StateError, match=msg):
            load_allowlist(bad)
    with pytest.raises(StateError, match="cannot read allowlist"):
        load_allowlist(tmp_path / "missing.txt")
    with pytest.raises(StateError, match="not both"):
        load_credential(secret_file="s", allowlist_file=str(allow))
    with pytest.raises(ValueError, match="needs identity_path"):
        SwarmConfig(allowlist_file=str(allow))
    with pytest.raises(ValueError, match="not both"):
        SwarmConfig(allowlist_file=str(allow), secret_file="s", identity_path="k")


def test_proofs_bind_the_signer_and_the_parts(keys):
    paths, ids, allow = keys
    members = [load_allowlist(allow, load_identity(p)) for p in paths[:2]]
    outsider = load_allowlist(allow, load_identity(paths[3]))
    proof = members[0].sign("join", "r/1/", ids[0])
    assert members[1].verify(proof, ids[0], "join", "r/1/", ids[0])
    assert members[1].verify(proof + b"\0" * 100, ids[0], "join", "r/1/", ids[0])  # zero padding from a buffer
    assert not members[1].verify(proof, ids[0], "join", "r/2/", ids[0])  # other parts (a replay elsewhere)
    assert not members[1].verify(proof, ids[1], "join", "r/1/", ids[0])  # claims to be another member
    # an outsider signs correctly with its own key, but is not on the list
    assert not members[1].verify(outsider.sign("join", "r/1/", ids[3]), ids[3], "join", "r/1/", ids[3])
    # an outsider cannot borrow a member's public key: its signature does not match that key
    public = proof.partition(b"\n")[0]
    forged = public + b"\n" + outsider.sign("join", "r/1/", ids[0]).partition(b"\n")[2]
    assert not members[1].verify(forged, ids[0], "join", "r/1/", ids[0])
    for garbage in (b"", b"\n", b"ssh-rsa AAAA\nxyz", os.urandom(700)):
        assert not members[1].verify(garbage, ids[0], "join", "r/1/", ids[0])
    for garbage in (None, 5, "zz", "ab" * 2000, proof.hex()[:-1]):
        assert not members[1].verify_hex(garbage, ids[0], "join", "r/1/", ids[0])
    assert members[1].verify_hex(proof.hex(), ids[0], "join", "r/1/", ids[0])
    assert len(proof) <= Allowlist.proof_size


def test_allowlist_is_reloaded_and_a_bad_edit_keeps_the_last_good_list(keys, monkeypatch):
    _, ids, allow = keys
    a = load_allowlist(allow)
    monkeypatch.setattr("averaging.access._ALLOWLIST_RELOAD_S", 0.0)
    assert not a.allows(ids[3])
    allow.write_text(allow.read_text() + ids[3] + "\n")  # the operator admits x0
    os.utime(allow, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert a.allows(ids[3]) and a.allows(ids[0])
    allow.write_text("garbage\n")  # a broken edit neither opens the run nor stops it
    os.utime(allow, ns=(time.time_ns(), time.time_ns() + 2_000_000))
    assert a.allows(ids[3]) and a.allows(ids[0])


def test_unlisted_peers_cannot_write_run_records(keys):
    paths, ids, allow = keys
    nodes = []
    try:
        member = SwarmDHT.start(RUN, host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity_path=str(paths[0]),
                                record_validators=[record_validator(RUN)], secret=load_allowlist(allow))
        nodes.append(member)
        # x0 runs the same validators (a stock client); x1 runs none (a modified one)
        for path, cred in ((paths[3], load_allowlist(allow)), (paths[4], None)):
            outsider = SwarmDHT.start(RUN, initial_peers=member.visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                      identity_path=str(path), record_validators=[record_validator(RUN)], secret=cred)
            nodes.append(outsider)
            outsider.put_signed(PEERS_KEY, _record(), ttl=60)
        # even unowned records (no owner subkey) are refused: every record must name a listed key
        nodes[-1].put(PEERS_KEY, b"anonymous", _record(), ttl=60)
        member.put_signed(PEERS_KEY, _record(), ttl=60)
        seen = live_peers(member)
        assert member.peer_id in seen and ids[3] not in seen and ids[4] not in seen
        assert set(member.get_all(PEERS_KEY)) == {member.identity.owner_subkey}
    finally:
        for n in nodes:
            n.shutdown()


def test_allreduce_excludes_an_unlisted_member(keys):
    paths, ids, allow = keys
    members = (ids[0], ids[1], ids[3])  # rank 2 is the outsider, signing with its own (unlisted) key
    creds = [load_allowlist(allow, load_identity(p)) for p in (paths[0], paths[1], paths[3])]
    xs = [torch.full((1000,), float(i + 1)) for i in range(3)]

    def fn(store, rank):
        g = Group(0, members, rank, "allow/", store)
        return weighted_allreduce(g, xs[rank], 1.0, host="127.0.0.1", timeout_s=30, secret=creds[rank])

    res = _run_group(3, fn)
    assert res[0].ok and res[1].ok and not res[2].ok
    assert torch.equal(res[0].mean_delta, torch.full((1000,), 1.5))  # (1 + 2) / 2: the outsider's 3 is out
    assert torch.equal(res[1].mean_delta, res[0].mean_delta)
    assert (ids[3], "no valid credential for this private run") in res[0].rejected


def test_leader_refuses_an_unlisted_joiner(keys):
    """The outsider reads the DHT and joins the leader's group directly (its own declaration
    is rejected by the DHT); the leader refuses the join and the members' round completes."""
    paths, ids, allow = keys
    creds = [load_allowlist(allow, load_identity(p)) for p in (paths[0], paths[1], paths[3])]
    with averagers([(str(p), c, c) for p, c in zip((paths[0], paths[1], paths[3]), creds)]) as (_, avgs):
        results = average_together(avgs)
        ok = [r for r in results.values() if r.ok]
        assert len(ok) == 2 and all(set(r.members) == {ids[0], ids[1]} for r in ok), \
            [(r.status, r.error) for r in results.values()]
        assert all(torch.equal(r.mean_delta, torch.full((100,), 0.5)) for r in ok)  # (0 + 1) / 2
        assert not results[2].ok


def test_allowlisted_swarm_trains_and_an_unlisted_peer_is_told_its_id(keys):
    """2 listed members train through a bootstrap DHT that holds no key on the list; a peer
    whose key is not listed stops at start with a one-line error naming its peer id."""
    paths, ids, allow = keys
    boot = SwarmDHT.start(RUN, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=[record_validator(RUN)],
                          secret=load_allowlist(allow))
    out: dict[str, tuple] = {}
    errors: list[BaseException] = []
    init = nn.Linear(4, 1).state_dict()

    def config(path) -> PeerConfig:
        return PeerConfig(swarm=SwarmConfig(run_id=RUN, initial_peers=boot.visible_maddrs(), host="127.0.0.1",
                                            identity_path=str(path), allowlist_file=str(allow)),
                          sync=SyncConfig(every_steps=10, matchmaking={"window": 8}, allreduce={"timeout": 20}))

    def train(name: str, path) -> None:
        try:
            model = nn.Linear(4, 1)
            model.load_state_dict(init)
            g = torch.Generator().manual_seed(hash(name) % 1000)
            with Peer(model, torch.optim.SGD(model.parameters(), lr=0.05), config(path)) as peer:
                while peer.local_step < 400 and peer.round < 3:
                    x = torch.randn(16, 4, generator=g)
                    peer.step(nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)), samples=16)
                out[name] = (peer.peer_id, peer.round, peer.digest, [r.members for r in peer.history if r.ok])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=train, args=a) for a in [("m0", paths[0]), ("m1", paths[1])]]
    try:
        for t in threads:
            t.start()
        model = nn.Linear(4, 1)
        with pytest.raises(StateError, match=f"this peer \\({ids[3]}\\) is not on the run's allowlist"):
            Peer(model, torch.optim.SGD(model.parameters(), lr=0.05), config(paths[3]))
        for t in threads:
            t.join(timeout=200)
    finally:
        boot.shutdown()
    assert not errors, errors
    assert out["m0"][0] == ids[0] and out["m1"][0] == ids[1]
    assert out["m0"][1] >= 3 and out["m1"][1] >= 3 and out["m0"][2] == out["m1"][2]  # trained and agree
    assert all(set(g) == {ids[0], ids[1]} for name in ("m0", "m1") for g in out[name][3])


def test_cli_keygen_identity_and_bad_allowlists(tmp_path, keys):
    from .test_bad_input import error_line, run_cli

    _, ids, allow = keys
    key = tmp_path / "new" / "node.key"
    p = run_cli("-m", "bootstrap", "keygen", "--identity", str(key), timeout=60)
    assert p.returncode == 0 and key.exists()
    assert p.stdout.strip() == load_identity(key).peer_id  # alone on stdout: `>> allow.txt` works
    before = key.read_bytes()
    p = run_cli("-m", "bootstrap", "keygen", "--identity", str(key), timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == load_identity(key).peer_id and key.read_bytes() == before
    p = run_cli("-m", "bootstrap", "keygen", "--identity", str(key), "--out", str(tmp_path / "s"), timeout=60)
    assert p.returncode == 2 and "not allowed with" in error_line(p, "swarm-bootstrap keygen")
    bad = tmp_path / "bad.txt"
    bad.write_text("alice\n")
    p = run_cli("-m", "bootstrap", "--identity", str(tmp_path / "id"), "--host", "127.0.0.1", "--port", "0",
                "--ledger", str(tmp_path / "l.json"), "--allowlist-file", str(bad), timeout=60)
    assert p.returncode == 1 and "line 1: 'alice' is not a peer id" in error_line(p, "swarm-bootstrap")
    p = run_cli("-m", "bootstrap", "--identity", str(key), "--host", "127.0.0.1", "--port", "0", "--ledger",
                str(tmp_path / "l.json"), "--allowlist-file", str(allow), "--checkpoint-dir", str(tmp_path / "arch"), timeout=60)
    assert p.returncode == 1 and f"this archivist ({load_identity(key).peer_id}) is not on the run's allowlist" \
        in error_line(p, "swarm-bootstrap")
    p = run_cli("-m", "peer", "--swarm.host", "127.0.0.1", "--data.max-bytes", "100000",
                "--swarm.allowlist-file", str(allow), timeout=90)
    assert p.returncode == 2 and "allowlist_file needs identity_path" in error_line(p, "swarm-peer")
    p = run_cli("-m", "peer", "--swarm.host", "127.0.0.1", "--data.max-bytes", "100000",
                "--swarm.allowlist-file", str(allow), "--swarm.identity-path", str(key), timeout=90)
    assert p.returncode == 1 and f"this peer ({load_identity(key).peer_id}) is not on the run's allowlist" \
        in error_line(p, "swarm-peer")
    assert bad.read_text() == "alice\n"


def test_cli_allowlisted_run_end_to_end(procs, tmp_path):
    """The documented commands: the operator lists the members' ids (from keygen --identity);
    the bootstrap node and 2 listed `swarm-peer`s train together, `swarm-peer status` with the
    list sees both, and their parameters agree after every round."""
    import json
    import signal

    from .conftest import PY, REPO, wait_exit, wait_for
    from .test_bad_input import run_cli

    allow = tmp_path / "allow.txt"
    for name in ("alice", "bob"):
        p = run_cli("-m", "bootstrap", "keygen", "--identity", str(tmp_path / f"{name}.key"), timeout=60)
        assert p.returncode == 0, p.stderr
        with allow.open("a") as f:
            f.write(p.stdout)
    boot, addr = procs.bootstrap("bootstrap", "--allowlist-file", str(allow))
    args = ["--sync.every-steps", "10", "--train.max-rounds", "200", "--swarm.allowlist-file", str(allow),
            "--checkpoint.keep-last", "0"]
    peers = [procs.peer(n, addr, *args, "--swarm.identity-path", str(tmp_path / f"{n}.key"),
                        "--checkpoint.dir", str(tmp_path / f"ckpt-{n}")) for n in ("alice", "bob")]
    for p in peers:
        wait_for(lambda: "round 2 complete: 2 peers" in procs.log(p), 200, "2 rounds of the allowlisted pair", p)
    st = subprocess.run([PY, "-m", "peer", "status", "--join", addr, "--allowlist-file", str(allow), "--json"],
                        cwd=REPO, capture_output=True, text=True, timeout=90)
    assert st.returncode == 0, st.stderr[-2000:]
    listed = set(allow.read_text().split())
    assert {p["peer_id"] for p in json.loads(st.stdout.strip().splitlines()[-1])["peers"]} == listed
    for p in peers:
        p.send_signal(signal.SIGTERM)
    for p in peers:
        assert wait_exit(procs, p, 120) == 0, procs.log(p)[-3000:]
    for r in (1, 2):  # both took part in each round and hold the same parameters after it
        a, b = (CheckpointDir.load(tmp_path / f"ckpt-{n}" / f"ckpt-r{r:06d}.safetensors", fingerprint=None, numel=None).theta_sync for n in ("alice", "bob"))
        assert torch.equal(a, b)
