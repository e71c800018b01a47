"""The `swarm-peer` training loop: the embedded byte-level GPT (or a user's data) in a swarm."""
from __future__ import annotations

import json
import logging
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from averaging.errors import ConfigError
from averaging.identity import short_id

from .api import Peer
from .config import RunConfig
from .data import estimate_loss, load_corpus, parse_shard
from .device import autocast, detect_device
from .model import build_model, count_parameters
from .fsutil import write_text_atomic
from .heartbeat import Heartbeat
from .progress import ProgressSnapshot, RoundInfo, make_progress

log = logging.getLogger("swarmtrain")


def run(cfg: RunConfig, stop: threading.Event) -> dict[str, Any]:
    """Train until max_rounds/max_steps or `stop` is set; return a summary dict.

    Raises NetworkError / ModelMismatchError / StateError / DataError / ConfigError before
    training starts if the peer cannot join; once training, network faults only fail rounds.
    """
    t_start = time.monotonic()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = detect_device(cfg.train.device)
    corpus = load_corpus(cfg.data, block_size=cfg.model.block_size)
    if corpus.vocab_size > cfg.model.vocab_size and cfg.model.arch != "hf":
        # shards declare their tokenizer's vocabulary (a Llama's must hold it); other data, the largest id seen
        raise ConfigError(f"the data has a vocabulary of {corpus.vocab_size} tokens but model.vocab_size is "
                          f"{cfg.model.vocab_size}: set --model.vocab-size {corpus.vocab_size}")
    model = build_model(cfg.model, seed=cfg.train.seed).to(device)
    opt_cls = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.SGD
    opt = opt_cls(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    log.info("model: %s parameters on %s; data: %s", f"{count_parameters(model):,}", device, corpus.description)
    # Credit unit for the swarm's ledger: ~6 FLOPs per parameter per token (forward + backward).
    flops_per_sample = 6.0 * count_parameters(model) * cfg.model.block_size

    def val_loss() -> float:
        return estimate_loss(model, corpus.val, block_size=cfg.model.block_size, batch_size=cfg.data.batch_size,
                             n_batches=cfg.train.eval_batches, device=device)

    progress = make_progress(cfg.log, run_config=None)  # before joining: a missing tracker package fails fast
    # For a supervisor (the images' HEALTHCHECK): peer/heartbeat.py. Joining may download a large
    # state, so the first beat allows a long gap.
    heartbeat = Heartbeat.from_env("peer", starting_s=600.0 + cfg.swarm.startup_timeout)
    with progress, heartbeat, Peer(model, opt, cfg.peer_config(), flops_per_sample=flops_per_sample) as peer:
        sampler = corpus.sampler(block_size=cfg.model.block_size, batch_size=cfg.data.batch_size,
                                 shard=parse_shard(cfg.data.shard), seed=peer.seed)
        val_start = val_loss()
        peer.report_val_loss(val_start)  # the dashboard plots the swarm's validation loss by round
        val_final, round_losses = val_start, [(peer.round, val_start)]
        val_by_samples = [(peer.total_samples, val_start)]  # this peer's own samples at each evaluation
        t_train = time.monotonic()
        log.info("peer %s at round %d, validation loss %.4f", short_id(peer.peer_id), peer.round, val_start)
        # A beat may be as late as a slow step plus a whole sync round (matchmaking, then the all-reduce).
        sync_bound = cfg.sync.matchmaking.window + cfg.sync.allreduce.timeout + 60.0
        step_s, t_step, last_complete = 0.0, time.monotonic(), None
        while not stop.is_set():
            now = time.monotonic()
            step_s, t_step = max(now - t_step, 0.9 * step_s), now  # the slowest recent step, decaying
            ago = "" if last_complete is None else f", last complete round {now - last_complete:.0f} s ago"
            heartbeat.beat(detail=f"step {peer.local_step}, round {peer.round}{ago}",
                           stale_after=3 * step_s + sync_bound, step=peer.local_step, round=peer.round)
            x, y = (t.to(device, non_blocking=True) for t in next(sampler))
            with autocast(device):
                _, loss = model(x, y)
            loss.backward()
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if (peer.local_step + 1) % cfg.log.every_steps == 0:
                peer.report_loss(loss.item())  # .item() waits for the device: only every few steps
            result = peer.step(samples=x.shape[0])
            if result is not None and result.ok:
                last_complete = time.monotonic()
                evaluated = peer.round % cfg.train.eval_every_rounds == 0
                if evaluated:
                    val_final = val_loss()
                    peer.report_val_loss(val_final)
                    round_losses.append((peer.round, val_final))
                    val_by_samples.append((peer.total_samples, val_final))
                    # peer.api has already logged the round itself ("round N complete: ..."): one line, not two
                    log.info("round %d validation loss %.4f", peer.round, val_final)
            progress.update(_snapshot(peer, val_final))
            if cfg.train.max_rounds and peer.round >= cfg.train.max_rounds:
                break
            if cfg.train.max_steps and peer.local_step >= cfg.train.max_steps:
                break
        train_s = time.monotonic() - t_train
        if round_losses[-1][0] != peer.round:  # the last rounds were not evaluated yet
            val_final = val_loss()
            round_losses.append((peer.round, val_final))
            val_by_samples.append((peer.total_samples, val_final))
        progress.update(_snapshot(peer, val_final), force=True)
        summary = {
            "peer_id": peer.peer_id, "rounds": peer.round, "rounds_failed": peer.rounds_failed,
            "steps": peer.local_step, "samples": peer.total_samples, "samples_averaged": peer.samples_averaged,
            "samples_discarded": peer.samples_discarded, "val_loss_start": val_start,
            "val_loss_final": val_final, "val_loss_by_round": round_losses,
            "val_loss_by_samples": val_by_samples, "digest": peer.digest,
            "bytes_sent": peer.bytes_sent, "wall_s": round(time.monotonic() - t_start, 2),
            "sync_wait_s": round(peer.sync_wait_s, 2),
            "round_s_mean": round(statistics.mean([h.duration_s for h in peer.history if h.ok] or [0.0]), 3),
            "compute_utilization": round(1 - peer.sync_wait_s / max(time.monotonic() - t_train, 1e-9), 4),
            # from the first evaluation to the end of training: steps, syncs and the evaluations between
            "train_s": round(train_s, 2), "tokens_per_s": round(peer.total_samples * cfg.model.block_size / max(train_s, 1e-9), 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1024), 1),
            "interrupted": stop.is_set(),
        }
    return summary


def _snapshot(peer: Peer, val_loss: float) -> ProgressSnapshot:
    last = peer.history[-1] if peer.history else None
    info = None if last is None else RoundInfo(round=last.round + 1, status=last.status, duration_s=last.duration_s,
                                                bytes_sent=last.bytes_sent, members=len(last.members), error=last.error)
    return ProgressSnapshot(step=peer.local_step, loss=peer.last_loss, samples_per_s=peer.samples_per_s, round=peer.round,
                            peers_seen=peer.peers_seen, last_round=info, val_loss=val_loss, samples=peer.total_samples)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))
