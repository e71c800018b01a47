"""Averaging for peers behind NAT ("client mode"): the group leader relays for them.

A client-mode peer cannot accept connections, so it cannot be in a gloo group (gloo
connects every pair). Instead, after matchmaking it uploads [w, w·Δ] (fp32) to the
leader's store over its own outbound connection. The leader folds every valid upload
into its own contribution (weights add up), runs the group all-reduce, and posts the
result back; the client downloads the mean.

Cost: the client sends and receives the full vector once (S each way, instead of the
ring's 2·(n−1)/n·S), and the leader's link carries that extra traffic. The leader sees
the client's update in clear. Everyone still ends with the same parameters.

Failure behaviour: a client whose upload is missing, malformed or late is left out of
the round and told so (its round fails; it keeps its parameters). If the leader dies,
the client's wait times out and its round fails.
"""
from __future__ import annotations

import json
import logging
import math
import time
from datetime import timedelta

import torch

from .allreduce import RoundResult
from .identity import short_id
from .matchmaking import Group

log = logging.getLogger(__name__)


def client_round(group: Group, peer_id: str, delta: torch.Tensor, weight: float, *, timeout_s: float) -> RoundResult:
    """Client side: upload, wait for the leader's result. Never raises for network faults."""
    t0 = time.monotonic()
    me = group.store  # our outbound connection to the leader's store
    pid = peer_id
    payload = torch.cat([torch.tensor([weight], dtype=torch.float32), delta.detach().reshape(-1).cpu().float() * weight])

    def failed(msg: str) -> RoundResult:
        log.warning("round %d failed: %s", group.round, msg)
        return RoundResult(group.round, "failed", group.members + group.clients, (), time.monotonic() - t0, 0, msg)

    try:
        me.set(f"{group.prefix}client/{pid}", payload.numpy().tobytes())
        me.wait([f"{group.prefix}client/result"], timedelta(seconds=timeout_s))
        meta = json.loads(me.get(f"{group.prefix}client/result"))
        if not isinstance(meta, dict):
            return failed("leader sent a malformed result")
        if meta.get("status") != "complete":
            return failed(f"leader reports: {str(meta.get('error', 'failed'))[:200]}")
        included, members, weights = meta.get("included"), meta.get("members", list(group.members)), meta.get("weights", [])
        if not (isinstance(included, list) and isinstance(members, list) and all(isinstance(m, str) for m in members)
                and isinstance(weights, list) and all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights)):
            return failed("leader sent a malformed result")
        if pid not in included:
            return failed("the leader did not include this peer's contribution")
        mean = torch.frombuffer(bytearray(me.get(f"{group.prefix}client/mean")), dtype=torch.float32)
    except (RuntimeError, ValueError, AttributeError) as e:  # RecursionError (absurd JSON nesting) is a RuntimeError
        return failed(f"relay through leader {short_id(group.leader)} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if mean.numel() != delta.numel() or not torch.isfinite(mean).all():
        return failed("leader sent a malformed mean")
    return RoundResult(group.round, "complete", tuple(members), tuple(float(w) for w in weights),
                       time.monotonic() - t0, payload.numel() * 4, None, mean.to(delta.device))


def collect_clients(group: Group, numel: int, *, timeout_s: float) -> list[tuple[str, float, torch.Tensor]]:
    """Leader side: the valid uploads [(peer id, weight, w·Δ)] of this round's clients."""
    out = []
    deadline = time.monotonic() + timeout_s
    for pid in group.clients:
        key = f"{group.prefix}client/{pid}"
        try:
            group.store.wait([key], timedelta(seconds=max(0.1, deadline - time.monotonic())))
            data = torch.frombuffer(bytearray(group.store.get(key)), dtype=torch.float32)
        except (RuntimeError, ValueError) as e:
            log.warning("client %s sent nothing usable: %s", short_id(pid), str(e).splitlines()[0] if str(e) else e)
            continue
        w = float(data[0]) if data.numel() else float("nan")
        if data.numel() != numel + 1 or not (w > 0 and math.isfinite(w)) or not torch.isfinite(data).all():
            log.warning("client %s sent a malformed contribution; dropped", short_id(pid))
            continue
        out.append((pid, w, data[1:]))
    return out


def publish_to_clients(group: Group, result: RoundResult, included: list[str]) -> None:
    """Leader side: post the round's outcome (and the mean, if complete) for the clients."""
    if not group.clients:
        return
    meta = {"status": result.status, "error": result.error, "included": included,
            "members": list(result.members), "weights": list(result.weights)}
    try:
        if result.ok and result.mean_delta is not None:
            group.store.set(f"{group.prefix}client/mean", result.mean_delta.detach().cpu().float().numpy().tobytes())
        group.store.set(f"{group.prefix}client/result", json.dumps(meta))
    except RuntimeError as e:  # our own store: only fails if it is shutting down
        log.warning("could not post the round's result to clients: %s", e)

