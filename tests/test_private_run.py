"""Private runs: without the run's secret a peer can write no record, join no group and take
part in no all-reduce; the honest members are unaffected. Real DHTs, stores and gloo groups."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from averaging.access import SecretValidator, generate_secret_file, load_secret_file
from averaging.allreduce import weighted_allreduce
from averaging.averager import Averager, AveragerConfig
from averaging.config import AllReduceConfig
from averaging.dht import SwarmDHT
from averaging.errors import AccessError, StateError
from averaging.matchmaking import Group, MatchmakingConfig
from peer import Peer, PeerConfig, SwarmConfig, SyncConfig
from peer.membership import PEERS_KEY, live_peers, record_validator

from .test_codecs import _run_group

RUN = "private-test"
pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def secrets(tmp_path):
    good, other = tmp_path / "run.secret", tmp_path / "other.secret"
    generate_secret_file(good)
    generate_secret_file(other)
    return good, other


def test_secret_file_lifecycle(tmp_path, secrets):
    good, _ = secrets
    assert oct(good.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(StateError, match="refusing to overwrite"):
        generate_secret_file(good)
    bad = tmp_path / "bad.secret"
    bad.write_text("not hex\n")
    with pytest.raises(StateError, match="64 hex characters"):
        load_secret_file(bad)
    # rotation: a file with the new secret first and the old one second accepts both tags
    old, new = load_secret_file(good), load_secret_file(secrets[1])
    both = tmp_path / "rotating.secret"
    both.write_text(secrets[1].read_text() + good.read_text())
    rotating = load_secret_file(both)
    assert rotating.check(old.tag("x"), "x") and rotating.check(new.tag("x"), "x")
    assert rotating.tag("x") == new.tag("x") and not old.check(new.tag("x"), "x")


def test_outsiders_cannot_write_run_records(secrets):
    good, other = secrets
    secret = load_secret_file(good)
    nodes = []
    try:
        member = SwarmDHT.start(RUN, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=[record_validator(RUN)],
                                secret=secret)
        nodes.append(member)
        for outsider_secret in (None, load_secret_file(other)):
            outsider = SwarmDHT.start(RUN, initial_peers=member.visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                      record_validators=[record_validator(RUN)], secret=outsider_secret)
            nodes.append(outsider)
            outsider.put_signed(PEERS_KEY, _record(), ttl=60)
            assert outsider.peer_id not in live_peers(member)  # rejected by the member's node
        # (hivemind's store() reports the last replica's answer, and the outsiders' nodes refuse
        # the member's tagged record, so check what a member reads rather than the return value)
        member.put_signed(PEERS_KEY, _record(), ttl=60)
        assert member.peer_id in live_peers(member)
        assert SecretValidator(secret).priority > 10  # wraps the RSA signature, validated first
    finally:
        for n in nodes:
            n.shutdown()


def _record() -> dict:
    from peer.membership import PeerRecord
    return PeerRecord(round=0, fingerprint="f", schema="s", digest="d", host="127.0.0.1", port=1, t=1.0).to_record()


def test_allreduce_excludes_a_member_without_the_secret(secrets):
    good, other = secrets
    keys = [load_secret_file(good), load_secret_file(good), load_secret_file(other)]  # rank 2 is the outsider
    xs = [torch.full((1000,), float(i + 1)) for i in range(3)]

    def fn(store, rank):
        g = Group(0, ("a", "b", "c"), rank, "priv/", store)
        return weighted_allreduce(g, xs[rank], 1.0, host="127.0.0.1", timeout_s=30, secret=keys[rank])

    res = _run_group(3, fn)
    assert res[0].ok and res[1].ok and not res[2].ok
    assert torch.equal(res[0].mean_delta, torch.full((1000,), 1.5))  # (1 + 2) / 2: the outsider's 3 is out
    assert ("c", "no valid credential for this private run") in res[0].rejected


def test_private_swarm_trains_and_refuses_outsiders(secrets):
    """2 members and 2 outsiders (no secret, wrong secret) join through the same bootstrap."""
    good, other = secrets
    boot = SwarmDHT.start(RUN, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=[record_validator(RUN)],
                          secret=load_secret_file(good))
    out: dict[str, tuple] = {}
    errors: list[BaseException] = []
    init = nn.Linear(4, 1).state_dict()

    def train(name: str, secret_file: str, steps: int) -> None:
        try:
            model = nn.Linear(4, 1)
            model.load_state_dict(init)
            cfg = PeerConfig(swarm=SwarmConfig(run_id=RUN, initial_peers=boot.visible_maddrs(), host="127.0.0.1",
                                               secret_file=secret_file),
                             sync=SyncConfig(every_steps=10, matchmaking={"window": 8}, allreduce={"timeout": 20}))
            g = torch.Generator().manual_seed(hash(name) % 1000)
            with Peer(model, torch.optim.SGD(model.parameters(), lr=0.05), cfg) as peer:
                while peer.local_step < steps and not (secret_file == str(good) and peer.round >= 3):
                    x = torch.randn(16, 4, generator=g)
                    peer.step(nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)), samples=16)
                out[name] = (peer.peer_id, peer.round, peer.digest, [r.members for r in peer.history if r.ok])
        except AccessError as e:  # what an outsider gets: refused at start, in one line
            refused[name] = str(e)
        except BaseException as e:
            errors.append(e)

    refused: dict[str, str] = {}
    threads = [threading.Thread(target=train, args=a) for a in
               [("m1", str(good), 400), ("m2", str(good), 400), ("open", "", 40), ("wrong", str(other), 40)]]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=200)
    finally:
        boot.shutdown()
    assert not errors, errors
    members = {out["m1"][0], out["m2"][0]}
    assert out["m1"][1] >= 3 and out["m2"][1] >= 3 and out["m1"][2] == out["m2"][2]  # trained and agree
    assert all(set(g) == members for name in ("m1", "m2") for g in out[name][3])  # only members in every group
    assert set(out) == {"m1", "m2"} and set(refused) == {"open", "wrong"}  # the outsiders were refused at start
    assert "no credential" in refused["open"] and "does not accept this secret" in refused["wrong"]


def test_averager_without_credential_is_refused_by_the_leader(secrets):
    """An outsider that can read the DHT (it has the DHT secret) but joins a group without the
    matchmaking credential: the leader refuses its join, the members' round completes without it."""
    good, _ = secrets
    secret = load_secret_file(good)
    with averagers([(None, secret, secret), (None, secret, secret), (None, secret, None)]) as (dhts, avgs):
        results = average_together(avgs)
        members = {dhts[0].peer_id, dhts[1].peer_id}
        ok = [r for r in results.values() if r.ok]
        assert len(ok) == 2 and all(set(r.members) == members for r in ok), [(r.status, r.error) for r in results.values()]
        assert not results[2].ok


@contextmanager
def averagers(nodes: list[tuple[str | None, object, object]]) -> Iterator[tuple[list[SwarmDHT], list[Averager]]]:
    """One DHT node and Averager per (identity path, DHT credential, matchmaking credential),
    all on 127.0.0.1 and joined through the first; every one is closed on exit."""
    dhts, avgs = [], []
    try:
        for identity_path, dht_cred, mm_cred in nodes:
            d = SwarmDHT.start(RUN, initial_peers=dhts[0].visible_maddrs() if dhts else (),
                               host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity_path=identity_path, secret=dht_cred)
            dhts.append(d)
            cfg = AveragerConfig(listen_host="127.0.0.1", announce_host="127.0.0.1", allreduce=AllReduceConfig(timeout=20),
                                 matchmaking=MatchmakingConfig(window=6, join_timeout=3), secret=mm_cred)
            avgs.append(Averager(d, cfg))
        yield dhts, avgs
    finally:
        for a in avgs:
            a.close()
        for d in dhts:
            d.shutdown()


def average_together(avgs: list[Averager]) -> dict[int, object]:
    """Averager i averages a vector of i's at round 0, all at once; returns i -> RoundResult."""
    results: dict[int, object] = {}

    def go(i: int) -> None:
        results[i] = avgs[i].average(0, "fp", torch.full((100,), float(i)), 1.0, lambda: len(avgs))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(avgs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_cli_keygen_and_bad_secret_files(tmp_path):
    from .test_bad_input import error_line, run_cli

    out = tmp_path / "k" / "run.secret"
    p = run_cli("-m", "bootstrap", "keygen", "--out", str(out), timeout=60)
    assert p.returncode == 0 and out.exists() and load_secret_file(out)
    p = run_cli("-m", "bootstrap", "keygen", "--out", str(out), timeout=60)
    assert p.returncode == 1 and "refusing to overwrite" in error_line(p, "swarm-bootstrap keygen")
    bad = tmp_path / "bad.secret"
    bad.write_text("hunter2\n")
    p = run_cli("-m", "bootstrap", "--identity", str(tmp_path / "id"), "--host", "127.0.0.1", "--port", "0",
                "--ledger", str(tmp_path / "l.json"), "--secret-file", str(bad), timeout=60)
    assert p.returncode == 1 and "must hold one or more lines of 64 hex characters" in error_line(p, "swarm-bootstrap")
    p = run_cli("-m", "peer", "--swarm.host", "127.0.0.1", "--data.max-bytes", "100000",
                "--swarm.secret-file", str(tmp_path / "missing.secret"), timeout=90)
    assert p.returncode == 1 and "cannot read run secret" in error_line(p, "swarm-peer")
    assert bad.read_text() == "hunter2\n"
