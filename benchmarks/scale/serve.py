"""Does serving the state slow a donor's training? (issue 15)

    python -m benchmarks.scale.serve --preset 100M --steps 12

One donor process trains the embedded GPT (one torch thread) while its StateServer serves
its θ_sync and momentum (as a peer's does: from the live tensors, under a state lock the
trainer takes after every step, as a round would). First `--steps` training steps with no
download, then `--steps` while a requester process downloads the state again and again.
The donor is pinned to CPU 0 and the requester to CPU 1 (a requester is another machine in
a real swarm): so the donor's step times measure its own cost of serving. Prints the
median step time in both phases, the slowdown, and the downloads completed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from datetime import timedelta

import torch
from torch.distributed import TCPStore

from averaging.flat import tensor_digest
from peer.config import ModelConfig
from peer.loop import PeerLoop
from peer.membership import PeerRecord
from peer.model import build_model
from peer.state import SwarmState
from peer.transfer import StateServer, download_state


def fetch_forever(port: int, round_: int, digest: str, numel: int) -> None:
    donor = PeerRecord(peer_id="QmDonor", round=round_, fingerprint="fp", schema="s", digest=digest,
                       host="127.0.0.1", port=port)
    while True:
        t0 = time.monotonic()
        download_state([donor], fingerprint="fp", numel=numel, timeout=30, requester="QmJoiner")
        print(json.dumps({"download_s": time.monotonic() - t0}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="100M")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rate", type=float, default=None,
                    help="the server's cap while the owner trains, MB/s (default: none)")
    ap.add_argument("--fetch", nargs=4, metavar=("PORT", "ROUND", "DIGEST", "NUMEL"))
    a = ap.parse_args()
    if a.fetch:
        os.sched_setaffinity(0, {1})
        fetch_forever(int(a.fetch[0]), int(a.fetch[1]), a.fetch[2], int(a.fetch[3]))
        return
    os.sched_setaffinity(0, {0})
    torch.set_num_threads(1)
    cfg = ModelConfig(preset=a.preset)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    P = sum(p.numel() for p in model.parameters())
    state = SwarmState(3, "fp", torch.randn(P), torch.randn(P))
    lock = threading.Lock()
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    loop = PeerLoop("serve-bench").start()
    server = StateServer(store, lambda: state, lock, rate_mb_s=a.rate)  # the owner always trains here
    server.start(loop)
    g = torch.Generator().manual_seed(0)

    def steps(n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            xy = torch.randint(0, cfg.vocab_size, (1, 65), generator=g)
            loss = model(xy[:, :-1], xy[:, 1:])[1]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lock.acquire()  # as a round's apply does once per round: contend with the server's chunk copies
            lock.release()
            out.append(time.perf_counter() - t0)
        return out

    requester, out = None, ""
    try:
        steps(2)  # warm-up
        quiet = steps(a.steps)
        requester = subprocess.Popen([sys.executable, "-m", "benchmarks.scale.serve", "--fetch", str(store.port), "3",
                                      tensor_digest(state.theta_sync), str(P)], stdout=subprocess.PIPE, text=True)
        time.sleep(2)  # the first request is being served
        b0, t_busy = server.bytes_served, time.monotonic()
        busy = steps(a.steps)
        rate = (server.bytes_served - b0) / (time.monotonic() - t_busy) / 1e6
    finally:
        if requester is not None:
            requester.terminate()
            out, _ = requester.communicate(timeout=30)
        server.close()
        loop.close()
    downloads = [json.loads(x)["download_s"] for x in (out or "").splitlines() if x.startswith("{")]
    q, b = statistics.median(quiet), statistics.median(busy)
    print(json.dumps({"preset": a.preset, "params": P, "rate_cap_mb_s": a.rate, "serving_mb_per_s": round(rate, 1),
                      "state_mb": 8 * P / 1e6, "step_s_quiet": round(q, 3),
                      "step_s_serving": round(b, 3), "slowdown": round(b / q - 1, 3), "downloads": len(downloads),
                      "download_s": [round(d, 1) for d in downloads], "served": server.requests_served}))


if __name__ == "__main__":
    main()
