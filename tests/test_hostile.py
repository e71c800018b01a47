"""A hostile peer in a real (in-process) swarm: robust aggregators hold, bad tensors are dropped
under every aggregator, repeat offenders are banned, and honest peers always agree."""
from __future__ import annotations

import json
import os

import pytest

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
        run_id=f"bad-{aggregator}")
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
    honest_only, _ = run_swarm(honest=4, hostiles=[], aggregator="trimmed_mean", run_id="t-base")
    base = max(o.val_loss for o in honest_only)
    for mode, factor in (("sign_flip", 1.0), ("noise", 100.0)):
        outcomes, _ = run_swarm(honest=4, hostiles=[Tamper(mode=mode, factor=factor)], aggregator="trimmed_mean",
                                run_id=f"t-{mode}")
        assert all(o.finite for o in outcomes) and _agree(outcomes)
        assert max(o.val_loss for o in outcomes) <= 1.05 * base, (mode, base, [o.val_loss for o in outcomes])
