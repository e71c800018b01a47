"""The contribution ledger and the run monitor, without a network: credit is added once,
survives a restart of the bootstrap (save + load), and a damaged file is never overwritten."""
from __future__ import annotations

import csv
import json

import pytest

from averaging.errors import StateError
from bootstrap.ledger import Ledger
from bootstrap.monitor import MAX_LOSS_POINTS, RunMonitor
from peer.membership import PeerRecord, RoundOutcome

FPS = 1e9  # FLOPs per sample


def rec(pid: str, samples: int, *, compute: float = 0.0, rounds: int = 0, loss: float | None = 2.0,
        recent: tuple = (), role: str = "trainer", fps: float = FPS, inc: str = "i1") -> PeerRecord:
    return PeerRecord(peer_id=pid, round=rounds, fingerprint="f", schema="s", digest="d", host="h", port=1,
                      samples=samples, compute_s=compute, rounds_ok=rounds, loss=loss, device="cpu", role=role,
                      flops_per_sample=fps, recent=recent, t=100.0, incarnation=inc)


def test_credit_counts_only_increments():
    led = Ledger(None)
    led.observe([rec("A", 100, compute=10, rounds=1)], flops_per_sample=FPS, now=1)
    led.observe([rec("A", 100, compute=10, rounds=1)], flops_per_sample=FPS, now=2)  # same record seen twice
    led.observe([rec("A", 250, compute=25, rounds=3)], flops_per_sample=FPS, now=3)
    (row,) = led.rows()
    assert (row["samples"], row["compute_s"], row["rounds"]) == (250, 25, 3)
    assert row["credit"] == 250 * FPS
    assert (row["first_seen"], row["last_seen"]) == (1, 3)


def test_peer_restart_with_same_identity_keeps_and_adds_credit():
    led = Ledger(None)
    led.observe([rec("A", 300)], flops_per_sample=FPS, now=1)
    led.observe([rec("A", 40, inc="i2")], flops_per_sample=FPS, now=2)  # a new incarnation: the peer restarted
    led.observe([rec("A", 90, inc="i2")], flops_per_sample=FPS, now=3)
    assert led.rows()[0]["samples"] == 300 + 90


def test_a_smaller_counter_within_one_incarnation_is_not_a_restart():
    """The measured case: a peer waiting in matchmaking published compute_s 250, then 57 once
    the wait ended (an older peer version). Same incarnation: nothing is credited twice."""
    led = Ledger(None)
    led.observe([rec("A", 100, compute=250.0, rounds=1)], flops_per_sample=FPS, now=1)
    led.observe([rec("A", 100, compute=57.0, rounds=1)], flops_per_sample=FPS, now=2)
    led.observe([rec("A", 120, compute=260.0, rounds=2)], flops_per_sample=FPS, now=3)
    (row,) = led.rows()
    assert (row["samples"], row["compute_s"], row["rounds"]) == (120, 260.0, 2)


def test_ledger_saved_before_incarnations_still_tells_a_restart(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text(json.dumps({"format": "swarmtrain-ledger-v1", "peers": [
        {"peer_id": "A", "first_seen": 1, "last_seen": 2, "samples": 300, "seen_samples": 300, "credit": 300 * FPS}]}))
    led = Ledger(path)
    led.observe([rec("A", 350)], flops_per_sample=FPS, now=3)  # grew: the same process, 50 new
    led.observe([rec("A", 20, inc="i2")], flops_per_sample=FPS, now=4)  # a new incarnation: 20 new
    assert led.rows()[0]["samples"] == 370


def test_archivists_earn_no_credit_and_leaderboard_is_ranked():
    led = Ledger(None)
    led.observe([rec("A", 10), rec("B", 30), rec("C", 20), rec("Z", 10**6, role="archivist")], flops_per_sample=FPS, now=1)
    assert [r["peer_id"] for r in led.rows()] == ["B", "C", "A"]
    assert [r["rank"] for r in led.rows()] == [1, 2, 3]


def test_ledger_survives_restart_without_double_counting(tmp_path):
    path = tmp_path / "ledger.json"
    led = Ledger(path)
    led.observe([rec("A", 100, compute=5, rounds=2), rec("B", 50)], flops_per_sample=FPS, now=1)
    led.save()
    before = led.rows()

    again = Ledger(path)  # a restarted bootstrap node
    assert again.rows() == before
    again.observe([rec("A", 100, compute=5, rounds=2), rec("B", 80)], flops_per_sample=FPS, now=2)  # A: nothing new
    rows = {r["peer_id"]: r for r in again.rows()}
    assert rows["A"]["samples"] == 100 and rows["B"]["samples"] == 80
    again.save()
    exported = list(csv.DictReader((tmp_path / "ledger.csv").read_text().splitlines()))
    assert [(r["peer_id"], int(r["samples"])) for r in exported] == [("A", 100), ("B", 80)]


@pytest.mark.parametrize("content", [
    "not json", "[]", '{"format": "other", "peers": []}',
    '{"format": "swarmtrain-ledger-v1", "peers": [{"peer_id": "A"}]}',
    '{"format": "swarmtrain-ledger-v1", "peers": [{"peer_id": "A", "first_seen": 1, "last_seen": 1, "samples": -5}]}',
    '{"format": "swarmtrain-ledger-v1", "peers": [{"peer_id": "A", "first_seen": 1, "last_seen": 1, "hack": 1}]}',
])
def test_damaged_ledger_is_reported_and_left_untouched(tmp_path, content):
    path = tmp_path / "ledger.json"
    path.write_text(content)
    with pytest.raises(StateError, match="ledger .* is unreadable") as e:
        Ledger(path)
    assert "\n" not in str(e.value)
    assert path.read_text() == content


def test_monitor_merges_round_outcomes_from_all_peers():
    mon = RunMonitor(None, "run", Ledger(None))
    ok = lambda r, t: RoundOutcome(round=r, status="complete", duration_s=0.5, bytes=100, members=2, t=t)  # noqa: E731
    bad = lambda r, t: RoundOutcome(round=r, status="failed", duration_s=2.0, bytes=0, members=1, t=t)  # noqa: E731
    mon.observe({"A": rec("A", 10, recent=(ok(1, 1.0), bad(2, 2.0))), "B": rec("B", 10, recent=(ok(1, 1.1), ok(2, 2.1)))}, now=1)
    # later, A retried round 2 and completed it; its record no longer carries round 1
    mon.observe({"A": rec("A", 20, recent=(bad(2, 2.0), ok(2, 3.0))), "B": rec("B", 20, recent=(ok(1, 1.1), ok(2, 2.1)))}, now=2)
    rounds = {r["round"]: r for r in mon.status()["rounds"]}
    assert rounds[1]["status"] == "complete" and rounds[1]["peers"] == 2  # remembered after A's record dropped it
    assert rounds[2]["status"] == "complete" and rounds[2]["bytes"] == 200
    # Only settled rounds (older than the newest) are counted, each once, however often polled.
    assert mon.status()["rounds_total"] == {"complete": 1, "failed": 0, "partial": 0}
    mon.observe({"A": rec("A", 30, recent=(ok(2, 3.0), bad(3, 4.0))), "B": rec("B", 30, recent=(ok(2, 2.1), ok(3, 4.1)))}, now=3)
    mon.observe({"A": rec("A", 30, recent=(ok(2, 3.0), bad(3, 4.0))), "B": rec("B", 30, recent=(ok(2, 2.1), ok(3, 4.1)))}, now=4)
    assert mon.status()["rounds_total"] == {"complete": 2, "failed": 0, "partial": 0}


def test_monitor_status_peers_and_loss_history():
    mon = RunMonitor(None, "run", Ledger(None))
    mon.observe({"A": rec("A", 10, loss=3.0), "B": rec("B", 30, loss=2.0), "Z": rec("Z", 0, role="archivist", loss=None)}, now=1)
    mon.observe({"A": rec("A", 20, loss=2.0), "B": rec("B", 40, loss=1.0)}, now=2)
    s = mon.status()
    assert s["peers_live"] == 2 and s["total_samples"] == 60
    assert [p["loss"] for p in s["loss_history"]] == [2.5, 1.5]
    assert {p["peer_id"] for p in mon.peers()} == {"A", "B"}
    assert [r["peer_id"] for r in mon.ledger()] == ["B", "A"]
    json.dumps(s)  # the dashboard serves it as JSON


def test_monitor_thins_a_long_loss_history_but_keeps_its_start():
    mon = RunMonitor(None, "run", Ledger(None))
    for i in range(3 * MAX_LOSS_POINTS):
        mon.observe({"A": rec("A", i + 1, loss=1.0 + 1 / (i + 1))}, now=float(i))
    hist = mon.status()["loss_history"]
    assert len(hist) <= MAX_LOSS_POINTS
    assert hist[0]["t"] == 0.0 and hist[-1]["t"] == 3 * MAX_LOSS_POINTS - 1


def test_one_peer_cannot_inflate_the_credit_unit():
    mon = RunMonitor(None, "run", Ledger(None))
    mon.observe({"A": rec("A", 100), "B": rec("B", 100), "C": rec("C", 100, fps=1e30)}, now=1)
    assert all(r["credit"] == 100 * FPS for r in mon.ledger())  # the median FLOPs/sample is used


def test_monitor_warns_when_rounds_stop_completing():
    """The dashboard's "last complete round" and its warning: a lone peer failing round after
    round (or a split swarm) must not look healthy."""
    import time

    ok = lambda r, t: RoundOutcome(round=r, status="complete", duration_s=0.5, bytes=100, members=2, t=t)  # noqa: E731
    bad = lambda r, t: RoundOutcome(round=r, status="failed", duration_s=2.0, bytes=0, members=1, t=t)  # noqa: E731
    now = time.time()
    mon = RunMonitor(None, "run", Ledger(None))
    s = mon.status()
    assert s["last_complete_round"] is None and not s["stalled"]  # nobody trains: nothing to warn about
    mon.observe({"A": rec("A", 10, recent=(ok(1, now - 30),)), "B": rec("B", 10, recent=(ok(1, now - 30),))}, now=now - 30)
    s = mon.status()
    assert s["last_complete_round"] == 1 and 29 < s["last_complete_age_s"] < 60 and not s["stalled"]
    assert s["version"] and s["stall_after_s"] == 120
    # B left; A alone fails round 2 again and again for minutes.
    mon2 = RunMonitor(None, "run", Ledger(None))
    mon2.observe({"A": rec("A", 10, recent=(ok(1, now - 600),))}, now=now - 600)
    mon2.observe({"A": rec("A", 20, recent=(ok(1, now - 600), bad(2, now - 300), bad(2, now - 10)))}, now=now)
    s = mon2.status()
    assert s["stalled"] and s["last_complete_round"] == 1 and s["failed_since_complete"] == 1
    assert s["last_complete_age_s"] >= 600
    # It completes round 2 with a new peer: the warning goes.
    mon2.observe({"A": rec("A", 30, recent=(ok(2, now),)), "C": rec("C", 5, recent=(ok(2, now),))}, now=time.time())
    s = mon2.status()
    assert not s["stalled"] and s["last_complete_round"] == 2 and s["failed_since_complete"] == 0


def test_monitor_lists_peers_joining_and_leaving():
    mon = RunMonitor(None, "run", Ledger(None))
    mon.observe({"A": rec("A", 10), "B": rec("B", 10)}, now=1)  # the swarm as found: no events
    assert mon.status()["events"] == []
    mon.observe({"A": rec("A", 20), "C": rec("C", 1)}, now=2)
    mon.observe({"A": rec("A", 30), "C": rec("C", 2), "Z": rec("Z", 0, role="archivist")}, now=3)
    events = [(e["t"], e["event"], e["peer_id"], e["role"]) for e in mon.status()["events"]]
    assert sorted(events[:2]) == [(2, "joined", "C", "trainer"), (2, "left", "B", "trainer")]
    assert events[2:] == [(3, "joined", "Z", "archivist")]


def test_monitor_keeps_validation_loss_throughput_and_the_run_config():
    """The organizer's view: validation loss per evaluated round (the mean of the peers at that
    round), throughput and peers at each point, and the configuration most trainers run."""
    from dataclasses import replace

    from peer.config import SyncConfig
    from peer.membership import RunSettings

    usual = RunSettings.of(SyncConfig(every_steps=50, codec={"name": "int8"}), params=431_360)
    odd = replace(usual, outer_lr=0.1)

    def trainer(pid, samples, val=None, val_round=0, settings=usual):
        return replace(rec(pid, samples), val_loss=val, val_round=val_round, settings=settings, samples_per_s=10.0)

    mon = RunMonitor(None, "run", Ledger(None))
    mon.observe({"A": trainer("A", 10, 4.0, 0), "B": trainer("B", 10)}, now=1)
    mon.observe({"A": trainer("A", 20, 4.0, 0), "B": trainer("B", 20, 3.0, 2)}, now=2)  # B evaluated round 2 first
    mon.observe({"A": trainer("A", 30, 2.0, 2), "B": trainer("B", 30, 3.0, 2), "C": trainer("C", 5, settings=odd)}, now=3)
    s = mon.status()
    assert [(v["round"], v["val_loss"]) for v in s["val_history"]] == [(0, 4.0), (2, 2.5)]
    assert [(p["throughput"], p["peers"]) for p in s["loss_history"]] == [(20.0, 2), (20.0, 2), (30.0, 3)]
    assert s["run_config"]["every_steps"] == 50 and s["run_config"]["compression"] == "int8"
    assert s["run_config"]["outer_lr"] == 0.7 and s["run_config"]["params"] == 431_360
    assert s["config_others"] == 1  # C runs another outer learning rate
    # What a peer publishes passes the DHT's schema, and what the schema rejects is not taken.
    good = trainer("A", 1, 2.5, 3).to_record()
    assert PeerRecord.parse("A", good).settings == usual
    assert PeerRecord.parse("A", {**good, "settings": {**good["settings"], "params": -1}}) is None
    assert PeerRecord.parse("A", {**good, "val_loss": float("nan")}) is None
    json.dumps(s)
