"""A hostile peer in a real (in-process) swarm: robust aggregators hold, bad tensors are dropped
under every aggregator, repeat offenders are banned, and honest peers always agree."""
from __future__ import annotations

import json
import os
import threading

import pytest
import torch

from averaging.faults import Tamper

from .hostile import run_swarm

pytestmark = pytest.mark.timeout(600)


def _agree(outcomes) -> bool:
    top = max(o.round for o in outcomes)
    return len({o.digest for o in outcomes if o.round == top}) == 1


def test_robust_aggregators_withstand_a_100x_scaled_peer(tmp_path):
    honest_only, _ = run_swarm(honest=4, hostiles=[], aggregator="mean", run_id="h-base")
    base = max(o.val_loss for o in honest_only)
    results = {"all honest (mean)": base}
    for agg in ("mean", "trimmed_mean", "centered_clip"):
        outcomes, _ = run_swarm(honest=4, hostiles=[Tamper(mode="scale", factor=100)], aggregator=agg, run_id=f"h-{agg}")
        assert all(o.finite for o in outcomes) and _agree(outcomes)
        results[f"4 honest + 1 x100 ({agg})"] = max(o.val_loss for o in outcomes)
    print(json.dumps(results, indent=1))
    (tmp_path / "hostile_results.json").write_text(json.dumps(results))
    if os.environ.get("SWARMTRAIN_RESULTS"):
        with open(os.environ["SWARMTRAIN_RESULTS"], "a") as f:
            f.write(json.dumps(results) + "\n")
    assert results["4 honest + 1 x100 (trimmed_mean)"] <= 1.05 * base, results
    assert results["4 honest + 1 x100 (centered_clip)"] <= 1.05 * base, results
    assert results["4 honest + 1 x100 (mean)"] > 2 * base, results  # visibly damaged without a robust aggregator


@pytest.mark.parametrize("aggregator", ["mean", "trimmed_mean", "centered_clip"])
def test_nan_and_wrong_shape_are_dropped_and_senders_refused(aggregator):
    # 3 honest peers, one peer sending NaN/Inf-laced updates and one lying about its update's size.
    outcomes, (nan_peer, shape_peer) = run_swarm(
        honest=3, hostiles=[Tamper(mode="nan"), Tamper(mode="wrong_shape")], aggregator=aggregator, rounds=6,
        trim=0.34, run_id=f"bad-{aggregator}")  # trim 0.34: groups of 3 or more trim one value per side
    assert all(o.finite for o in outcomes), "a bad tensor reached the honest peers' parameters"
    assert _agree(outcomes)
    assert min(o.round for o in outcomes) >= 6  # the swarm kept training
    assert max(o.val_loss for o in outcomes) < 0.5  # and learned (the start is ~17; the floor is 0.25)
    # Every honest peer met the NaN sender in round 1 (everyone is in the DHT before it) and refused
    # its contribution. Repeat offences get it banned: at least one honest peer reaches ban_after
    # strikes. Not necessarily all: a peer that misses a round on a loaded machine counts fewer
    # strikes, and once a group's leader has banned the sender it is never grouped with the others
    # again, so their remaining strikes never come (which is the point of the ban).
    assert all(o.strikes.get(nan_peer.peer_id, 0) >= 1 for o in outcomes)
    assert any(nan_peer.peer_id in o.banned for o in outcomes)
    # The size liar is excluded from its first round, falls behind and re-syncs; it is refused each time.
    assert all(o.strikes.get(shape_peer.peer_id, 0) >= 1 for o in outcomes)


def test_trimmed_mean_withstands_sign_flipped_and_noise_updates():
    # trim 0.34 trims one value per side in every group of 3 to 5, so a round that forms
    # without one honest peer (a slow one, on a loaded machine) still excludes the hostile
    # one. (At trim 0.2 only groups of 5 are allowed: min_members.)
    honest_only, _ = run_swarm(honest=4, hostiles=[], aggregator="trimmed_mean", trim=0.34, run_id="t-base")
    base = max(o.val_loss for o in honest_only)
    for mode, factor in (("sign_flip", 1.0), ("noise", 100.0)):
        outcomes, _ = run_swarm(honest=4, hostiles=[Tamper(mode=mode, factor=factor)], aggregator="trimmed_mean",
                                trim=0.34, run_id=f"t-{mode}")
        assert all(o.finite for o in outcomes) and _agree(outcomes)
        assert max(o.val_loss for o in outcomes) <= 1.05 * base, (mode, base, [o.val_loss for o in outcomes])


@pytest.mark.timeout(120)
def test_a_group_too_small_for_a_robust_aggregator_fails_the_round():
    # The seam: a matchmaker that forms groups of 2 (a leader with other settings, or other
    # code). trimmed_mean at trim 0.2 trims nothing in a group of 2, so averaging there would
    # silently be the mean, letting one bad member through: the round must fail instead.
    import dataclasses

    from averaging import AllReduceConfig, Averager, AveragerConfig, MatchmakingConfig, SwarmDHT
    from averaging.config import AggregatorConfig

    boot = SwarmDHT.start("small-group", host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dhts = [SwarmDHT.start("small-group", initial_peers=boot.visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
            for _ in range(2)]
    robust = AveragerConfig(listen_host="127.0.0.1", announce_host="127.0.0.1", allreduce=AllReduceConfig(timeout=5),
                            aggregator=AggregatorConfig(name="trimmed_mean", trim=0.2),
                            matchmaking=MatchmakingConfig(min_group_size=5, window=20))
    avs = [Averager(d, robust) for d in dhts]
    for a in avs:
        a.matchmaker.cfg = dataclasses.replace(a.matchmaker.cfg, min_group_size=2)
    try:
        deltas = [torch.full((1000,), float(i)) for i in range(2)]
        results: dict[int, object] = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, avs[i].average(0, "fp", deltas[i], 1.0, expected_size=lambda: 2))) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        assert len(results) == 2
        for i, r in results.items():
            assert r.status == "failed" and r.mean_delta is None, r  # type: ignore[attr-defined]
            assert "too small for trimmed_mean (needs 5)" in r.error, r.error  # type: ignore[attr-defined]
            assert torch.equal(deltas[i], torch.full((1000,), float(i)))
    finally:
        for a in avs:
            a.close()
        for d in [*dhts, boot]:
            d.shutdown()
