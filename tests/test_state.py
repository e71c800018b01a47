"""Unit tests for flat parameter views (averaging/flat.py) and state/checkpoints (peer/state.py)."""
from __future__ import annotations

import io
import json
import math
import os
import random
import pickle

import pytest
import torch

import peer.fsutil as fsutil_mod
from torch import nn

from averaging.errors import ModelMismatchError, StateError
from averaging.flat import flatten_params, parameter_schema, schema_fingerprint, write_flat_
from peer import state as state_mod
from peer.state import FORMAT, CheckpointDir, SwarmState


class Small(nn.Module):
    """Mixed shapes: a matrix, a vector, a 0-d scalar, a 3-d tensor and a bf16 parameter."""

    def __init__(self, out: int = 2) -> None:
        super().__init__()
        self.lin = nn.Linear(3, out)  # weight [out,3], bias [out]
        self.scale = nn.Parameter(torch.tensor(1.5))  # shape ()
        self.cube = nn.Parameter(torch.zeros(2, 1, 2))
        self.low = nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))


def numel(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------- flat views
# named_parameters(): a module's own parameters first, then its children's.
ORDER = ["scale", "cube", "low", "lin.weight", "lin.bias"]
SL = {"scale": slice(0, 1), "cube": slice(1, 5), "low": slice(5, 9), "lin.weight": slice(9, 15), "lin.bias": slice(15, 17)}


def test_flatten_order_dtype_and_values():
    m = Small()
    assert [n for n, _ in m.named_parameters()] == ORDER
    flat = flatten_params(m.parameters())
    assert flat.dtype == torch.float32 and flat.dim() == 1
    assert flat.numel() == numel(m) == 1 + 4 + 4 + 6 + 2
    assert flat[0].item() == 1.5
    assert torch.equal(flat[SL["lin.weight"]], m.lin.weight.detach().reshape(-1))
    assert torch.equal(flat[SL["lin.bias"]], m.lin.bias.detach())
    assert not flat.requires_grad


def test_flatten_write_round_trip_with_bf16_cast():
    m = Small()
    flat = torch.arange(17, dtype=torch.float32) / 10 + 0.01  # not exactly representable in bf16
    write_flat_(m.parameters(), flat)
    assert m.scale.shape == () and m.scale.item() == flat[0].item()
    assert torch.equal(m.cube.detach(), flat[SL["cube"]].view(2, 1, 2))
    assert torch.equal(m.lin.weight.detach(), flat[SL["lin.weight"]].view(2, 3))
    assert torch.equal(m.lin.bias.detach(), flat[SL["lin.bias"]])
    low = flat[SL["low"]]
    assert m.low.dtype == torch.bfloat16
    assert torch.equal(m.low.detach(), low.to(torch.bfloat16))
    assert not torch.equal(m.low.detach().float(), low)  # the cast really rounded
    back = flatten_params(m.parameters())
    expected = flat.clone()
    expected[SL["low"]] = low.to(torch.bfloat16).float()
    assert torch.equal(back, expected)
    # a second round trip is exact: bf16 values are fixed points of the cast
    write_flat_(m.parameters(), back)
    assert torch.equal(flatten_params(m.parameters()), back)


def test_write_flat_keeps_parameter_identity_and_grad_flag():
    m = Small()
    ids = [id(p) for p in m.parameters()]
    write_flat_(m.parameters(), torch.ones(17))
    assert [id(p) for p in m.parameters()] == ids
    assert all(p.requires_grad for p in m.parameters())


def test_write_flat_too_long_raises_value_error():
    m = Small()
    with pytest.raises(ValueError, match="18 elements, parameters have 17"):
        write_flat_(m.parameters(), torch.zeros(18))


def test_write_flat_too_short_raises():
    m = Small()
    with pytest.raises((ValueError, RuntimeError)):
        write_flat_(m.parameters(), torch.zeros(16))


def test_write_flat_too_short_raises_value_error():
    with pytest.raises(ValueError):
        write_flat_(Small().parameters(), torch.zeros(16))


@pytest.mark.parametrize("n", [16, 18])
def test_write_flat_wrong_length_leaves_params_untouched(n):
    m = Small()
    before = flatten_params(m.parameters())
    with pytest.raises((ValueError, RuntimeError)):
        write_flat_(m.parameters(), torch.full((n,), 7.0))
    assert torch.equal(flatten_params(m.parameters()), before)


# ---------------------------------------------------------------- fingerprint
def test_fingerprint_equal_for_identical_models():
    torch.manual_seed(0)
    a = Small()
    torch.manual_seed(1)
    b = Small()  # different values, same schema
    fa = schema_fingerprint(parameter_schema(a.named_parameters()))
    fb = schema_fingerprint(parameter_schema(b.named_parameters()))
    assert fa == fb
    assert len(fa) == 16 and all(c in "0123456789abcdef" for c in fa)


def test_fingerprint_differs_when_one_shape_differs():
    fa = schema_fingerprint(parameter_schema(Small(out=2).named_parameters()))
    fb = schema_fingerprint(parameter_schema(Small(out=3).named_parameters()))
    assert fa != fb


def test_fingerprint_differs_on_dtype_and_name_and_order():
    base = [("w", (2, 3), "float32"), ("b", (2,), "float32")]
    f = schema_fingerprint(base)
    assert schema_fingerprint([("w", (2, 3), "bfloat16"), ("b", (2,), "float32")]) != f
    assert schema_fingerprint([("v", (2, 3), "float32"), ("b", (2,), "float32")]) != f
    assert schema_fingerprint(list(reversed(base))) != f
    assert schema_fingerprint([("w", (3, 2), "float32"), ("b", (2,), "float32")]) != f
    assert schema_fingerprint([("w", (23,), "float32"), ("b", (2,), "float32")]) != f
    assert schema_fingerprint([("w", (), "float32")]) != schema_fingerprint([("w", (1,), "float32")])


def test_parameter_schema_strips_torch_prefix():
    sch = parameter_schema(Small().named_parameters())
    assert sch == [("scale", (), "float32"), ("cube", (2, 1, 2), "float32"), ("low", (4,), "bfloat16"),
                   ("lin.weight", (2, 3), "float32"), ("lin.bias", (2,), "float32")]


# ---------------------------------------------------------------- SwarmState serialization
FP = "0123456789abcdef"


def make_state(n: int = 5, rnd: int = 3, mom: bool = True, samples: int = 42) -> SwarmState:
    theta = torch.arange(n, dtype=torch.float32) * 0.5
    return SwarmState(rnd, FP, theta, (torch.ones(n) * 0.25) if mom else None, samples)


def raw_bytes(**overrides) -> bytes:
    d = {"format": FORMAT, "round": 3, "fingerprint": FP, "theta_sync": torch.zeros(5),
         "momentum_buf": None, "samples": 0}
    d.update(overrides)
    buf = io.BytesIO()
    torch.save(d, buf)
    return buf.getvalue()


def load(data: bytes, numel: int = 5, fingerprint: str = FP) -> SwarmState:
    return SwarmState.from_bytes(data, source="test", fingerprint=fingerprint, numel=numel)


@pytest.mark.parametrize("mom", [True, False])
def test_state_round_trip(mom):
    s = make_state(mom=mom)
    data = s.to_bytes()
    assert s.to_bytes() == data  # deterministic bytes (so the digest identifies the state)
    back = load(data)
    assert back.round == 3 and back.fingerprint == FP and back.samples == 42
    assert torch.equal(back.theta_sync, s.theta_sync)
    if mom:
        assert torch.equal(back.momentum_buf, s.momentum_buf)
    else:
        assert back.momentum_buf is None
    assert state_mod.digest(back.to_bytes()) == state_mod.digest(data)


def test_state_round_trip_reshapes_to_flat():
    back = load(raw_bytes(theta_sync=torch.zeros(5, 1), momentum_buf=torch.zeros(5, 1)))
    assert back.theta_sync.shape == (5,) and back.momentum_buf.shape == (5,)


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg and msg.strip()
    return msg


# The random bytes are seeded: a test's id must be the same in every collection (pytest-xdist
# workers compare them) and a failure must be reproducible.
@pytest.mark.parametrize("data", [b"", b"garbage bytes", b"\x80\x02}q\x00.", random.Random(0).randbytes(64)],
                         ids=["empty", "text", "pickle-prefix", "random-64"])
def test_from_bytes_garbage_raises_state_error(data):
    with pytest.raises(StateError) as ei:
        load(data)
    assert not isinstance(ei.value, ModelMismatchError)
    assert one_line(ei.value).startswith("test: not a swarmtrain state")


def test_from_bytes_truncated_raises_state_error():
    data = make_state().to_bytes()
    for cut in (1, len(data) // 2, len(data) - 1):
        with pytest.raises(StateError) as ei:
            load(data[:cut])
        one_line(ei.value)


def test_from_bytes_wrong_fingerprint_is_model_mismatch():
    with pytest.raises(ModelMismatchError) as ei:
        load(make_state().to_bytes(), fingerprint="ffffffffffffffff")
    msg = one_line(ei.value)
    assert FP in msg and "ffffffffffffffff" in msg
    assert isinstance(ei.value, StateError)


def test_from_bytes_wrong_fingerprint_with_newline_is_one_line():
    with pytest.raises(ModelMismatchError) as ei:
        load(raw_bytes(fingerprint="evil\nsecond line"))
    one_line(ei.value)


@pytest.mark.parametrize("n", [4, 6, 0])
def test_from_bytes_wrong_numel_raises_state_error(n):
    with pytest.raises(StateError) as ei:
        load(make_state().to_bytes(), numel=n)
    assert not isinstance(ei.value, ModelMismatchError)
    assert "expected" in one_line(ei.value)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_from_bytes_non_finite_theta_raises(bad):
    theta = torch.zeros(5)
    theta[2] = bad
    with pytest.raises(StateError, match="NaN or Inf") as ei:
        load(raw_bytes(theta_sync=theta))
    one_line(ei.value)


def test_from_bytes_non_finite_momentum_raises():
    mom = torch.zeros(5)
    mom[0] = math.nan
    with pytest.raises(StateError, match="NaN or Inf"):
        load(raw_bytes(momentum_buf=mom))


@pytest.mark.parametrize("overrides", [
    {"format": "swarmtrain-state/2"},
    {"format": "evil\nline"},
    {"theta_sync": torch.zeros(5, dtype=torch.float64)},
    {"theta_sync": torch.zeros(5, dtype=torch.bfloat16)},
    {"theta_sync": [0.0] * 5},
    {"theta_sync": None},
    {"momentum_buf": torch.zeros(4)},
    {"momentum_buf": torch.zeros(5, dtype=torch.float16)},
    {"momentum_buf": [0.0] * 5},
    {"round": -1},
    {"round": 1.0},
    {"round": "3"},
    {"round": None},
])
def test_from_bytes_malformed_fields_raise_state_error(overrides):
    with pytest.raises(StateError) as ei:
        load(raw_bytes(**overrides))
    one_line(ei.value)


@pytest.mark.parametrize("obj", [[1, 2, 3], torch.zeros(5), "a string", None])
def test_from_bytes_not_a_dict(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    with pytest.raises(StateError) as ei:
        load(buf.getvalue())
    one_line(ei.value)


_CALLED: list[str] = []


def _mark_called(x: str) -> None:  # pragma: no cover - must never run
    _CALLED.append(x)


class _Evil:
    def __reduce__(self):
        return (_mark_called, ("pwned",))


def test_from_bytes_refuses_arbitrary_pickle():
    data = pickle.dumps({"format": FORMAT, "x": _Evil()}, protocol=2)
    with pytest.raises(StateError):
        load(data)
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "x": _Evil()}, buf)
    with pytest.raises(StateError):
        load(buf.getvalue())
    assert _CALLED == []


@pytest.mark.parametrize("samples", ["abc", None, math.nan, [1]])
def test_from_bytes_malformed_samples_raises_state_error(samples):
    with pytest.raises(StateError):
        load(raw_bytes(samples=samples))


# ---------------------------------------------------------------- CheckpointDir
def test_checkpoint_save_name_load_and_latest(tmp_path):
    d = CheckpointDir(tmp_path / "ck", keep_last=3)
    assert d.list() == [] and d.latest() is None  # directory does not exist yet
    p = d.save(make_state(rnd=3))
    assert p == tmp_path / "ck" / "ckpt-r000003.safetensors" and p.is_file()
    assert d.latest() == p
    s = CheckpointDir.load(p, fingerprint=FP, numel=5)
    assert s.round == 3 and torch.equal(s.theta_sync, make_state().theta_sync)


def test_checkpoint_keep_last_prunes_oldest(tmp_path):
    d = CheckpointDir(tmp_path, keep_last=3)
    for r in (1, 2, 3, 4, 5):
        d.save(make_state(rnd=r))
    assert [p.name for p in d.list()] == ["ckpt-r000003.safetensors", "ckpt-r000004.safetensors", "ckpt-r000005.safetensors"]
    assert d.latest().name == "ckpt-r000005.safetensors"
    assert sorted(os.listdir(tmp_path)) == ["ckpt-r000003.safetensors", "ckpt-r000004.safetensors", "ckpt-r000005.safetensors"]


def test_checkpoint_keep_last_zero_keeps_all(tmp_path):
    d = CheckpointDir(tmp_path, keep_last=0)
    for r in range(5):
        d.save(make_state(rnd=r))
    assert len(d.list()) == 5


def test_checkpoint_list_is_numeric_and_ignores_strays(tmp_path):
    d = CheckpointDir(tmp_path, keep_last=10)
    d.save(make_state(rnd=999999))
    d.save(make_state(rnd=1000000))  # 7 digits sorts after 6 numerically
    d.save(make_state(rnd=2))
    for stray in (".ckpt-xxx.tmp", "ckpt-r1.pt", "ckpt-r000004.pt.bak", "notes.txt", "ckpt-r00000a.pt",
                  "ckpt-r1.safetensors", "ckpt-r000005.safetensors.tmp"):
        (tmp_path / stray).write_bytes(b"junk")
    names = [p.name for p in d.list()]
    assert names == ["ckpt-r000002.safetensors", "ckpt-r999999.safetensors", "ckpt-r1000000.safetensors"]
    assert d.latest().name == "ckpt-r1000000.safetensors"


def test_checkpoint_prune_leaves_strays_alone(tmp_path):
    (tmp_path / ".ckpt-xxx.tmp").write_bytes(b"junk")
    d = CheckpointDir(tmp_path, keep_last=1)
    d.save(make_state(rnd=1))
    d.save(make_state(rnd=2))
    assert sorted(os.listdir(tmp_path)) == [".ckpt-xxx.tmp", "ckpt-r000002.safetensors"]


def test_checkpoint_overwrite_same_round(tmp_path):
    d = CheckpointDir(tmp_path)
    d.save(make_state(rnd=1, samples=1))
    d.save(make_state(rnd=1, samples=2))
    assert len(d.list()) == 1
    assert CheckpointDir.load(d.latest(), fingerprint=FP, numel=5).samples == 2


@pytest.mark.parametrize("suffix", ["safetensors", "pt"])
@pytest.mark.parametrize("content", [b"", b"garbage", b"PK\x03\x04truncated zip", b"\xff" * 8 + b"{}"])
def test_checkpoint_load_corrupt_file_untouched(tmp_path, content, suffix):
    d = CheckpointDir(tmp_path)
    good = d.save(make_state(rnd=1))
    bad = tmp_path / f"ckpt-r000002.{suffix}"
    bad.write_bytes(content)
    assert d.latest() == bad
    with pytest.raises(StateError) as ei:
        CheckpointDir.load(bad, fingerprint=FP, numel=5)
    one_line(ei.value)
    assert str(bad) in str(ei.value)
    assert bad.read_bytes() == content
    assert CheckpointDir.load(good, fingerprint=FP, numel=5).round == 1


def test_checkpoint_load_truncated_valid_file(tmp_path):
    p = CheckpointDir(tmp_path).save(make_state(rnd=1))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(StateError):
        CheckpointDir.load(p, fingerprint=FP, numel=5)
    assert p.read_bytes() == data[: len(data) // 2]


def test_checkpoint_load_missing_or_directory(tmp_path):
    with pytest.raises(StateError, match="cannot read checkpoint") as ei:
        CheckpointDir.load(tmp_path / "nope.pt", fingerprint=FP, numel=5)
    one_line(ei.value)
    with pytest.raises(StateError, match="cannot read checkpoint"):
        CheckpointDir.load(tmp_path, fingerprint=FP, numel=5)


def test_checkpoint_is_plain_safetensors_with_its_model_description(tmp_path):
    """Any safetensors reader sees θ_sync, the momentum and, in the header, round, fingerprint
    and the model's description; swarmtrain reads the description back for export."""
    from safetensors import safe_open

    card = {"arch": "gpt", "vocab_size": 256, "block_size": 8, "n_layer": 1, "n_head": 1, "n_embd": 4}
    p = CheckpointDir(tmp_path, model=card).save(make_state(rnd=7, samples=3))
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata()
        assert meta["round"] == "7" and meta["fingerprint"] == FP and json.loads(meta["model"]) == card
        assert torch.equal(f.get_tensor("theta_sync"), make_state().theta_sync)
    state, model = CheckpointDir.load_with_model(p, fingerprint=FP, numel=5)
    assert (state.round, state.samples, model) == (7, 3, card)


def test_checkpoint_of_the_first_format_still_loads(tmp_path):
    """A ckpt-rNNNNNN.pt written by earlier versions (torch.save) is listed, loaded and resumed from."""
    old = tmp_path / "ckpt-r000004.pt"
    with old.open("wb") as f:
        make_state(rnd=4, samples=9).write(f)
    d = CheckpointDir(tmp_path)
    assert d.latest() == old
    s, model = CheckpointDir.load_with_model(old, fingerprint=FP, numel=5)
    assert (s.round, s.samples, model) == (4, 9, {}) and torch.equal(s.theta_sync, make_state().theta_sync)
    assert d.save(make_state(rnd=5)).suffix == ".safetensors" and d.latest().name == "ckpt-r000005.safetensors"


def test_checkpoint_of_another_program_is_one_line(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "ckpt-r000001.safetensors"
    save_file({"weight": torch.zeros(3)}, str(p), metadata={"format": "pt"})
    with pytest.raises(StateError, match="not a swarmtrain checkpoint") as ei:
        CheckpointDir.load(p, fingerprint=None, numel=None)
    one_line(ei.value)
    other = tmp_path / "model.bin"
    other.write_bytes(b"x")
    with pytest.raises(StateError, match="not a swarmtrain checkpoint"):
        CheckpointDir.load(other, fingerprint=None, numel=None)


def test_checkpoint_load_wrong_model(tmp_path):
    p = CheckpointDir(tmp_path).save(make_state(rnd=1))
    with pytest.raises(ModelMismatchError):
        CheckpointDir.load(p, fingerprint="ffffffffffffffff", numel=5)
    with pytest.raises(StateError):
        CheckpointDir.load(p, fingerprint=FP, numel=6)


def _boom(*a, **k):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("where", ["replace", "fsync"])
def test_checkpoint_failed_write_keeps_previous(tmp_path, monkeypatch, where):
    d = CheckpointDir(tmp_path, keep_last=1)
    prev = d.save(make_state(rnd=1))
    prev_bytes = prev.read_bytes()
    monkeypatch.setattr(fsutil_mod.os, where, _boom)
    with pytest.raises(OSError):
        d.save(make_state(rnd=2))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt-r000001.safetensors"]  # no temp file, no partial ckpt, no prune
    assert d.list() == [prev] and prev.read_bytes() == prev_bytes
    assert CheckpointDir.load(prev, fingerprint=FP, numel=5).round == 1


def test_checkpoint_failed_overwrite_of_same_round_keeps_old_content(tmp_path, monkeypatch):
    d = CheckpointDir(tmp_path)
    p = d.save(make_state(rnd=1, samples=1))
    monkeypatch.setattr(fsutil_mod.os, "replace", _boom)
    with pytest.raises(OSError):
        d.save(make_state(rnd=1, samples=2))
    monkeypatch.undo()
    assert CheckpointDir.load(p, fingerprint=FP, numel=5).samples == 1
    assert sorted(os.listdir(tmp_path)) == ["ckpt-r000001.safetensors"]
