"""Unit tests for the outer optimizer (averaging/outer.py): pure maths, no network."""
from __future__ import annotations

import math

import pytest
import torch

from averaging.outer import OuterConfig, OuterOptimizer, outer_step


def t64(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


# ---------------------------------------------------------------- hand-computed numbers
def test_nesterov_two_steps_hand_computed():
    cfg = OuterConfig(lr=0.7, momentum=0.9, nesterov=True)
    theta = t64(1.0, 2.0)
    d1 = t64(0.5, -1.0)
    # step 1: buf = d1 = [0.5, -1.0]; update = d1 + 0.9*buf = 1.9*d1 = [0.95, -1.9]
    #         theta = [1 - 0.7*0.95, 2 - 0.7*(-1.9)] = [1 - 0.665, 2 + 1.33] = [0.335, 3.33]
    theta1, buf1 = outer_step(theta, d1, None, cfg)
    assert torch.allclose(buf1, t64(0.5, -1.0), atol=1e-12)
    assert torch.allclose(theta1, t64(0.335, 3.33), atol=1e-12)
    # step 2: d2 = [0.2, 0.4]; buf = 0.9*[0.5, -1.0] + d2 = [0.45+0.2, -0.9+0.4] = [0.65, -0.5]
    #         update = d2 + 0.9*buf = [0.2+0.585, 0.4-0.45] = [0.785, -0.05]
    #         theta = [0.335 - 0.7*0.785, 3.33 - 0.7*(-0.05)] = [0.335-0.5495, 3.33+0.035] = [-0.2145, 3.365]
    d2 = t64(0.2, 0.4)
    theta2, buf2 = outer_step(theta1, d2, buf1, cfg)
    assert torch.allclose(buf2, t64(0.65, -0.5), atol=1e-12)
    assert torch.allclose(theta2, t64(-0.2145, 3.365), atol=1e-12)


def test_nesterov_two_steps_hand_computed_fp32():
    cfg = OuterConfig(lr=0.7, momentum=0.9)
    theta1, buf1 = outer_step(torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0]), None, cfg)
    assert theta1.dtype == torch.float32
    assert torch.allclose(theta1, torch.tensor([0.335, 3.33]), atol=1e-6, rtol=0)
    theta2, _ = outer_step(theta1, torch.tensor([0.2, 0.4]), buf1, cfg)
    assert torch.allclose(theta2, torch.tensor([-0.2145, 3.365]), atol=1e-6, rtol=0)


def test_classic_momentum_two_steps_hand_computed():
    cfg = OuterConfig(lr=0.7, momentum=0.9, nesterov=False)
    # step 1: buf = [0.5, -1.0]; update = buf; theta = [1 - 0.35, 2 + 0.7] = [0.65, 2.7]
    theta1, buf1 = outer_step(t64(1.0, 2.0), t64(0.5, -1.0), None, cfg)
    assert torch.allclose(theta1, t64(0.65, 2.7), atol=1e-12)
    # step 2: buf = [0.65, -0.5]; update = buf; theta = [0.65 - 0.455, 2.7 + 0.35] = [0.195, 3.05]
    theta2, buf2 = outer_step(theta1, t64(0.2, 0.4), buf1, cfg)
    assert torch.allclose(buf2, t64(0.65, -0.5), atol=1e-12)
    assert torch.allclose(theta2, t64(0.195, 3.05), atol=1e-12)


def test_zero_momentum_is_plain_sgd_and_has_no_buffer():
    cfg = OuterConfig(lr=0.5, momentum=0.0)
    assert cfg.nesterov is False  # Nesterov without momentum is turned off, like torch refuses it
    # theta = [1 - 0.5*0.5, 2 - 0.5*(-1)] = [0.75, 2.5]
    theta1, buf = outer_step(t64(1.0, 2.0), t64(0.5, -1.0), None, cfg)
    assert buf is None
    assert torch.allclose(theta1, t64(0.75, 2.5), atol=1e-12)
    # a stale buffer passed in is ignored when momentum is 0
    theta2, buf2 = outer_step(t64(1.0, 2.0), t64(0.5, -1.0), t64(100.0, 100.0), cfg)
    assert buf2 is None and torch.equal(theta1, theta2)


# ---------------------------------------------------------------- equivalence with torch.optim.SGD
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("lr,momentum", [(0.7, 0.9), (0.3, 0.5), (1.0, 0.0)])
def test_matches_torch_sgd_trajectory(nesterov, lr, momentum):
    g = torch.Generator().manual_seed(1234)
    theta0 = torch.randn(17, generator=g)
    deltas = [torch.randn(17, generator=g) for _ in range(5)]
    cfg = OuterConfig(lr=lr, momentum=momentum, nesterov=nesterov)

    p = torch.nn.Parameter(theta0.clone())
    opt = torch.optim.SGD([p], lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    theta, buf = theta0.clone(), None
    for d in deltas:
        p.grad = d.clone()
        opt.step()
        theta, buf = outer_step(theta, d, buf, cfg)
        assert torch.allclose(theta, p.detach(), atol=1e-6, rtol=1e-6)
        if momentum > 0:
            assert torch.allclose(buf, opt.state[p]["momentum_buffer"], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- lr=1, momentum=0 is averaging
def test_lr1_momentum0_is_weighted_averaging():
    g = torch.Generator().manual_seed(7)
    theta_sync = torch.randn(11, dtype=torch.float64, generator=g)
    locals_ = [torch.randn(11, dtype=torch.float64, generator=g) for _ in range(3)]
    weights = [1.0, 3.0, 0.5]
    total = sum(weights)
    mean_local = sum(w * x for w, x in zip(weights, locals_)) / total
    mean_delta = sum(w * (theta_sync - x) for w, x in zip(weights, locals_)) / total
    new, buf = outer_step(theta_sync, mean_delta, None, OuterConfig(lr=1.0, momentum=0.0))
    assert buf is None
    assert torch.allclose(new, mean_local, atol=1e-12)


def test_lr1_momentum0_hand_computed_average():
    # locals [0, 4] (w=1) and [2, 8] (w=3): weighted mean = [(0+6)/4, (4+24)/4] = [1.5, 7.0]
    # theta_sync [1, 1]: deltas [1, -3] and [-1, -7]; weighted mean delta = [(1-3)/4, (-3-21)/4] = [-0.5, -6.0]
    new, _ = outer_step(t64(1.0, 1.0), t64(-0.5, -6.0), None, OuterConfig(lr=1.0, momentum=0.0))
    assert torch.allclose(new, t64(1.5, 7.0), atol=1e-12)


# ---------------------------------------------------------------- purity and validation
@pytest.mark.parametrize("nesterov", [True, False])
def test_inputs_not_mutated(nesterov):
    theta, delta, buf = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.1, -0.2, 0.3]), torch.tensor([0.5, 0.5, 0.5])
    copies = theta.clone(), delta.clone(), buf.clone()
    cfg = OuterConfig(lr=0.7, momentum=0.9, nesterov=nesterov)
    new_theta, new_buf = outer_step(theta, delta, buf, cfg)
    assert torch.equal(theta, copies[0]) and torch.equal(delta, copies[1]) and torch.equal(buf, copies[2])
    # outputs do not alias the inputs
    new_theta.add_(1.0)
    new_buf.add_(1.0)
    assert torch.equal(theta, copies[0]) and torch.equal(delta, copies[1]) and torch.equal(buf, copies[2])


def test_first_step_buffer_does_not_alias_delta():
    delta = torch.tensor([0.5, -1.0])
    _, buf = outer_step(torch.tensor([1.0, 2.0]), delta, None, OuterConfig())
    buf.mul_(0)
    assert torch.equal(delta, torch.tensor([0.5, -1.0]))


@pytest.mark.parametrize("theta_shape,delta_shape", [((3,), (4,)), ((3,), (1,)), ((2, 3), (6,)), ((6,), (3, 2))])
def test_shape_mismatch_raises(theta_shape, delta_shape):
    with pytest.raises(ValueError, match="shape mismatch"):
        outer_step(torch.zeros(theta_shape), torch.zeros(delta_shape), None, OuterConfig())
    with pytest.raises(ValueError, match="shape mismatch"):
        outer_step(torch.zeros(theta_shape), torch.zeros(delta_shape), None, OuterConfig(momentum=0.0))


@pytest.mark.parametrize("kw", [
    {"lr": 0.0}, {"lr": -0.1}, {"lr": math.nan},
    {"momentum": 1.0}, {"momentum": 1.5}, {"momentum": -0.1}, {"momentum": math.nan},
    {"warmup": -1}, {"warmup": 2.5}, {"lr": "fast"}, {"nesterov": "maybe"},
])
def test_outer_config_validation(kw):
    with pytest.raises(ValueError):
        OuterConfig(**kw)


def test_outer_config_defaults():
    cfg = OuterConfig()
    assert (cfg.lr, cfg.momentum, cfg.nesterov, cfg.warmup) == (None, None, True, 4)  # None: the codec's default
    assert (cfg.resolved().lr, cfg.resolved().momentum) == (0.7, 0.9)


# ---------------------------------------------------------------- OuterOptimizer
def test_optimizer_copies_and_casts_theta():
    src = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
    opt = OuterOptimizer(src, OuterConfig())
    assert opt.theta_sync.dtype == torch.float32
    src.add_(5)
    assert torch.equal(opt.theta_sync, torch.tensor([1.0, 2.0, 3.0]))
    assert opt.momentum_buf is None


def test_optimizer_pseudo_gradient_and_apply_hand_computed():
    opt = OuterOptimizer(torch.tensor([1.0, 2.0]), OuterConfig(lr=0.7, momentum=0.9))
    # delta = theta_sync - theta_local = [1 - 0.5, 2 - 3] = [0.5, -1.0]
    local = torch.tensor([0.5, 3.0], dtype=torch.bfloat16)
    delta = opt.pseudo_gradient(local)
    assert delta.dtype == torch.float32
    assert torch.allclose(delta, torch.tensor([0.5, -1.0]))
    new = opt.apply(delta)
    assert new is opt.theta_sync
    assert torch.allclose(new, torch.tensor([0.335, 3.33]), atol=1e-6, rtol=0)
    assert torch.allclose(opt.momentum_buf, torch.tensor([0.5, -1.0]))
    new2 = opt.apply(torch.tensor([0.2, 0.4]))
    assert torch.allclose(new2, torch.tensor([-0.2145, 3.365]), atol=1e-6, rtol=0)


def test_optimizer_state_dict_round_trip_continues_identically():
    g = torch.Generator().manual_seed(3)
    theta0 = torch.randn(9, generator=g)
    ds = [torch.randn(9, generator=g) for _ in range(4)]
    a = OuterOptimizer(theta0, OuterConfig())
    a.apply(ds[0])
    a.apply(ds[1])
    state = a.state_dict()

    b = OuterOptimizer(torch.zeros(9), OuterConfig())
    b.load_state_dict(state)
    assert torch.equal(b.theta_sync, a.theta_sync) and torch.equal(b.momentum_buf, a.momentum_buf)
    src_theta = state["theta_sync"].clone()
    for d in ds[2:]:
        a.apply(d.clone())  # apply uses Δ̄ as scratch
        b.apply(d.clone())
    assert torch.equal(a.theta_sync, b.theta_sync) and torch.equal(a.momentum_buf, b.momentum_buf)
    # b copied the state into its own buffers: a's steps moved a's, not b's starting point
    assert not torch.equal(state["theta_sync"], src_theta) and state["theta_sync"] is a.theta_sync


def test_in_place_step_is_bit_identical_to_the_pure_reference(monkeypatch):
    # chunked (a tiny CHUNK, so every piece boundary is crossed), in place, over many steps
    import averaging.outer as outer_mod

    monkeypatch.setattr(outer_mod, "CHUNK", 7)
    monkeypatch.setattr(outer_mod, "STEP_CHUNK", 5)
    g = torch.Generator().manual_seed(4)
    for cfg in (OuterConfig(), OuterConfig(momentum=0.0, lr=1.0), OuterConfig(nesterov=False, lr=0.3),
                OuterConfig(warmup=4)):
        theta0 = torch.randn(50, generator=g)
        opt = OuterOptimizer(theta0, cfg)
        ref_theta, ref_buf = theta0.clone(), None
        theta_ptr = opt.theta_sync.data_ptr()
        for step in range(6):
            local = torch.randn(50, generator=g)
            delta = opt.pseudo_gradient_([local[:13], local[13:]], opt.round_buffer())
            ref_delta = ref_theta - local
            assert torch.equal(delta, ref_delta)
            opt.apply(delta, step=step)
            ref_theta, ref_buf = outer_step(ref_theta, ref_delta, ref_buf, cfg, step=step)
            assert torch.equal(opt.theta_sync, ref_theta), cfg
            assert (opt.momentum_buf is None) == (ref_buf is None) and (ref_buf is None or torch.equal(opt.momentum_buf, ref_buf))
        assert opt.theta_sync.data_ptr() == theta_ptr  # never reallocated: memory stays put


def test_optimizer_load_state_copies_tensors():
    opt = OuterOptimizer(torch.zeros(3), OuterConfig())
    theta = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    buf = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    opt.load_state_dict({"theta_sync": theta, "momentum_buf": buf})
    assert opt.theta_sync.dtype == torch.float32 and opt.momentum_buf.dtype == torch.float32
    theta.add_(10)
    buf.add_(10)
    assert torch.allclose(opt.theta_sync, torch.tensor([1.0, 2.0, 3.0]))
    assert torch.allclose(opt.momentum_buf, torch.tensor([0.1, 0.2, 0.3]))


def test_optimizer_load_state_without_momentum():
    opt = OuterOptimizer(torch.zeros(2), OuterConfig())
    opt.apply(torch.ones(2))
    assert opt.momentum_buf is not None
    opt.load_state_dict({"theta_sync": torch.tensor([4.0, 5.0])})
    assert opt.momentum_buf is None
    assert torch.equal(opt.theta_sync, torch.tensor([4.0, 5.0]))


@pytest.mark.parametrize("shape", [(4,), (2,), (3, 1), (0,)])
def test_optimizer_load_wrong_size_raises(shape):
    opt = OuterOptimizer(torch.zeros(3), OuterConfig())
    before = opt.theta_sync.clone()
    with pytest.raises(ValueError):
        opt.load_state_dict({"theta_sync": torch.zeros(shape), "momentum_buf": None})
    assert torch.equal(opt.theta_sync, before)


@pytest.mark.parametrize("buf_shape", [(1,), (5,)])
def test_optimizer_load_wrong_size_momentum_raises(buf_shape):
    opt = OuterOptimizer(torch.zeros(3), OuterConfig())
    with pytest.raises(ValueError):
        opt.load_state_dict({"theta_sync": torch.zeros(3), "momentum_buf": torch.ones(buf_shape)})


def test_sparse_codec_defaults_to_plain_averaging_and_explicit_settings_win():
    """SparseLoCo's outer step: with the sparse codec the default is plain averaging (its error
    feedback is the momentum); dense codecs keep DiLoCo's 0.7 / 0.9 Nesterov; a value the user
    sets is never replaced."""
    from peer.config import SyncConfig

    assert SyncConfig(codec={"name": "sparse"}).outer == OuterConfig(lr=1.0, momentum=0.0, nesterov=False, warmup=4)
    assert SyncConfig(codec={"name": "int8"}).outer == OuterConfig(lr=0.7, momentum=0.9, nesterov=True, warmup=4)
    assert SyncConfig(codec={"name": "sparse"}, outer={"lr": 0.7, "momentum": 0.9}).outer == OuterConfig().resolved()
    assert SyncConfig(codec={"name": "sparse"}, outer={"lr": 0.5}).outer == OuterConfig(lr=0.5, momentum=0.0)
    assert OuterConfig().resolved("sparse") == OuterConfig(lr=1.0, momentum=0.0)  # the table lives in OuterConfig


def test_outer_warmup_ramps_the_momentum_and_starts_as_plain_mean_descent():
    """With warm-up W the momentum of step k is μ·k/W until k = W: the first outer step is
    plain θ − lr·Δ̄ (no momentum to overshoot with), the buffer still remembers Δ̄₁, and
    from step W on the step is exactly the configured Nesterov step."""
    cfg = OuterConfig(lr=0.7, momentum=0.9, warmup=4)
    assert [cfg.momentum_at(k) for k in range(6)] == [0.0, 0.225, 0.45, 0.675, 0.9, 0.9]
    theta, d = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    t1, b1 = outer_step(theta, d, None, cfg, step=0)
    assert torch.allclose(t1, theta - 0.7 * d) and torch.equal(b1, d)
    t2, b2 = outer_step(t1, d, b1, cfg, step=2)  # μ = 0.45
    assert torch.allclose(b2, 1.45 * d) and torch.allclose(t2, t1 - 0.7 * (d + 0.45 * b2))
    full = OuterConfig(lr=0.7, momentum=0.9)
    assert torch.equal(outer_step(t2, d, b2, cfg, step=4)[0], outer_step(t2, d, b2, full)[0])
    assert cfg.momentum_at(10**9) == 0.9 and OuterConfig(warmup=0).momentum_at(0) == 0.9
    assert OuterConfig().momentum_at(0) == 0.0  # warm-up over 4 outer steps by default
