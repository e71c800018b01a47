"""Unit tests for parsing untrusted DHT records: PeerRecord.parse (peer/membership.py) and
Candidate.from_record / MatchmakingConfig (averaging/matchmaking.py). No DHT is started.

PeerRecord.parse applies the same strict schema the DHT nodes' SchemaValidator applies:
every field present, no type conversions (3 is not 3.0), counts >= 0, floats finite."""
from __future__ import annotations

import math

import pytest

from averaging.matchmaking import Candidate, MatchmakingConfig
from peer.membership import PeerRecord

VALID = {
    "round": 3, "fingerprint": "0123456789abcdef", "schema": "14 tensors, 431,360 parameters",
    "digest": "ab" * 32, "host": "10.0.0.5", "port": 40123, "step": 120, "samples": 7680,
    "loss": 2.5, "device": "cpu", "version": "0.1.0", "t": 1_700_000_000.25, "role": "trainer",
    "samples_per_s": 64.5, "compute_s": 120.0, "rounds_ok": 3, "rounds_failed": 1, "bytes_sent": 10_000_000,
    "bytes_recv": 10_000_000, "flops_per_sample": 1.5e9, "incarnation": "9f86d081884c7d65",
    "maddrs": ["/ip4/10.0.0.5/tcp/40000/p2p/QmWH2338V6q5FLN3NsMADqYNozuKPRhJvZSiHCtxj3NZkt"],
    "catch_up_round": 0, "catch_up_digest": "", "val_loss": 2.51, "val_round": 3,
    "settings": {"params": 431_360, "every_steps": 50, "every_seconds": 0.0, "outer_lr": 0.7, "outer_momentum": 0.9,
                 "nesterov": True, "compression": "fp32", "aggregator": "mean", "fragments": 1, "overlap": False,
                 "min_group_size": 2, "max_group_size": 64},
    "recent": [{"round": 3, "status": "complete", "duration_s": 0.4, "bytes": 3_000_000, "members": 3, "t": 1_700_000_000.0}],
}
REQUIRED = list(VALID)


# ---------------------------------------------------------------- PeerRecord.parse
def test_parse_valid_record():
    r = PeerRecord.parse("QmPeer", dict(VALID))
    assert r is not None
    assert r.peer_id == "QmPeer"
    assert (r.round, r.port, r.step, r.samples, r.loss, r.t) == (3, 40123, 120, 7680, 2.5, 1_700_000_000.25)
    assert (r.fingerprint, r.host, r.device, r.version) == ("0123456789abcdef", "10.0.0.5", "cpu", "0.1.0")


def test_parse_metrics_fields():
    r = PeerRecord.parse("p", dict(VALID))
    assert (r.samples_per_s, r.compute_s, r.rounds_ok, r.rounds_failed) == (64.5, 120.0, 3, 1)
    assert r.recent[0].status == "complete" and r.recent[0].bytes == 3_000_000


def test_parse_round_trip_through_to_record():
    r = PeerRecord.parse("p", dict(VALID))
    rec = r.to_record()
    assert "peer_id" not in rec
    assert PeerRecord.parse("p", rec) == r
    assert PeerRecord.parse("other", rec) == r  # peer_id is not part of equality


def test_parse_rejects_unknown_keys():
    # hivemind's SchemaValidator forbids extra fields, so the parser does too (one schema everywhere)
    assert PeerRecord.parse("p", {**VALID, "future_field": [1, 2, 3]}) is None


def test_parse_accepts_boundaries():
    assert PeerRecord.parse("p", {**VALID, "round": 0, "step": 0, "samples": 0}) is not None
    assert PeerRecord.parse("p", {**VALID, "port": 1}) is not None
    assert PeerRecord.parse("p", {**VALID, "port": 65535}) is not None
    assert PeerRecord.parse("p", {**VALID, "schema": "x" * 256}) is not None
    assert PeerRecord.parse("p", {**VALID, "loss": None}) is not None
    assert PeerRecord.parse("p", {**VALID, "recent": []}) is not None


@pytest.mark.parametrize("key,value", [
    ("loss", 3), ("t", 5),  # strict: an int where a float belongs needs a conversion
    ("samples_per_s", -1.0), ("compute_s", -0.5), ("rounds_ok", -1), ("bytes_sent", -10), ("flops_per_sample", math.inf),
    ("role", "admin"), ("recent", [{"round": 1}]), ("recent", [VALID["recent"][0]] * 6),
    ("recent", [{**VALID["recent"][0], "status": "great"}]), ("recent", [{**VALID["recent"][0], "bytes": -1}]),
])
def test_parse_rejects_bad_metrics(key, value):
    assert PeerRecord.parse("p", {**VALID, key: value}) is None


@pytest.mark.parametrize("rec", [None, [], [("round", 1)], "record", 42, 3.5, b"bytes", (1, 2)])
def test_parse_rejects_non_dict(rec):
    assert PeerRecord.parse("p", rec) is None


@pytest.mark.parametrize("key", REQUIRED)
def test_parse_rejects_missing_key(key):
    rec = dict(VALID)
    del rec[key]
    assert PeerRecord.parse("p", rec) is None


@pytest.mark.parametrize("key", ["round", "step", "samples"])
@pytest.mark.parametrize("value", [-1, -(10**9), True, False, 1.0, "3", None, [3]])
def test_parse_rejects_bad_counters(key, value):
    assert PeerRecord.parse("p", {**VALID, key: value}) is None


@pytest.mark.parametrize("key", ["fingerprint", "schema", "digest", "host", "device", "version"])
def test_parse_rejects_huge_or_non_string(key):
    assert PeerRecord.parse("p", {**VALID, key: "x" * 257}) is None
    assert PeerRecord.parse("p", {**VALID, key: "x" * 100_000}) is None
    assert PeerRecord.parse("p", {**VALID, key: 123}) is None
    assert PeerRecord.parse("p", {**VALID, key: b"bytes"}) is None
    assert PeerRecord.parse("p", {**VALID, key: ["list"]}) is None


@pytest.mark.parametrize("port", [-1, 65536, 10**6, "40123", 40123.0, None])
def test_parse_rejects_bad_port(port):
    assert PeerRecord.parse("p", {**VALID, "port": port}) is None


@pytest.mark.parametrize("loss", ["2.5", "nan", [2.5], {"v": 1}, b"1"])
def test_parse_rejects_non_numeric_loss(loss):
    assert PeerRecord.parse("p", {**VALID, "loss": loss}) is None


@pytest.mark.parametrize("t", ["now", None, [1.0]])
def test_parse_rejects_bad_time(t):
    assert PeerRecord.parse("p", {**VALID, "t": t}) is None


def test_parse_rejects_bool_port():
    assert PeerRecord.parse("p", {**VALID, "port": True}) is None


@pytest.mark.parametrize("key,value", [("loss", True), ("t", False), ("loss", math.nan), ("t", math.inf)])
def test_parse_rejects_bool_or_nonfinite_floats(key, value):
    assert PeerRecord.parse("p", {**VALID, key: value}) is None


# ---------------------------------------------------------------- Candidate.from_record
CAND = {"t": 100.5, "host": "10.0.0.5", "port": 40123, "nonce": "0123456789abcdef"}


def test_candidate_from_valid_record_and_round_trip():
    c = Candidate.from_record("QmA", dict(CAND))
    assert c == Candidate(100.5, "QmA", "10.0.0.5", 40123, "0123456789abcdef")
    assert Candidate.from_record("QmA", c.to_record()) == c


def test_candidate_int_time_becomes_float():
    c = Candidate.from_record("QmA", {**CAND, "t": 100})
    assert c is not None and isinstance(c.t, float) and c.t == 100.0


def test_candidate_accepts_boundaries():
    assert Candidate.from_record("p", {**CAND, "host": "h" * 255, "nonce": "n" * 64, "port": 65535}) is not None
    assert Candidate.from_record("p", {**CAND, "host": "h", "nonce": "n", "port": 1}) is not None


@pytest.mark.parametrize("rec", [
    None, [], "x", 5, (100.5, "h", 1, "n"),
    {},
    {k: v for k, v in CAND.items() if k != "t"},
    {k: v for k, v in CAND.items() if k != "host"},
    {k: v for k, v in CAND.items() if k != "port"},
    {k: v for k, v in CAND.items() if k != "nonce"},
    {**CAND, "t": "100.5"}, {**CAND, "t": None}, {**CAND, "t": [1.0]},
    {**CAND, "host": ""}, {**CAND, "host": "h" * 256}, {**CAND, "host": 10}, {**CAND, "host": None},
    {**CAND, "port": 0}, {**CAND, "port": -1}, {**CAND, "port": 65536}, {**CAND, "port": "40123"},
    {**CAND, "port": 40123.0}, {**CAND, "port": None},
    {**CAND, "nonce": ""}, {**CAND, "nonce": "n" * 65}, {**CAND, "nonce": 7}, {**CAND, "nonce": None},
])
def test_candidate_rejects_malformed(rec):
    assert Candidate.from_record("p", rec) is None


@pytest.mark.parametrize("rec", [
    {**CAND, "t": math.nan}, {**CAND, "t": math.inf}, {**CAND, "t": -math.inf},
    {**CAND, "port": True}, {**CAND, "t": True},
])
def test_candidate_rejects_nonfinite_time_and_bool(rec):
    assert Candidate.from_record("p", rec) is None


def test_candidate_ordering_by_time_then_peer_id():
    a = Candidate(1.0, "zzz", "h1", 1, "n1")
    b = Candidate(2.0, "aaa", "h2", 2, "n2")
    c = Candidate(2.0, "bbb", "h0", 3, "n0")
    d = Candidate(0.5, "mmm", "h9", 9, "n9")
    assert sorted([b, c, a, d]) == [d, a, b, c]
    assert min([c, b, a]) is a
    assert b < c  # same time: the smaller peer id wins
    # host, port and nonce do not take part in ordering or equality
    assert Candidate(2.0, "aaa", "other", 7, "x") == b
    assert not (Candidate(2.0, "aaa", "a-host", 1, "a") < b)


def test_candidate_election_is_independent_of_listing_order():
    import itertools
    cands = [Candidate(t, pid, "h", 1, "n") for t, pid in [(3.0, "a"), (1.0, "c"), (1.0, "b"), (2.0, "d")]]
    for perm in itertools.permutations(cands):
        assert min(perm).peer_id == "b"


def test_candidate_election_with_nan_record_is_order_independent():
    import itertools
    recs = {"a": {**CAND, "t": 2.0}, "b": {**CAND, "t": math.nan}, "c": {**CAND, "t": 1.0}}
    parsed = [c for pid, rec in recs.items() if (c := Candidate.from_record(pid, rec)) is not None]
    leaders = {min(perm).peer_id for perm in itertools.permutations(parsed)}
    assert len(leaders) == 1


# ---------------------------------------------------------------- MatchmakingConfig
def test_matchmaking_config_defaults_and_edges():
    cfg = MatchmakingConfig()
    assert (cfg.min_group_size, cfg.max_group_size, cfg.window, cfg.join_timeout) == (2, 64, 15.0, 5.0)
    MatchmakingConfig(min_group_size=1, max_group_size=1)
    MatchmakingConfig(min_group_size=5, max_group_size=5, window=0.01, join_timeout=0.01)


@pytest.mark.parametrize("kw,match", [
    ({"min_group_size": 0}, "min_group_size"),
    ({"min_group_size": -3}, "min_group_size"),
    ({"min_group_size": 3, "max_group_size": 2}, "max_group_size"),
    ({"max_group_size": 1}, "max_group_size"),  # default min is 2
    ({"window": 0}, "window"),
    ({"window": -1.0}, "window"),
    ({"window": math.nan}, "window"),
    ({"join_timeout": 0}, "join_timeout"),
    ({"join_timeout": -0.5}, "join_timeout"),
    ({"join_timeout": math.nan}, "join_timeout"),
])
def test_matchmaking_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        MatchmakingConfig(**kw)


def test_peer_record_port_zero_means_cannot_serve():
    """Client-mode peers (behind NAT) announce port 0: counted as members, never used as donors."""
    assert PeerRecord.parse("p", {**VALID, "port": 0}) is not None
