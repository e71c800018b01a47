"""Codecs: bounds, malformed input, and error feedback over real gloo all-reduces."""
from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import torch
from torch.distributed import TCPStore

from averaging.allreduce import Compression, weighted_allreduce
from averaging.codecs import BLOCK, CodecError, ErrorFeedback, get_codec, partition
from averaging.matchmaking import Group


@pytest.mark.parametrize("name,ratio", [("fp32", 1.0), ("fp16", 0.5), ("bf16", 0.5), ("int8", 0.25)])
def test_wire_size(name, ratio):
    n = 1 << 20
    c = get_codec(name)
    assert len(c.encode(torch.randn(n))) == c.wire_bytes(n)
    assert c.wire_bytes(n) <= 4 * n * ratio * 1.01


@pytest.mark.parametrize("name,rel", [("fp16", 1e-3), ("bf16", 8e-3), ("int8", 1 / 254)])
def test_error_bounds(name, rel):
    x = torch.randn(10_000) * torch.logspace(-3, 3, 10_000)
    c = get_codec(name)
    y = c.decode(c.encode(x), x.numel())
    if name == "int8":  # per block: |error| <= absmax(block) / 254
        blocks = torch.nn.functional.pad(x, (0, -x.numel() % BLOCK)).view(-1, BLOCK)
        bound = (blocks.abs().amax(1, keepdim=True) / 254).expand_as(blocks).reshape(-1)[: x.numel()]
        assert ((y - x).abs() <= bound + 1e-7).all()
    else:
        assert ((y - x).abs() <= rel * x.abs() + 1e-7).all()


def test_fp16_saturates_instead_of_inf():
    c = get_codec("fp16")
    y = c.decode(c.encode(torch.tensor([1e9, -1e9])), 2)
    assert torch.isfinite(y).all()


def test_decode_rejects_malformed():
    c = get_codec("int8")
    with pytest.raises(CodecError):
        c.decode(torch.zeros(10, dtype=torch.uint8), 2000)
    bad = c.encode(torch.randn(100))
    bad[:4] = torch.tensor([float("nan")]).view(torch.uint8)
    with pytest.raises(CodecError, match="scales"):
        c.decode(bad, 100)
    with pytest.raises(ValueError, match="unknown codec"):
        get_codec("int4")


def test_partition():
    assert partition(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert partition(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]


def test_error_feedback_unbiased_over_rounds():
    """Encoding the same vector repeatedly: the mean of what was sent converges to it."""
    x = torch.randn(5000)
    ef = ErrorFeedback(get_codec("int8"), x.numel())
    total = torch.zeros_like(x)
    for t in range(1, 51):
        _, sent, res = ef.compress(x)
        ef.commit(0, res)
        total += sent
    one_round = (get_codec("int8").decode(get_codec("int8").encode(x), x.numel()) - x).abs().max()
    assert (total / 50 - x).abs().max() <= one_round / 20


def test_error_feedback_decay_forgets_unsent_progress_geometrically():
    """SparseLoCo's decayed residual: what a round leaves unsent counts β^t in later rounds."""
    x = torch.zeros(8192)
    x[::2] = torch.linspace(1.0, 2.0, 4096)  # 4096 values that the sparse codec cannot all send in one round
    ef = ErrorFeedback(get_codec("sparse"), x.numel(), decay=0.5)
    _, sent, res = ef.compress(x)
    ef.commit(0, res)
    left = x - sent
    assert left.abs().sum() > 0.9 * x.abs().sum()  # top-32 of each 4096: most of it stays behind
    _, sent2, res2 = ef.compress(torch.zeros_like(x))  # no new progress: the target is 0.5 × what was left
    assert torch.allclose(sent2 + res2, 0.5 * left)
    with pytest.raises(ValueError, match="decay"):
        ErrorFeedback(get_codec("sparse"), 10, decay=1.5)


def _run_group(n: int, fn) -> list:
    """Run fn(group, rank) in n threads over one round's gloo group on 127.0.0.1."""
    master = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    out: list = [None] * n
    errors: list = []

    def worker(rank: int) -> None:
        try:
            store = master if rank == 0 else TCPStore("127.0.0.1", master.port, is_master=False)
            out[rank] = fn(store, rank)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("chunk", [0, 3000])  # 0: default (one chunk here); 3000: a 7-chunk pipeline
def test_int8_with_error_feedback_converges_to_fp32_average(chunk):
    n, P, rounds = 3, 20_000, 25
    xs = [torch.randn(P, generator=torch.Generator().manual_seed(i)) * (i + 1) for i in range(n)]
    weights = [1.0, 2.0, 3.0]
    true_mean = sum(w * x for w, x in zip(weights, xs)) / sum(weights)
    comps = [Compression.named("int8") for _ in range(n)]
    running = [torch.zeros(P) for _ in range(n)]
    first_err = None
    for k in range(rounds):
        def fn(store, rank, k=k):
            g = Group(k, tuple(map(str, range(n))), rank, f"ef/{k}/", store)
            return weighted_allreduce(g, xs[rank], weights[rank], host="127.0.0.1", timeout_s=30, codec=comps[rank],
                                      pipeline_chunk=chunk)
        res = _run_group(n, fn)
        assert all(r.ok for r in res), [r.error for r in res]
        for r in res[1:]:
            assert torch.equal(r.mean_delta, res[0].mean_delta), "peers disagree after a complete int8 round"
        if first_err is None:
            first_err = (res[0].mean_delta - true_mean).abs().max().item()
            assert first_err > 0  # int8 is lossy in a single round
        for i in range(n):
            running[i] += res[i].mean_delta
    final_err = (running[0] / rounds - true_mean).abs().max().item()
    assert final_err <= first_err / 8, (first_err, final_err)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name,tol", [("fp32", 1e-6), ("fp16", 2e-3), ("bf16", 2e-2), ("int8", 3e-2)])
@pytest.mark.parametrize("chunk", [0, 1000])
def test_codecs_agree_and_are_close(name, tol, chunk):
    n, P = 3, 12_345
    xs = [torch.randn(P, generator=torch.Generator().manual_seed(10 + i)) for i in range(n)]
    true_mean = sum(xs) / n

    def fn(store, rank):
        g = Group(0, tuple(map(str, range(n))), rank, f"c/{name}/{chunk}/", store)
        return weighted_allreduce(g, xs[rank], 1.0, host="127.0.0.1", timeout_s=30, codec=name, pipeline_chunk=chunk)

    res = _run_group(n, fn)
    assert all(r.ok for r in res)
    for r in res[1:]:
        assert torch.equal(r.mean_delta, res[0].mean_delta)
    assert (res[0].mean_delta - true_mean).abs().max().item() <= tol * 4
    assert res[0].weights == (1.0, 1.0, 1.0)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("chunk", [0, 1000])  # 1000: chunks of 999 values and a last one of unequal parts
def test_fp32_in_place_round_is_the_weighted_mean(chunk):
    """fp32 sends Δ itself (a view of the round buffer) and the owner of a part applies the
    weights every member declared; the result lands in the same buffer."""
    n, P = 3, 12_346
    xs = [torch.randn(P, generator=torch.Generator().manual_seed(40 + i)) for i in range(n)]
    weights = [1.0, 2.5, 4.0]
    true_mean = sum(w * x for w, x in zip(weights, xs)) / sum(weights)
    bufs = [x.clone() for x in xs]

    def fn(store, rank):
        g = Group(0, tuple(map(str, range(n))), rank, f"inplace/{chunk}/", store)
        return weighted_allreduce(g, bufs[rank], weights[rank], host="127.0.0.1", timeout_s=30, pipeline_chunk=chunk,
                                  out=bufs[rank])

    res = _run_group(n, fn)
    assert all(r.ok for r in res), [r.error for r in res]
    for i, r in enumerate(res):
        assert r.mean_delta.data_ptr() == bufs[i].data_ptr()  # in place: no vector of its own
        assert torch.equal(r.mean_delta, res[0].mean_delta)
    assert (res[0].mean_delta - true_mean).abs().max().item() <= 1e-5
    assert res[0].weights == tuple(weights)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["fp32", "int8"])
def test_a_result_part_with_nan_fails_the_round_for_everyone(name):
    """Every member's update is NaN in one place: each owner drops them all, its part of the
    result is NaN, and every member must fail the round (checked as the parts land)."""
    n, P = 3, 9_000
    xs = [torch.randn(P, generator=torch.Generator().manual_seed(50 + i)) for i in range(n)]
    for x in xs:
        x[4_500] = float("nan")

    def fn(store, rank):
        g = Group(0, tuple(map(str, range(n))), rank, f"nanpart/{name}/", store)
        return weighted_allreduce(g, xs[rank], 1.0, host="127.0.0.1", timeout_s=30, codec=name, pipeline_chunk=1000)

    res = _run_group(n, fn)
    assert [r.status for r in res] == ["failed"] * n
    # int8 cannot even encode a NaN part: its block scale is refused when decoded
    why = "non-finite values in the averaged result" if name == "fp32" else "undecodable result part from a peer"
    assert all(r.error is not None and r.error.startswith(why) for r in res), [r.error for r in res]
