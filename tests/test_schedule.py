"""Unit tests for SyncSchedule (peer/schedule.py). Time is always passed explicitly: no sleeping."""
from __future__ import annotations

import pytest

from peer.schedule import SyncSchedule

T0 = 1_700_000_000.0  # a fixed, realistic "now"


def ticks(s: SyncSchedule, n: int) -> None:
    for _ in range(n):
        s.tick()


# ---------------------------------------------------------------- every_steps
def test_steps_due_exactly_at_h():
    s = SyncSchedule(every_steps=8, now=T0)
    assert not s.due(now=T0)
    for i in range(1, 8):
        s.tick()
        assert not s.due(now=T0 + 10_000), f"due too early after {i} steps"
    s.tick()
    assert s.steps_since_sync == 8
    assert s.due(now=T0)
    s.tick()  # still due while the sync has not happened
    assert s.due(now=T0)


def test_steps_failure_retries_after_quarter_period_not_immediately():
    s = SyncSchedule(every_steps=8, now=T0)
    ticks(s, 8)
    assert s.due(now=T0)
    s.done(False, now=T0)
    assert not s.due(now=T0), "retry must not be immediate"
    assert s.steps_since_sync == 8  # training continues; the count is not reset
    s.tick()  # 9
    assert not s.due(now=T0)
    s.tick()  # 10 = 8 + 8//4
    assert s.due(now=T0)
    # a second failure: again 2 more steps
    s.done(False, now=T0)
    s.tick()
    assert not s.due(now=T0)
    s.tick()
    assert s.due(now=T0)


def test_steps_success_resets():
    s = SyncSchedule(every_steps=8, now=T0)
    ticks(s, 8)
    s.done(False, now=T0)
    ticks(s, 2)
    assert s.due(now=T0)
    s.done(True, now=T0)
    assert s.steps_since_sync == 0
    assert not s.due(now=T0)
    ticks(s, 7)
    assert not s.due(now=T0)
    s.tick()
    assert s.due(now=T0)


@pytest.mark.parametrize("h,retry", [(1, 1), (3, 1), (4, 1), (7, 1), (8, 2), (10, 2), (100, 25), (101, 25)])
def test_steps_retry_interval(h, retry):
    s = SyncSchedule(every_steps=h, now=T0)
    ticks(s, h)
    s.done(False, now=T0)
    ticks(s, retry - 1)
    assert not s.due(now=T0)
    s.tick()
    assert s.due(now=T0)


def test_steps_only_never_due_by_time():
    s = SyncSchedule(every_steps=5, now=T0)
    assert not s.due(now=T0 + 10**9)
    ticks(s, 5)
    s.done(False, now=T0)
    assert not s.due(now=T0 + 10**9)


# ---------------------------------------------------------------- every_seconds
def test_seconds_aligned_to_wall_clock_multiples():
    s = SyncSchedule(every_seconds=60, now=125.0)
    assert not s.due(now=125.0)
    assert not s.due(now=179.999)
    assert s.due(now=180.0)
    assert s.due(now=200.0)


def test_seconds_peers_started_at_different_times_meet_at_same_boundary():
    a = SyncSchedule(every_seconds=60, now=121.0)
    b = SyncSchedule(every_seconds=60, now=179.5)
    for now in (179.6, 179.99):
        assert not a.due(now=now) and not b.due(now=now)
    assert a.due(now=180.0) and b.due(now=180.0)


def test_seconds_start_exactly_on_boundary_waits_a_full_period():
    s = SyncSchedule(every_seconds=60, now=120.0)
    assert not s.due(now=120.0)
    assert not s.due(now=179.9)
    assert s.due(now=180.0)


def test_seconds_success_realigns_to_next_multiple():
    s = SyncSchedule(every_seconds=60, now=125.0)
    assert s.due(now=180.0)
    s.done(True, now=183.5)  # the round took 3.5 s
    assert not s.due(now=239.9)
    assert s.due(now=240.0)
    # a round that overran the next boundary skips it rather than syncing again at once
    s.done(True, now=305.0)
    assert not s.due(now=305.0)
    assert not s.due(now=359.9)
    assert s.due(now=360.0)


def test_seconds_failure_retries_after_quarter_period():
    s = SyncSchedule(every_seconds=60, now=125.0)
    s.done(False, now=181.0)
    assert not s.due(now=181.0), "retry must not be immediate"
    assert not s.due(now=195.9)
    assert s.due(now=196.0)  # 181 + 60/4
    s.done(True, now=197.0)  # success realigns to the wall-clock grid
    assert not s.due(now=239.9)
    assert s.due(now=240.0)


def test_seconds_ticks_do_not_matter():
    s = SyncSchedule(every_seconds=60, now=125.0)
    ticks(s, 10_000)
    assert not s.due(now=150.0)


def test_steps_and_seconds_whichever_first():
    s = SyncSchedule(every_steps=10, every_seconds=60, now=125.0)
    ticks(s, 3)
    assert not s.due(now=170.0)
    assert s.due(now=180.0)  # time first
    s.done(True, now=180.0)
    ticks(s, 10)
    assert s.due(now=181.0)  # steps first
    s.done(False, now=181.0)
    assert not s.due(now=181.0)
    ticks(s, 2)  # 10 + 10//4
    assert s.due(now=181.0)


def test_default_now_uses_wall_clock():
    s = SyncSchedule(every_seconds=3600)
    assert isinstance(s.due(), bool)
    s.done(True)
    s.done(False)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("kw", [
    {}, {"every_steps": 0, "every_seconds": 0}, {"every_steps": 0, "every_seconds": 0.0},
    {"every_steps": -1}, {"every_seconds": -5.0}, {"every_steps": -1, "every_seconds": 10},
    {"every_steps": 10, "every_seconds": -1},
])
def test_invalid_schedule_raises(kw):
    with pytest.raises(ValueError):
        SyncSchedule(**kw, now=T0)


def test_compute_clock_never_goes_down_across_a_long_wait():
    """compute_s is published while a sync waits: it must exclude the wait so far, so the value
    after the wait is not smaller than one read during it (the ledger credits increments)."""
    from peer.schedule import ComputeClock

    c = ComputeClock(now=0.0)
    assert c.compute_s(now=10.0) == 10.0
    c.begin_wait(now=10.0)
    during = [c.compute_s(now=t) for t in (20.0, 100.0, 250.0)]
    assert during == [10.0, 10.0, 10.0]  # waiting in matchmaking is not compute
    assert c.end_wait(now=250.0) == 240.0
    assert c.compute_s(now=257.0) == 17.0 and c.wait_s == 240.0
    assert c.compute_s(now=256.0) == 17.0  # a reader with an older clock reading never sees it drop
