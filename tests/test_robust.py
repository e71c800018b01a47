"""Robust aggregation (averaging/robust.py): pure maths, no network. Fast."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from averaging.robust import (
    AggregatorConfig,
    aggregate,
    centered_clip,
    tolerated_faults,
    trim_count,
)

MEAN = AggregatorConfig(name="mean")
TRIM = AggregatorConfig(name="trimmed_mean", trim=0.2)
CLIP = AggregatorConfig(name="centered_clip")
ALL = [MEAN, TRIM, CLIP]
ROBUST = [TRIM, CLIP]


def ones(n: int) -> torch.Tensor:
    return torch.ones(n, dtype=torch.float32)


# --- mean ----------------------------------------------------------------------------------


def test_mean_is_the_weighted_mean():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1000, generator=g)
    w = torch.tensor([1.0, 2.0, 30.0, 4.0, 0.5])
    expected = (x.double() * w.double()[:, None]).sum(0) / w.double().sum()
    out = aggregate(x, w, MEAN)
    assert out.dtype == torch.float32 and out.shape == (1000,)
    torch.testing.assert_close(out, expected.float(), rtol=0, atol=0)
    # and what the all-reduce computes in float32, to float32 rounding
    torch.testing.assert_close(out, (x * w[:, None]).sum(0) / w.sum(), rtol=1e-6, atol=1e-6)


def test_mean_hand_computed():
    x = torch.tensor([[1.0, -2.0], [4.0, 2.0]])
    assert torch.equal(aggregate(x, torch.tensor([3.0, 1.0]), MEAN), torch.tensor([1.75, -1.0]))


# --- trimmed mean --------------------------------------------------------------------------


def test_trimmed_mean_hand_computed_n5():
    # columns: n = 5, trim = 0.2 → k = 1: drop the lowest and the highest value of each column
    x = torch.tensor(
        [
            [1.0, -5.0, 10.0, 1.0, 0.0],
            [2.0, 0.0, 9.0, 1.0, -1e30],
            [3.0, 0.0, 8.0, 1.0, 1.0],
            [4.0, 0.0, 7.0, 2.0, 2.0],
            [100.0, 5.0, 6.0, 2.0, 1e30],
        ]
    )
    expected = torch.tensor([3.0, 0.0, 8.0, 4.0 / 3.0, 1.0])
    w = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    assert torch.equal(aggregate(x, w, TRIM), expected)
    # unweighted: a member claiming a huge weight gains nothing
    assert torch.equal(aggregate(x, torch.tensor([1.0, 1.0, 1.0, 1.0, 1e30]), TRIM), expected)


def test_trimming_counts_the_whole_group_after_a_member_was_dropped():
    # A group of 5 at trim 0.2 tolerates one bad member. If another member's contribution was
    # already dropped (NaN), 4 rows remain: floor(0.2·4) = 0 would trim nothing and let the
    # x100 member through; k is computed on the group's 5.
    x = torch.tensor([[1.0], [2.0], [3.0], [300.0]])
    assert torch.equal(aggregate(x, ones(4), TRIM, group_size=5), torch.tensor([2.5]))
    assert torch.equal(aggregate(x, ones(4), TRIM), torch.tensor([76.5]))  # what it would be
    # k stays capped so that one value remains
    assert torch.equal(aggregate(x[:1], ones(1), TRIM, group_size=5), torch.tensor([1.0]))


@pytest.mark.parametrize("trim,need", [(0.2, 5), (0.25, 4), (0.34, 3), (0.4, 3), (0.1, 10), (0.19, 6), (0.0, 1)])
def test_min_members_is_the_smallest_group_that_trims_one_per_side(trim: float, need: int):
    cfg = AggregatorConfig(name="trimmed_mean", trim=trim)
    assert cfg.min_members == need
    if need > 1:
        assert trim_count(trim, need) == 1 and trim_count(trim, need - 1) == 0
    assert MEAN.min_members == 1 and CLIP.min_members == 3


def test_a_group_size_too_small_for_the_aggregator_is_a_config_error():
    from averaging.config import AveragerConfig, MatchmakingConfig, check_group_sizes

    with pytest.raises(ValueError, match=r"trimmed_mean \(trim 0.2\) needs groups of at least 5 peers.*"
                                         r"min_group_size is 2: set min_group_size >= 5 or a larger trim"):
        AveragerConfig(aggregator=TRIM)
    with pytest.raises(ValueError, match="centered_clip needs groups of at least 3 peers"):
        AveragerConfig(aggregator=CLIP)
    # a round larger than max_group_size is split into subgroups; they must be large enough too
    with pytest.raises(ValueError, match="set max_group_size >= 9"):
        check_group_sizes(TRIM, MatchmakingConfig(min_group_size=5, max_group_size=6))
    check_group_sizes(TRIM, MatchmakingConfig(min_group_size=5, max_group_size=9))
    check_group_sizes(MEAN, MatchmakingConfig(min_group_size=1, max_group_size=1))
    AveragerConfig(aggregator=CLIP, matchmaking=MatchmakingConfig(min_group_size=3))


def test_trimmed_mean_more_trimming_gives_median():
    x = torch.tensor([[5.0], [1.0], [4.0], [2.0], [3.0]])
    cfg = AggregatorConfig(name="trimmed_mean", trim=0.4)  # k = 2 of 5: only the median remains
    assert torch.equal(aggregate(x, ones(5), cfg), torch.tensor([3.0]))


def test_trim_count():
    assert trim_count(0.2, 5) == 1
    assert trim_count(0.2, 4) == 0
    assert trim_count(0.29, 100) == 29  # float maths would give 28.999… → 28
    assert trim_count(0.49, 4) == 1
    assert trim_count(0.4999999, 3) == 1  # at least one value remains
    assert trim_count(0.0, 7) == 0
    for n in range(1, 50):
        for trim in (0.0, 0.1, 0.2, 0.25, 0.33, 0.49, 0.4999999999):
            assert n - 2 * trim_count(trim, n) >= 1


def test_trimmed_mean_k0_is_the_unweighted_mean():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 300, generator=g)
    cfg = AggregatorConfig(name="trimmed_mean", trim=0.2)  # floor(0.8) = 0
    out = aggregate(x, torch.tensor([1.0, 9.0, 3.0, 7.0]), cfg)
    assert torch.equal(out, aggregate(x, ones(4), MEAN))
    torch.testing.assert_close(out, x.mean(0))


# --- robustness against one bad member of five ----------------------------------------------


def _honest(seed: int, n: int = 4, L: int = 2000) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    center = torch.randn(L, generator=g)
    honest = center + 0.3 * torch.randn(n, L, generator=g)  # [n, L]
    return honest, g


def _attacks(honest: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
    L = honest.shape[1]
    return {
        "scaled_100x": 100.0 * honest[0],
        "sign_flipped_100x": -100.0 * honest[0],
        "huge_noise": 1000.0 * torch.randn(L, generator=g),
    }


@pytest.mark.parametrize("attack", ["scaled_100x", "sign_flipped_100x", "huge_noise"])
@pytest.mark.parametrize("bad_rank", [0, 2, 4])
def test_one_bad_member_of_five(attack: str, bad_rank: int):
    honest, g = _honest(seed=42)
    bad = _attacks(honest, g)[attack]
    x = torch.cat([honest[:bad_rank], bad[None], honest[bad_rank:]])  # [5, L]
    # the bad member also claims a huge weight: the robust aggregators must not care
    w = torch.ones(5)
    w[bad_rank] = 1e6
    target = honest.mean(0)

    def rel_err(cfg: AggregatorConfig) -> float:
        return float((aggregate(x, w, cfg) - target).norm() / target.norm())

    assert rel_err(MEAN) > 5
    assert rel_err(AggregatorConfig(name="mean")) == rel_err(MEAN)
    for cfg in ROBUST:
        assert rel_err(cfg) < 0.5, cfg
    # equal weights: the mean is still far off
    assert float((aggregate(x, ones(5), MEAN) - target).norm() / target.norm()) > 5


def test_robust_aggregators_are_close_to_the_mean_without_attack():
    honest, _ = _honest(seed=7, n=5)
    target = honest.mean(0)
    for cfg in ROBUST:
        err = float((aggregate(honest, ones(5), cfg) - target).norm() / target.norm())
        assert err < 0.1, cfg


# --- centered clip specifics -----------------------------------------------------------------


def test_centered_clip_zero_iters_is_the_median():
    x = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [100.0, -1e9]])
    cfg = AggregatorConfig(name="centered_clip", clip_iters=0)
    assert torch.equal(aggregate(x, ones(4), cfg), torch.tensor([2.5, 15.0]))


def test_centered_clip_majority_agrees_exactly():
    # 3 of 5 rows equal: the median norm is 0, τ = 0, and the result is the majority's value
    v = torch.tensor([1.0, -2.0, 3.0])
    x = torch.stack([v, v, torch.tensor([9.0, 9.0, 9.0]), v, torch.tensor([-7.0, 0.0, 1e20])])
    assert torch.equal(aggregate(x, ones(5), CLIP), v)


def test_centered_clip_large_tau_converges_to_mean():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 50, generator=g)
    # with τ above every distance nothing is clipped: one iteration reaches the mean exactly
    cfg = AggregatorConfig(name="centered_clip", clip_tau=1e6, clip_iters=1)
    torch.testing.assert_close(aggregate(x, ones(6), cfg), x.mean(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cfg", ALL, ids=lambda c: c.name)
def test_scale_equivariance_is_exact_for_powers_of_two(cfg: AggregatorConfig):
    # τ is relative to the data, so aggregating 4·x gives exactly 4 times the result
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 333, generator=g)
    w = torch.rand(7, generator=g) + 0.1
    assert torch.equal(aggregate(4.0 * x, w, cfg), 4.0 * aggregate(x, w, cfg))
    assert torch.equal(aggregate(x / 1024.0, w, cfg), aggregate(x, w, cfg) / 1024.0)


# --- determinism and edge cases ----------------------------------------------------------------


@pytest.mark.parametrize("cfg", ALL, ids=lambda c: c.name)
def test_deterministic(cfg: AggregatorConfig):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(9, 5000, generator=g) * torch.logspace(-20, 20, 5000)
    w = torch.rand(9, generator=g) + 0.5
    a = aggregate(x, w, cfg)
    b = aggregate(x.clone(), w.clone(), cfg)
    assert torch.equal(a, b)
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))  # bit for bit, ±0.0 included
    # the thread count changes torch's reduction kernels' split; it must not change the result
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        c = aggregate(x, w, cfg)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a.view(torch.int32), c.view(torch.int32))


@pytest.mark.parametrize("cfg", ALL, ids=lambda c: c.name)
def test_single_member_returns_its_vector(cfg: AggregatorConfig):
    x = torch.tensor([[1.5, -3.25, 0.0, 1e-30, 3e38]])
    assert torch.equal(aggregate(x, torch.tensor([7.0]), cfg), x[0])


@pytest.mark.parametrize("cfg", ALL, ids=lambda c: c.name)
def test_all_equal_inputs(cfg: AggregatorConfig):
    v = torch.tensor([0.1, -2.5, 3e-8, 1e30, -0.0])
    x = v.repeat(6, 1)
    out = aggregate(x, torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), cfg)
    assert torch.equal(out, v)


@pytest.mark.parametrize("cfg", ALL, ids=lambda c: c.name)
def test_empty_part(cfg: AggregatorConfig):
    out = aggregate(torch.empty(5, 0), ones(5), cfg)
    assert out.shape == (0,) and out.dtype == torch.float32


@pytest.mark.parametrize("cfg", ALL, ids=lambda c: c.name)
def test_extreme_finite_inputs_stay_finite(cfg: AggregatorConfig):
    big = torch.finfo(torch.float32).max
    x = torch.tensor([[big, -big, big], [-big, big, big], [big, -big, -big], [big, big, big]])
    w = torch.tensor([3e38, 3e38, 1e-45, 1.0])
    out = aggregate(x, w, cfg)
    assert torch.isfinite(out).all()
    assert (out >= x.amin(0)).all() and (out <= x.amax(0)).all()


def test_input_validation():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="x must be"):
        aggregate(x[0], ones(3), MEAN)
    with pytest.raises(ValueError, match="x must be"):
        aggregate(x.double(), ones(3), MEAN)
    with pytest.raises(ValueError, match="no rows"):
        aggregate(torch.empty(0, 4), torch.empty(0), MEAN)
    with pytest.raises(ValueError, match="w must be"):
        aggregate(x, ones(2), MEAN)
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="weights"):
            aggregate(x, torch.tensor([1.0, bad, 1.0]), TRIM)
    for bad in (math.nan, math.inf, -math.inf):
        y = x.clone()
        y[1, 2] = bad
        with pytest.raises(ValueError, match=r"rows \[1\]"):
            aggregate(y, ones(3), CLIP)


# --- config and fault tolerance -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"name": "median"}, "name"),
        ({"trim": -0.1}, "trim"),
        ({"trim": 0.5}, "trim"),
        ({"trim": math.nan}, "trim"),
        ({"trim": True}, "trim"),
        ({"clip_tau": 0.0}, "clip_tau"),
        ({"clip_tau": -1.0}, "clip_tau"),
        ({"clip_tau": math.inf}, "clip_tau"),
        ({"clip_tau": math.nan}, "clip_tau"),
        ({"clip_iters": -1}, "clip_iters"),
        ({"clip_iters": 101}, "clip_iters"),
        ({"clip_iters": 1.5}, "clip_iters"),
        ({"trim": "a fifth"}, "trim"),
    ],
)
def test_config_validation(kwargs: dict, field: str):
    with pytest.raises(ValueError, match=field):
        AggregatorConfig(**kwargs)


def test_config_is_frozen_and_keyword_only():
    cfg = AggregatorConfig(name="trimmed_mean", trim=0, clip_tau=2, clip_iters=0)  # ints are fine
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.trim = 0.3  # type: ignore[misc]
    assert AggregatorConfig() == MEAN


def test_tolerated_faults():
    assert [tolerated_faults(MEAN, n) for n in (1, 5, 100)] == [0, 0, 0]
    assert [tolerated_faults(TRIM, n) for n in (1, 4, 5, 10, 11)] == [0, 0, 1, 2, 2]
    assert tolerated_faults(AggregatorConfig(name="trimmed_mean", trim=0.29), 100) == 29
    assert [tolerated_faults(CLIP, n) for n in (1, 5, 9, 10, 25, 100)] == [0, 0, 0, 1, 2, 10]
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="n must be"):
            tolerated_faults(MEAN, bad)  # type: ignore[arg-type]


def test_centered_clip_function_matches_aggregate():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(5, 64, generator=g)
    assert torch.equal(aggregate(x, ones(5), CLIP), centered_clip(x, 1.0, 3).float())


# --- property tests (only where hypothesis is installed) -----------------------------------------

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    st = None

if st is not None:
    _f32 = st.floats(allow_nan=False, allow_infinity=False, width=32)

    @st.composite
    def _inputs(draw):
        n = draw(st.integers(1, 7))
        L = draw(st.integers(0, 6))
        rows = draw(st.lists(st.lists(_f32, min_size=L, max_size=L), min_size=n, max_size=n))
        w = draw(
            st.lists(st.floats(min_value=2.0**-126, max_value=2.0**127, width=32), min_size=n, max_size=n)
        )
        x = torch.tensor(rows, dtype=torch.float32).reshape(n, L)
        return x, torch.tensor(w, dtype=torch.float32)

    @settings(max_examples=300, deadline=None)
    @given(_inputs(), st.sampled_from([0.0, 0.1, 0.2, 0.34, 0.49]))
    def test_property_trimmed_mean_finite_and_within_range(inputs, trim):
        x, w = inputs
        out = aggregate(x, w, AggregatorConfig(name="trimmed_mean", trim=trim))
        assert out.shape == (x.shape[1],) and torch.isfinite(out).all()
        if x.shape[1]:
            srt = x.sort(dim=0).values
            k = trim_count(trim, x.shape[0])
            # within the range of the values kept (so also within [min, max] of all)
            assert (out >= srt[k]).all() and (out <= srt[x.shape[0] - 1 - k]).all()

    @settings(max_examples=200, deadline=None)
    @given(_inputs(), st.sampled_from(["mean", "centered_clip"]), st.floats(0.01, 100.0), st.integers(0, 5))
    def test_property_mean_and_clip_finite_within_range_deterministic(inputs, name, tau, iters):
        x, w = inputs
        cfg = AggregatorConfig(name=name, clip_tau=tau, clip_iters=iters)
        out = aggregate(x, w, cfg)
        assert torch.isfinite(out).all()
        if x.shape[1]:
            assert (out >= x.amin(0)).all() and (out <= x.amax(0)).all()
        assert torch.equal(out.view(torch.int32), aggregate(x.clone(), w.clone(), cfg).view(torch.int32))
