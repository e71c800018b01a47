"""Fast unit tests for peer.device, peer.model and peer.data (CPU only, no network)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from peer.data import (
    BatchSampler,
    DataConfig,
    DataError,
    estimate_loss,
    is_val_file,
    list_stdlib_files,
    load_corpus,
    parse_shard,
)
from peer.device import autocast, detect_device
from peer.model import ModelConfig, build_model, count_parameters

# A tiny model keeps every test well under a second on a shared 2-core machine.
TINY = dict(block_size=16, n_layer=1, n_head=2, n_embd=32)


# --------------------------------------------------------------------------- device


def test_detect_device_cpu_and_errors():
    assert detect_device("cpu") == torch.device("cpu")
    assert detect_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match="tpu"):
        detect_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            detect_device("cuda")
        with pytest.raises(ValueError, match="CUDA is not available"):
            detect_device("cuda:1")


def test_autocast_is_noop_on_cpu():
    with autocast(torch.device("cpu")):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.float32


# --------------------------------------------------------------------------- model


def test_same_seed_gives_identical_weights():
    cfg = ModelConfig(**TINY)
    a, b, c = build_model(cfg, seed=7), build_model(cfg, seed=7), build_model(cfg, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["lm_head.weight"], sc["lm_head.weight"])


def test_build_model_leaves_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build_model(ModelConfig(**TINY), seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_forward_shapes_and_initial_loss():
    cfg = ModelConfig(**TINY)
    model = build_model(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight  # weight tying
    assert count_parameters(model) == sum(p.numel() for p in set(model.parameters()))
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 256, (3, 16), generator=gen)
    # Independent targets: with tied weights, targets == idx would be slightly easier.
    targets = torch.randint(0, 256, (3, 16), generator=gen)
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 256) and loss is None
    logits, loss = model(idx, targets)
    assert loss.shape == () and abs(loss.item() - math.log(256)) < 0.3
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_adamw_steps_reduce_loss_on_fixed_batch():
    model = build_model(ModelConfig(**TINY), seed=0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 16), generator=gen)
    y = torch.randint(0, 256, (4, 16), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    _, first = model(x, y)
    for _ in range(15):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _, last = model(x, y)
    assert last.item() < first.item() - 0.5


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n_layer=0), "n_layer"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(block_size=2.5), "block_size"),  # pydantic's type check: "block_size  Input should be a valid integer"
        (dict(n_embd=130, n_head=4), "n_embd"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
    ],
)
def test_model_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"(model\\.|^){field}|\n{field}\n"):
        ModelConfig(**kwargs)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(source="web"), "data.source"),
        (dict(source="text"), "data.paths"),
        (dict(source="text", paths="a.txt"), "paths\n  Input should be a valid list"),
        (dict(source="tokens", paths=["a.npy", "b.npy"]), "data.paths"),
        (dict(token_dtype="int8"), "data.token_dtype"),
        (dict(batch_size=0), "data.batch_size"),
        (dict(val_fraction=0.0), "data.val_fraction"),
        (dict(val_fraction=0.5), "data.val_fraction"),
        (dict(shard="4/4"), "data.shard"),
        (dict(shard="half"), "data.shard"),
        (dict(max_bytes=-1), "data.max_bytes"),
    ],
)
def test_data_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DataConfig(**kwargs)


def test_data_config_text_message():
    from peer.settings import ConfigError, validate

    with pytest.raises(ConfigError) as e:  # the one line swarm-peer prints
        validate(DataConfig, {"source": "text"})
    assert str(e.value) == "invalid config: data.paths must name at least one file when data.source is 'text'"


def test_parse_shard():
    assert parse_shard("auto") is None
    assert parse_shard("1/4") == (1, 4)
    assert parse_shard("0/1") == (0, 1)
    with pytest.raises(ValueError):
        parse_shard("-1/4")


# --------------------------------------------------------------------------- corpora


def test_stdlib_corpus_splits_by_file():
    cfg = DataConfig(source="stdlib", max_bytes=1_000_000, val_fraction=0.1)
    corpus = load_corpus(cfg, block_size=16)
    assert corpus.vocab_size == 256 and corpus.description.startswith("stdlib:")
    assert corpus.train.ndim == 1 and len(corpus.train) > len(corpus.val) > 0
    assert "held-out files" in corpus.description  # the by-file split was used

    # Find files that made it under the cap, and check a large val file lands wholly
    # in val and not in train (and vice versa for a train file).
    train_b, val_b = corpus.train.tobytes(), corpus.val.tobytes()
    used, total = [], 0
    for rel, path in list_stdlib_files():
        data = path.read_bytes()
        if total + len(data) >= cfg.max_bytes:
            break
        if data:
            used.append((rel, data))
            total += len(data) + 1
    val_files = [(r, d) for r, d in used if is_val_file(r, cfg.val_fraction)]
    train_files = [(r, d) for r, d in used if not is_val_file(r, cfg.val_fraction)]
    assert val_files and train_files
    rel, data = max(val_files, key=lambda e: len(e[1]))
    assert data in val_b and data not in train_b, rel
    rel, data = max(train_files, key=lambda e: len(e[1]))
    assert data in train_b and data not in val_b, rel


def test_is_val_file_is_deterministic_fraction():
    names = [f"pkg/mod_{i}.py" for i in range(4000)]
    frac = sum(is_val_file(n, 0.1) for n in names) / len(names)
    assert 0.08 < frac < 0.12
    assert [is_val_file(n, 0.1) for n in names] == [is_val_file(n, 0.1) for n in names]


def test_text_source_directory_split_by_file(tmp_path):
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / ".git" / "junk").write_bytes(b"SHOULD NOT BE READ" * 10)
    contents = {}
    for i in range(120):
        rel = f"sub/f{i:03d}.txt" if i % 2 else f"f{i:03d}.txt"
        contents[rel] = (f"<file {i:03d}>" * 8).encode()
        (root / rel).write_bytes(contents[rel])
    corpus = load_corpus(DataConfig(source="text", paths=[str(root)], val_fraction=0.2), block_size=8)
    train_b, val_b = corpus.train.tobytes(), corpus.val.tobytes()
    assert b"SHOULD NOT" not in train_b + val_b
    assert "120 files" in corpus.description and "held-out" in corpus.description
    for rel, data in contents.items():
        if is_val_file(rel, 0.2):
            assert data in val_b and data not in train_b
        else:
            assert data in train_b and data not in val_b


def test_text_source_single_file_tail_split(tmp_path):
    f = tmp_path / "book.txt"
    payload = bytes(range(256)) * 8  # 2048 bytes
    f.write_bytes(payload)
    corpus = load_corpus(DataConfig(source="text", paths=[str(f)], val_fraction=0.25))
    assert corpus.train.tobytes() == payload[:1536]
    assert corpus.val.tobytes() == payload[1536:]


def test_text_source_max_bytes_cap(tmp_path):
    for i in range(5):
        (tmp_path / f"{i}.txt").write_bytes(b"x" * 1000)
    corpus = load_corpus(DataConfig(source="text", paths=[str(tmp_path)], max_bytes=2500))
    assert len(corpus.train) + len(corpus.val) <= 2500


def test_tokens_from_npy_and_raw_bin(tmp_path):
    arr = (np.arange(1000) % 300).astype(np.int32)
    np.save(tmp_path / "t.npy", arr)
    c = load_corpus(DataConfig(source="tokens", paths=[str(tmp_path / "t.npy")], val_fraction=0.1))
    assert c.vocab_size == 300 and len(c.train) == 900 and len(c.val) == 100
    assert np.array_equal(np.concatenate([c.train, c.val]), arr)

    arr.astype(np.uint16).tofile(tmp_path / "t.bin")
    c = load_corpus(DataConfig(source="tokens", paths=[str(tmp_path / "t.bin")], val_fraction=0.1))
    assert c.vocab_size == 300 and np.array_equal(np.asarray(c.val), arr[900:])

    (tmp_path / "odd.bin").write_bytes(b"\x00" * 7)  # not a whole number of uint16
    with pytest.raises(DataError, match="odd.bin"):
        load_corpus(DataConfig(source="tokens", paths=[str(tmp_path / "odd.bin")]))
    np.save(tmp_path / "f.npy", np.ones(10, dtype=np.float32))
    with pytest.raises(DataError, match="f.npy"):
        load_corpus(DataConfig(source="tokens", paths=[str(tmp_path / "f.npy")]))


@pytest.mark.parametrize("source", ["text", "tokens"])
def test_missing_path_raises_data_error_naming_it(tmp_path, source):
    missing = str(tmp_path / "nope" / "data.bin")
    with pytest.raises(DataError) as e:
        load_corpus(DataConfig(source=source, paths=[missing]))
    assert missing in str(e.value) and isinstance(e.value, ValueError)


def test_empty_text_corpus_raises(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match=re.escape(str(tmp_path))):
        load_corpus(DataConfig(source="text", paths=[str(tmp_path)]))


# --------------------------------------------------------------------------- sampling


def test_batch_sampler_shapes_and_shift():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = next(BatchSampler(tokens, block_size=8, batch_size=5, shard=None, seed=0))
    assert x.shape == y.shape == (5, 8) and x.dtype == y.dtype == torch.long
    assert x.device.type == "cpu"
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)


def test_shard_only_samples_its_chunk():
    # Token value == position, so values reveal where each window was taken from.
    tokens = np.arange(4000, dtype=np.int64)
    sampler = BatchSampler(tokens, block_size=32, batch_size=64, shard=(1, 4), seed=3)
    seen = torch.cat([torch.cat([x, y]) for x, y in (next(sampler) for _ in range(20))])
    assert seen.min().item() >= 1000 and seen.max().item() < 2000
    # ... and it covers the chunk rather than a fixed spot within it.
    assert seen.min().item() < 1100 and seen.max().item() > 1900


def test_different_seeds_give_different_batches():
    tokens = np.arange(100_000, dtype=np.uint32)
    kw = dict(block_size=16, batch_size=8, shard=None)
    a = next(BatchSampler(tokens, seed=1, **kw))[0]
    b = next(BatchSampler(tokens, seed=1, **kw))[0]
    c = next(BatchSampler(tokens, seed=2, **kw))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sampler_rejects_too_short_shard():
    with pytest.raises(DataError, match="shard 3/4"):
        BatchSampler(np.arange(100), block_size=32, batch_size=2, shard=(3, 4), seed=0)


def test_estimate_loss_is_deterministic_and_restores_mode():
    model = build_model(ModelConfig(**TINY, dropout=0.1), seed=0)
    model.train()
    tokens = np.random.default_rng(0).integers(0, 256, size=5000).astype(np.uint8)
    kw = dict(block_size=16, batch_size=4, n_batches=3, device=torch.device("cpu"))
    a = estimate_loss(model, tokens, **kw)
    b = estimate_loss(model, tokens, **kw)
    assert isinstance(a, float) and a == b and abs(a - math.log(256)) < 0.3
    assert model.training
    model.eval()
    estimate_loss(model, tokens, **kw)
    assert not model.training
