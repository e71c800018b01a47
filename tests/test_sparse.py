"""The sparse codec (top-k of 1/128, 2-bit values, packed positions) and its all-gather
aggregation: the bytes are what the format says, error feedback makes repeated rounds
converge to the fp32 average, each value is averaged over the members that sent it, and a hostile sender's malformed message is dropped by every
member without stopping the round."""
from __future__ import annotations

import threading

import pytest
import torch

from averaging import AllReduceConfig, Averager, AveragerConfig, CodecConfig, MatchmakingConfig, SwarmDHT, sparse
from averaging.allreduce import ring_bytes
from averaging.codecs import ErrorFeedback, get_codec
from averaging.faults import WIRE_MODES, Tamper


def test_a_message_keeps_the_largest_32_of_every_4096_values_in_64_bytes():
    x = torch.randn(3 * sparse.CHUNK + 1000, generator=torch.Generator().manual_seed(0))
    data, parsed = sparse.encode(x)
    assert data.numel() == sparse.wire_bytes(x.numel()) == 4 * 64  # 4 chunks, the last one short
    dense = sparse.decode(data, x.numel())
    assert torch.equal(dense, parsed.dense(x.numel()))  # the sender knows exactly what arrives
    for c in range(4):
        piece, got = x[c * sparse.CHUNK : (c + 1) * sparse.CHUNK], dense[c * sparse.CHUNK : (c + 1) * sparse.CHUNK]
        kept = got.nonzero().reshape(-1)
        assert kept.numel() == sparse.K
        assert set(kept.tolist()) == set(piece.abs().topk(sparse.K).indices.tolist())
        assert torch.equal(got[kept].sign(), piece[kept].sign())
        assert len(set(got[kept].abs().tolist())) <= 2  # two magnitude levels per chunk
    # 128x fewer bytes on the wire than a dense fp32 ring at 4 peers, whatever the size
    P = 25_000_000
    assert ring_bytes(4 * P, 4) / (3 * sparse.wire_bytes(P)) >= 127


def test_error_feedback_makes_repeated_rounds_converge_to_the_fp32_average():
    """4 peers, each with its own fixed update, weighted: every round each sends top-k of
    w·Δ + residual and the group applies Σ decoded / Σ w. The running total of what was
    applied approaches the running total of the exact fp32 average (the residuals stay
    bounded, so the relative gap shrinks like 1/rounds)."""
    n, P = 4, 20_000
    g = torch.Generator().manual_seed(1)
    deltas = [torch.randn(P, generator=g) * (1 + i) for i in range(n)]
    weights = [1.0, 2.0, 3.0, 4.0]
    exact = sum(w * d for w, d in zip(weights, deltas)) / sum(weights)
    feedback = [ErrorFeedback(get_codec("sparse"), P) for _ in range(n)]
    applied = torch.zeros(P)
    gaps = {}
    for r in range(1, 801):
        total = torch.zeros(P)
        for w, d, fb in zip(weights, deltas, feedback):
            _, sent, res = fb.compress(d * w)
            fb.commit(0, res)
            total += sent
        applied += total / sum(weights)
        if r in (50, 200, 800):
            gaps[r] = float((applied / r - exact).norm() / exact.norm())
    assert gaps[800] < gaps[200] / 3 < gaps[50] / 6, gaps  # about 1/rounds
    assert gaps[800] < 0.1, gaps


@pytest.mark.parametrize("mode", WIRE_MODES)
def test_a_forged_message_is_refused_with_a_reason(mode):
    n = 3 * sparse.CHUNK + 1000
    data, _ = sparse.encode(torch.randn(n))
    with pytest.raises(sparse.SparseError):
        sparse.decode(Tamper(mode=mode).wire(data, n), n)


@pytest.mark.parametrize("bad", ["short", "long", "dtype", "unsorted"])
def test_malformed_bytes_are_refused(bad):
    n = 10_000
    data, _ = sparse.encode(torch.randn(n))
    if bad == "short":
        data = data[:-1]
    elif bad == "long":
        data = torch.cat([data, data[:1]])
    elif bad == "dtype":
        data = data.to(torch.int16)
    else:  # swap the first two positions of the first chunk: (a, b) -> (b, a)
        nc = sparse.chunks(n)
        i = 8 * nc
        a = int(data[i]) | (int(data[i + 1]) & 0xF) << 8
        b = int(data[i + 1]) >> 4 | int(data[i + 2]) << 4
        data[i], data[i + 1], data[i + 2] = b & 0xFF, (b >> 8) | ((a & 0xF) << 4), a >> 4
    with pytest.raises(sparse.SparseError):
        sparse.decode(data, n)


@pytest.mark.timeout(240)
def test_a_sparse_round_agrees_exactly_and_drops_forged_messages():
    """Real DHTs and gloo groups on 127.0.0.1: 4 members average with the sparse codec. All
    end with the same bytes; then, with one member forging its message each way, the 3
    others still complete, name it in `rejected` and average without it."""
    run = "sparse-test"
    boot = SwarmDHT.start(run, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dhts = [SwarmDHT.start(run, initial_peers=boot.visible_maddrs()[:1], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
            for _ in range(4)]
    cfg = AveragerConfig(listen_host="127.0.0.1", announce_host="127.0.0.1", codec=CodecConfig(name="sparse"), allreduce=AllReduceConfig(timeout=30),
                         matchmaking=MatchmakingConfig(window=10))  # (the refused forger retries alone for a window)
    P = 50_000
    deltas = [torch.randn(P, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    try:
        for round_, mode in enumerate([None, *WIRE_MODES]):
            avs = [Averager(d, cfg, tamper=Tamper(mode=mode) if mode and i == 3 else None) for i, d in enumerate(dhts)]
            results = {}

            def go(i: int) -> None:
                results[i] = avs[i].average(round_, "fp", deltas[i], float(i + 1), expected_size=lambda: 4)

            threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            for a in avs:
                a.close()
            honest = [results[i] for i in range(3 if mode else 4)]
            for r in honest:
                assert r.status == "complete", (mode, r)
            assert all(torch.equal(r.mean_delta, honest[0].mean_delta) for r in honest), mode
            if mode is None:
                exact = sum((i + 1) * deltas[i] for i in range(4)) / 10
                # one round of top-k keeps 1/128 of the values: the result points the same way
                cos = torch.nn.functional.cosine_similarity(honest[0].mean_delta, exact, dim=0)
                assert cos > 0.05, cos
                assert (honest[0].mean_delta != 0).sum() <= 4 * P // 128 + 4 * sparse.K
                assert results[0].bytes_sent < 0.02 * ring_bytes(4 * P, 4)
                # Each value is the weighted mean over the members that sent it (not over all 4:
                # a value only one member sent arrives whole, as its error feedback assumes).
                msgs = [sparse.encode(deltas[i] * (i + 1))[1] for i in range(4)]
                num = sum(m.dense(P) for m in msgs)
                den = sum(m.support(P) * (i + 1) for i, m in enumerate(msgs))
                torch.testing.assert_close(honest[0].mean_delta, num / den.clamp_min(1.0), rtol=1e-5, atol=1e-7)
                only_one = (den == 1.0)  # sent by member 0 (weight 1) alone
                assert only_one.sum() > 100
                assert torch.equal(honest[0].mean_delta[only_one], msgs[0].dense(P)[only_one])
            else:
                forger = dhts[3].peer_id
                assert all(forger in {pid for pid, _ in r.rejected} for r in honest), (mode, [r.rejected for r in honest])
                assert results[3].status == "failed", (mode, results[3])
    finally:
        for d in [*dhts, boot]:
            d.shutdown()
