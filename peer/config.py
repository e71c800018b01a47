"""Run configuration: one dataclass per component, loaded from TOML and overridden by flags.

    [swarm]       how to reach the swarm          SwarmConfig
    [sync]        when and how to average         SyncConfig, and its sections
                  [sync.outer] [sync.matchmaking] [sync.allreduce] [sync.codec] [sync.aggregator]
                  (averaging/config.py)
    [checkpoint]  what to keep on disk            CheckpointConfig
    [train]       the CLI trainer's inner loop    TrainConfig
    [model]       the embedded byte-level GPT     ModelConfig
    [data]        the training text               DataConfig
    [log]         progress display and trackers   peer.progress.LogConfig

`PeerConfig` (swarm + sync + checkpoint) is what the Python API needs; `RunConfig` adds
what `swarm-peer` needs to train the embedded model. The classes are pydantic dataclasses:
a value of the wrong type, or a broken rule, raises pydantic's ValidationError (a ValueError)
naming the field; `settings.load` turns it into a one-line ConfigError.

This module imports neither torch nor hivemind (only other config modules): `swarm-peer`
parses and checks its flags, and prints `--help`, before the heavy modules load.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

import multiaddr
from pydantic import Field
from pydantic.dataclasses import dataclass

from averaging.config import (
    SETTINGS,
    AggregatorConfig,
    AllReduceConfig,
    AveragerConfig,
    CodecConfig,
    MatchmakingConfig,
    OuterConfig,
    check_group_sizes,
)

from .progress import LogConfig

if TYPE_CHECKING:
    from averaging.access import Credential

_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def validate_multiaddr(addr: str) -> str:
    """Return `addr` if it is a full peer multiaddr (…/p2p/<peer id>), else raise ValueError."""
    expected = "expected /ip4/HOST/tcp/PORT/p2p/PEER_ID, as the bootstrap node prints it"
    if not addr.startswith("/"):  # HOST:PORT, a URL, a bare peer id: say what the form is
        raise ValueError(f"invalid multiaddr {addr!r}: {expected}")
    try:
        m = multiaddr.Multiaddr(addr)
    except Exception as e:  # py-multiaddr raises several exception types for bad input
        reason = str(e).split(": ", 1)[-1].split(" (string:")[0]  # drop py-multiaddr's repetition
        raise ValueError(f"invalid multiaddr {addr!r}: {reason} ({expected})") from None
    protocols = [p.name for p in m.protocols()]
    if "p2p" not in protocols:
        raise ValueError(f"invalid multiaddr {addr!r}: it must end with /p2p/<peer id> (copy it from the bootstrap's output)")
    if not any(p in protocols for p in ("tcp", "udp", "quic", "quic-v1")):
        raise ValueError(f"invalid multiaddr {addr!r}: no transport (expected e.g. /ip4/1.2.3.4/tcp/31337/p2p/...)")
    return addr


# ---------------------------------------------------------------- [data]
_SOURCES = ("stdlib", "text", "tokens", "shards")
_TOKEN_DTYPES = ("uint8", "uint16", "uint32")
_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(spec: str) -> tuple[int, int] | None:
    """Parse a shard spec: "auto" -> None, "i/n" -> (i, n) with 0 <= i < n."""
    if not isinstance(spec, str):
        raise ValueError(f"data.shard must be 'auto' or 'i/n', got {spec!r}")
    if spec.strip() == "auto":
        return None
    m = _SHARD_RE.match(spec)
    if m is None:
        raise ValueError(f"data.shard must be 'auto' or 'i/n', got {spec!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if not 0 <= i < n:
        raise ValueError(f"data.shard {spec!r} needs 0 <= i < n")
    return i, n


@dataclass(kw_only=True, config=SETTINGS)
class DataConfig:
    """Where the training tokens come from and how this peer samples them."""

    source: str = Field("stdlib", description='Corpus kind: "stdlib" (Python\'s own sources), "text" (user files), "tokens" (one token '
                                'file) or "shards" (a folder written by `swarm-peer prepare`).')
    paths: list[str] = Field(default_factory=list, description='"text": files and/or directories (walked recursively); "tokens": exactly one file; '
                               '"shards": exactly one folder.')
    token_dtype: str = Field("uint16", description='Element type of a raw (non-.npy) token file: "uint8", "uint16" or "uint32".')
    batch_size: int = Field(16, description='Sequences per training batch on this peer.')
    val_fraction: float = Field(0.05, description='Fraction of the corpus held out for validation, 0 < f < 0.5.')
    shard: str = Field("auto", description='"auto" (sample the whole corpus with a per-peer seed) or "i/n" (only chunk i of n).')
    max_bytes: int = Field(8_000_000, description='Cap on corpus bytes for "stdlib"/"text" so loading stays fast; 0 = no cap.')

    def __post_init__(self) -> None:
        if self.source not in _SOURCES:
            raise ValueError(f"data.source must be one of {', '.join(_SOURCES)}, got {self.source!r}")
        # (pydantic has checked every type: paths is a list of str, batch_size an int, ...)
        if not all(self.paths):
            raise ValueError(f"data.paths entries must be non-empty strings, got {self.paths!r}")
        if self.source == "text" and not self.paths:
            raise ValueError("data.paths must name at least one file when data.source is 'text'")
        if self.source in ("tokens", "shards") and len(self.paths) != 1:
            what = "file" if self.source == "tokens" else "folder"
            raise ValueError(
                f"data.paths must name exactly one {what} when data.source is {self.source!r}, got {self.paths!r}"
            )
        if self.source == "stdlib" and self.paths:
            raise ValueError(f"data.paths must be empty when data.source is 'stdlib', got {self.paths!r}")
        if self.token_dtype not in _TOKEN_DTYPES:
            raise ValueError(
                f"data.token_dtype must be one of {', '.join(_TOKEN_DTYPES)}, got {self.token_dtype!r}"
            )
        if self.batch_size <= 0:
            raise ValueError(f"data.batch_size must be a positive integer, got {self.batch_size!r}")
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"data.val_fraction must be in (0, 0.5), got {self.val_fraction!r}")
        parse_shard(self.shard)  # raises ValueError naming data.shard
        if self.max_bytes < 0:
            raise ValueError(f"data.max_bytes must be a non-negative integer, got {self.max_bytes!r}")


# ---------------------------------------------------------------- [model]
def _check_positive_int(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"model.{name} must be a positive integer, got {value!r}")


# Named sizes (docs/running-a-peer.md, "Model sizes"; docs/train-your-own-model.md for the Llama ones).
# The embedded GPT: 12·n_layer·n_embd² parameters in the blocks, plus the embeddings. The Llama
# presets are Hugging Face `transformers` Llamas (pip install "swarmtrain[hf]"): per block
# 4·n_embd² (attention, fewer with n_kv_head < n_head) + 3·n_embd·intermediate (SwiGLU MLP), plus
# 2·vocab·n_embd for the untied input and output embeddings; their vocabulary is the tokenizer's.
MODEL_PRESETS: dict[str, dict] = {
    "25M": dict(n_layer=8, n_head=8, n_embd=512, block_size=256, about="25.5M parameters"),
    "50M": dict(n_layer=8, n_head=12, n_embd=720, block_size=256, about="50.2M parameters"),
    "100M": dict(n_layer=8, n_head=16, n_embd=1024, block_size=256, about="101.3M parameters"),
    "llama-tiny": dict(arch="llama", n_layer=2, n_head=4, n_embd=64, intermediate_size=176, block_size=128,
                       about="Llama, 0.10M + 128·vocab parameters (tests)"),
    "llama-10M": dict(arch="llama", n_layer=6, n_head=6, n_embd=384, intermediate_size=1024, block_size=512,
                      about="Llama, 10.6M + 768·vocab parameters"),
    "llama-100M": dict(arch="llama", n_layer=12, n_head=12, n_embd=768, intermediate_size=2048, block_size=1024,
                       about="Llama, 85.0M + 1536·vocab parameters"),
    "llama-1B": dict(arch="llama", n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, intermediate_size=8192,
                     block_size=2048, about="Llama 3.2 1B's shape, 973M + 4096·vocab parameters"),
}
_ARCHS = ("gpt", "llama", "hf")


@dataclass(kw_only=True, config=SETTINGS)
class ModelConfig:
    """Shape of the model. All peers in a swarm must use the same config."""

    vocab_size: int = Field(256, description='Number of distinct tokens; 256 for raw bytes.')
    block_size: int = Field(64, description='Maximum context length T (positions in the learned position embedding).')
    n_layer: int = Field(2, description='Number of transformer blocks.')
    n_head: int = Field(4, description='Number of attention heads per block; must divide n_embd.')
    n_embd: int = Field(128, description='Width of the residual stream C.')
    dropout: float = Field(0.0, description='Dropout probability used during training (0 disables dropout).')
    arch: str = Field("gpt", description='"gpt": the embedded byte-level GPT; "llama": a Hugging Face transformers Llama of these '
                           'sizes; "hf": the causal LM that hf_config or init_from describes (pip install "swarmtrain[hf]")')
    intermediate_size: int = Field(0, description="llama: width of the MLP (0 = 8/3·n_embd, rounded up to a multiple of 64)")
    n_kv_head: int = Field(0, description="llama: key/value heads, grouped-query attention (0 = n_head)")
    hf_config: str = Field("", description="a transformers config.json (Llama, GPT-2, any causal LM) to build the model from; "
                             "implies arch 'hf'; the size fields are then unused")
    init_from: str = Field("", description="a local from_pretrained folder every peer starts from (its config.json and weights); "
                             "implies arch 'hf' ('' = seeded random weights)")
    preset: str = Field("", description="a named size that sets the architecture and the sizes left at their defaults: "
                          + ", ".join(f"{k} ({v['about']})" for k, v in MODEL_PRESETS.items()) + "; '' = the fields")

    def __post_init__(self) -> None:
        if self.preset:
            if self.preset not in MODEL_PRESETS:
                raise ValueError(f"unknown model.preset {self.preset!r} (choose {', '.join(MODEL_PRESETS)})")
            # The preset fills the fields left at their defaults; a field set to something else
            # wins (`--model.preset llama-10M --model.block-size 256` trains 256-token windows:
            # the preset used to override it silently, and the Hugging Face benchmark's peers
            # ran 512-token windows against the plain loop's 256).
            defaults = {name: f.default for name, f in type(self).__pydantic_fields__.items()}
            for name, value in MODEL_PRESETS[self.preset].items():
                if name != "about" and getattr(self, name) == defaults[name]:
                    setattr(self, name, value)
        if self.hf_config or self.init_from:
            if self.hf_config and self.init_from:
                raise ValueError("model.hf_config and model.init_from both name the architecture: set one")
            self.arch = "hf"
        if self.arch not in _ARCHS:
            raise ValueError(f"model.arch must be one of {', '.join(_ARCHS)}, got {self.arch!r}")
        if self.arch == "hf" and not (self.hf_config or self.init_from):
            raise ValueError("model.arch 'hf' needs model.hf_config (a config.json) or model.init_from (a folder)")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            _check_positive_int(name, getattr(self, name))
        for name in ("intermediate_size", "n_kv_head"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"model.{name} must be a non-negative integer (0 = derived), got {value!r}")
        if self.n_kv_head and self.n_head % self.n_kv_head:
            raise ValueError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout!r}")


# ---------------------------------------------------------------- [swarm]
@dataclass(kw_only=True, config=SETTINGS)
class SwarmConfig:
    run_id: str = Field("swarmtrain-demo", description="name of the training run; peers of different runs never meet")
    initial_peers: list[str] = Field(default_factory=list, description="multiaddrs of any live peers or bootstrap nodes to join through")
    host: str = Field("0.0.0.0", description="IP address to listen on")
    port: int = Field(0, description="TCP port for the DHT (0 = any free port)")
    announce_host: str = Field("", description="IP address other peers use to reach this one ('' = detect)")
    client_mode: bool = Field(False, description="behind NAT: open no listening socket; average through the group leader (costs the leader bandwidth)")
    identity_path: str = Field("", description="file with this peer's private key, for a stable peer id ('' = new id each start)")
    secret_file: str = Field("", description="private run: file with the run's shared secret ('' = open run; see docs/security.md)")
    allowlist_file: str = Field("", description="private run: file of the peer ids allowed to take part, one per line; needs identity_path "
                                  "('' = no allowlist; see docs/security.md)")
    startup_timeout: float = Field(30.0, description="seconds to wait for the DHT to start and reach the initial peers")
    announce_period: float = Field(2.0, description="seconds between refreshes of this peer's record in the DHT")
    peer_ttl: float = Field(10.0, description="seconds after its last refresh before a silent peer is considered gone")

    def __post_init__(self) -> None:
        if not _RUN_ID_RE.match(self.run_id):
            raise ValueError(f"run_id must be 1-64 letters, digits, '_', '.', '-', got {self.run_id!r}")
        for a in self.initial_peers:
            validate_multiaddr(a)
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.startup_timeout <= 0 or self.announce_period <= 0:
            raise ValueError("startup_timeout and announce_period must be > 0")
        if self.peer_ttl < 2 * self.announce_period:
            raise ValueError(f"peer_ttl ({self.peer_ttl}) must be at least 2 x announce_period ({self.announce_period})")
        if self.secret_file and self.allowlist_file:
            raise ValueError("a private run uses secret_file or allowlist_file, not both")
        if self.allowlist_file and not self.identity_path:
            raise ValueError("allowlist_file needs identity_path: the run admits peers by the id of a persistent key "
                             "(create one and print its id with: swarm-bootstrap keygen --identity FILE)")


# The default schedule: every peer syncs at the same wall-clock instants (multiples of T since
# the epoch), so a fast peer never waits for a slow one beyond one of its steps; each
# contributes what it computed, weighted by samples. Step-based sync (every H steps) makes
# the swarm run at its slowest peer's pace: docs/running-a-peer.md#when-peers-sync.
# 10 s: on the convergence benchmark (built-in GPT, 4 CPU peers, 800 steps) it ends within 3% of
# the old default H = 50 (1.86 against 1.81, 11 rounds against 16), where 30 s had time for
# only 3-4 rounds (2.18). Large models need minutes: set T so a round's transfer is a small part of it.
DEFAULT_EVERY_SECONDS = 10.0


@dataclass(kw_only=True, config=SETTINGS)
class SyncConfig:
    """When a peer averages (the schedule: H steps or T seconds, its own fields) and how: one
    section per averaging component, each defined and checked in averaging/config.py."""

    every_steps: int = Field(0, description="H: average after this many inner steps (0 = time-based only)")
    every_seconds: float | None = Field(None, description=f"T: average at every multiple of T seconds of wall-clock "
                                        f"time; default {DEFAULT_EVERY_SECONDS:g} if every_steps is 0, else 0 "
                                        f"(step-based only)")
    serve_rate_mb_s: float = Field(16.0, description="while it trains, a peer streams its state to joiners at most this "
                                                     "fast (MB/s, 0 = no cap); while it waits at a sync point, at full speed")
    max_stale_rounds: int = Field(4, description="a peer that missed rounds carries its local progress onto the swarm's "
                                                 "newer state if it is at most this many rounds stale (0 = drop it), "
                                                 "and averages it next round")
    overlap: bool = Field(False, description="keep training while a round's all-reduce runs; apply its outer step one "
                                             "round late")
    fragments: int = Field(1, description="streaming: split the parameters into this many fragments and average one per "
                                          "sync point, in turn, while training goes on (implies overlap; set H to the "
                                          "period / fragments)")
    outer: OuterConfig = Field(default_factory=OuterConfig, description="the outer step")
    matchmaking: MatchmakingConfig = Field(default_factory=MatchmakingConfig, description="how groups form")
    allreduce: AllReduceConfig = Field(default_factory=AllReduceConfig, description="how a group reduces")
    codec: CodecConfig = Field(default_factory=CodecConfig, description="the wire codec")
    aggregator: AggregatorConfig = Field(default_factory=AggregatorConfig,
                                         description="the reduction of each part, robust or not")

    def __post_init__(self) -> None:
        if self.every_seconds is None:  # resolved once, here: setting only H means step-based
            self.every_seconds = DEFAULT_EVERY_SECONDS if self.every_steps == 0 else 0.0
        self.outer = self.outer.resolved(self.codec.name)  # the codec's outer lr and momentum, where unset
        if self.every_steps < 0 or self.every_seconds < 0:
            raise ValueError("every_steps and every_seconds must be >= 0")
        if self.every_steps == 0 and self.every_seconds == 0:
            raise ValueError("set every_steps > 0 or every_seconds > 0, or peers never sync")
        check_group_sizes(self.aggregator, self.matchmaking)  # the robust aggregators need groups of a size
        if not self.serve_rate_mb_s >= 0:
            raise ValueError(f"serve_rate_mb_s must be >= 0 (0 = no cap), got {self.serve_rate_mb_s}")
        if self.max_stale_rounds < 0:
            raise ValueError(f"max_stale_rounds must be >= 0, got {self.max_stale_rounds}")
        if not 1 <= self.fragments <= 64:
            raise ValueError(f"fragments must be between 1 and 64, got {self.fragments}")
        if self.fragments > 1:  # a fragment's round always runs while the others train
            self.overlap = True

    def averager(self, *, listen_host: str, announce_host: str, client_mode: bool = False,
                 secret: Credential | None = None) -> AveragerConfig:
        return AveragerConfig(listen_host=listen_host, announce_host=announce_host, client_mode=client_mode,
                              matchmaking=self.matchmaking, allreduce=self.allreduce, codec=self.codec,
                              aggregator=self.aggregator, secret=secret)


@dataclass(kw_only=True, config=SETTINGS)
class CheckpointConfig:
    dir: str = Field("", description="directory for checkpoints ('' = no checkpoints)")
    every_rounds: int = Field(1, description="save after every N completed rounds")
    keep_last: int = Field(3, description="keep this many newest checkpoints (0 = keep all)")
    resume: bool = Field(False, description="start from the newest checkpoint in dir (the swarm's newer state wins)")

    def __post_init__(self) -> None:
        if self.every_rounds < 1:
            raise ValueError(f"every_rounds must be >= 1, got {self.every_rounds}")
        if self.keep_last < 0:
            raise ValueError(f"keep_last must be >= 0, got {self.keep_last}")
        if self.resume and not self.dir:
            raise ValueError("resume needs a checkpoint dir (--checkpoint.dir)")


@dataclass(kw_only=True, config=SETTINGS)
class TrainConfig:
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="inner optimizer")
    lr: float = Field(1e-3, description="inner learning rate")
    weight_decay: float = Field(0.01, description="inner weight decay")
    grad_clip: float = Field(1.0, description="clip the gradient norm to this (0 = off)")
    max_rounds: int = Field(0, description="stop after this many completed sync rounds (0 = no limit)")
    max_steps: int = Field(0, description="stop after this many inner steps (0 = no limit)")
    seed: int = Field(0, description="seed of the initial weights; every peer of a run must use the same one")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    threads: int = Field(0, description="torch CPU threads (0 = torch's default)")
    eval_batches: int = Field(8, description="validation batches per evaluation")
    eval_every_rounds: int = Field(1, description="evaluate on the validation split after every N completed rounds (and at the end)")
    summary_file: str = Field("", description="write a JSON summary here on exit")

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        for name in ("max_rounds", "max_steps", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("eval_batches", "eval_every_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(kw_only=True, config=SETTINGS)
class PeerConfig:
    """What `peer.Peer` needs: how to reach the swarm, when to sync, what to keep."""

    swarm: SwarmConfig = Field(default_factory=SwarmConfig, description="network")
    sync: SyncConfig = Field(default_factory=SyncConfig, description="averaging schedule and outer optimizer")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="checkpoints")


@dataclass(kw_only=True, config=SETTINGS)
class RunConfig(PeerConfig):
    """Everything `swarm-peer` needs to train the embedded model (or a user's data)."""

    train: TrainConfig = Field(default_factory=TrainConfig, description="inner training loop")
    model: ModelConfig = Field(default_factory=ModelConfig, description="model architecture")
    data: DataConfig = Field(default_factory=DataConfig, description="training data")
    log: LogConfig = Field(default_factory=LogConfig, description="progress display, log format, TensorBoard / W&B")

    def peer_config(self) -> PeerConfig:
        return PeerConfig(swarm=self.swarm, sync=self.sync, checkpoint=self.checkpoint)
