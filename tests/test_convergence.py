"""A small, fast version of the convergence benchmark (benchmarks/convergence, docs/benchmarks.md).

Two real `swarm-peer` processes (DiLoCo, the default outer optimizer) against one process
training alone, each worker on the same number of samples, the same initial weights and
the same validation windows. Averaging must not cost progress: the swarm's model improves
at least as much as a lone peer's, within a tolerance. The same harness runs the full
benchmark, so this also keeps `python -m benchmarks.convergence` working.
"""
from __future__ import annotations

import dataclasses

import pytest

from benchmarks.convergence.harness import BY_NAME, Setup, run

STEPS, H = 60, 20
# Evaluate every 2 rounds (--train.eval-every-rounds 2) and at the end: rounds 2 and 3.
SMALL = Setup(peers=2, steps=STEPS, eval_every_steps=2 * H, eval_batches=8, max_bytes=2_000_000)
# Relative slack on the improvement (val_start - val_final, about 2.5 nats here): averaging
# two workers' pseudo-gradients is noisier than one worker's own trajectory early on.
TOLERANCE = 0.05
# The default outer step (Nesterov 0.7 / 0.9 with its momentum ramped up over the first
# rounds) against plain averaging from a cold start: it may trail by at most this share of
# plain averaging's improvement. Without the warm-up, full momentum on the first, large
# pseudo-gradients overshoots (docs/benchmarks.md, "Outer warm-up").
COLD_TOLERANCE = 0.02


@pytest.fixture(scope="module")
def default_swarm(tmp_path_factory):
    """2 `swarm-peer`s with the default outer optimizer (warm-up included), H = 20."""
    return run(dataclasses.replace(BY_NAME["diloco-h50-w4"], every=H), SMALL, seed=0,
               work=tmp_path_factory.mktemp("swarm"), netns=False)


@pytest.mark.timeout(300)
def test_two_peer_swarm_improves_at_least_as_well_as_one_peer(tmp_path, default_swarm):
    lone = run(BY_NAME["single"], dataclasses.replace(SMALL, peers=1), seed=0, work=tmp_path / "single", netns=False)
    swarm = default_swarm

    # Same start: same seed, same weights, same validation windows.
    assert swarm.val_start == pytest.approx(lone.val_start, abs=1e-6)
    assert lone.curve[-1][0] == STEPS * SMALL.batch_size  # the lone peer saw one worker's samples
    assert swarm.curve[-1][0] == 2 * STEPS * SMALL.batch_size  # two workers, the same per worker
    assert [n for n, _ in swarm.curve] == [0, 2 * 2 * H * SMALL.batch_size, 2 * STEPS * SMALL.batch_size]
    assert swarm.rounds == STEPS // H and swarm.rounds_failed == 0  # it really averaged, every round
    assert swarm.payload_bytes_per_peer > 0 and lone.payload_bytes_per_peer == 0

    lone_gain, swarm_gain = lone.val_start - lone.val_final, swarm.val_start - swarm.val_final
    print(f"\nconvergence: from {lone.val_start:.4f}, lone peer -> {lone.val_final:.4f}, "
          f"2-peer swarm -> {swarm.val_final:.4f} ({swarm_gain / lone_gain:.3f}x the lone peer's gain)")
    assert lone_gain > 1.0, f"the lone peer did not train: {lone.val_start:.3f} -> {lone.val_final:.3f}"
    assert swarm_gain >= (1 - TOLERANCE) * lone_gain, (
        f"swarm improved {swarm_gain:.3f} (-> {swarm.val_final:.4f}), "
        f"a lone peer {lone_gain:.3f} (-> {lone.val_final:.4f}) on the same samples per peer")


@pytest.mark.timeout(300)
def test_the_default_outer_step_is_not_worse_than_plain_averaging_from_a_cold_start(tmp_path, default_swarm):
    plain = run(dataclasses.replace(BY_NAME["avg-h50"], every=H), SMALL, seed=0, work=tmp_path / "plain", netns=False)
    assert plain.val_start == pytest.approx(default_swarm.val_start, abs=1e-6)
    assert plain.rounds == default_swarm.rounds == STEPS // H
    plain_gain = plain.val_start - plain.val_final
    default_gain = default_swarm.val_start - default_swarm.val_final
    print(f"\ncold start: plain averaging -> {plain.val_final:.4f}, default outer step -> {default_swarm.val_final:.4f}")
    assert plain_gain > 1.0, f"plain averaging did not train: {plain.val_start:.3f} -> {plain.val_final:.3f}"
    assert default_gain >= (1 - COLD_TOLERANCE) * plain_gain, (
        f"default outer step improved {default_gain:.3f} (-> {default_swarm.val_final:.4f}), "
        f"plain averaging {plain_gain:.3f} (-> {plain.val_final:.4f})")
