"""Real models, real data, real checkpoints (issue 18): token shards, Hugging Face Llamas in a
swarm, safetensors checkpoints, and the export that `from_pretrained` loads."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from averaging.flat import (
    flatten_params,
    parameter_schema,
    schema_fingerprint,
    write_flat_,
)
from bootstrap.export import export
from bootstrap.export import main as export_main
from peer import prepare as prepare_mod
from peer.config import ModelConfig
from peer.data import DataError
from peer.hf import describe_model
from peer.model import build_model
from peer.prepare import load_tokenizer, prepare
from peer.shards import WindowSampler, open_shards
from peer.state import CheckpointDir, SwarmState

from .conftest import summary, wait_exit

TEXT = {
    "a.txt": "The quick brown fox jumps over the lazy dog.\n" * 40,
    "b/c.md": "# Notes\n\nDiLoCo averages pseudo-gradients.\nÜnïcödé survives: naïve café, 東京.\n" * 30,
    "b/d.py": "def f(x):\n    return x * 2\n\n" * 50,
    "e.txt": "",
    "f.txt": "lorem ipsum dolor sit amet, consectetur adipiscing elit\n" * 35,
    "g.txt": "one line without a newline at the end",
}


def sentences(n_files: int, seed: int = 0) -> dict[str, str]:
    """Files of one distribution (a small grammar), so held-out files measure learning."""
    rng = np.random.default_rng(seed)
    who, does, what = (["the fox", "a peer", "the swarm", "my model", "every node"],
                       ["trains", "averages", "sends", "learns", "checks"],
                       ["the weights.", "a round.", "its shard.", "the loss.", "new tokens."])
    return {f"doc{i:02d}.txt": "".join(f"{rng.choice(who)} {rng.choice(does)} {rng.choice(what)}\n" for _ in range(60))
            for i in range(n_files)}


def corpus(root, text=TEXT):
    for rel, content in text.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content, encoding="utf-8")
    return root


def decoded_documents(folder):
    """{piece name: its bytes}, decoded from the shards in the manifest's order."""
    shards = open_shards(folder)
    m = shards.manifest
    tok_file = shards.tokenizer_file()
    tok = load_tokenizer(tok_file) if tok_file else prepare_mod.Tokenizer()
    streams = {s: np.concatenate(getattr(shards, s)) for s in ("train", "val")}
    pos, out = {"train": 0, "val": 0}, {}
    for d in m.documents:
        ids = streams[d["split"]][pos[d["split"]]:pos[d["split"]] + d["tokens"]]
        pos[d["split"]] += d["tokens"]
        if m.eos_id is not None and not d["name"].count("#"):  # a whole file: its end-of-text token ends it
            assert ids[-1] == m.eos_id
            ids = ids[:-1]
        out[d["name"]] = tok.decode(ids)
    assert pos == {s: len(a) for s, a in streams.items()}  # every token belongs to one document
    return out


@pytest.mark.parametrize("tokenizer", ["bytes", "trained"])
def test_prepare_writes_shards_whose_decode_is_the_input(tmp_path, tokenizer):
    src = corpus(tmp_path / "text")
    out = tmp_path / "data"
    m = prepare([str(src)], out, train_vocab=300 if tokenizer == "trained" else 0, val_fraction=0.2,
                shard_tokens=1024)
    assert m.vocab_size == (300 if tokenizer == "trained" else 256)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", *(s.file for s in m.shards)] + (["tokenizer.json"] if tokenizer == "trained" else []))
    assert len([s for s in m.shards if s.split == "train"]) > 1  # 1024 tokens a shard: several
    docs = decoded_documents(out)
    assert docs == {rel: content.encode() for rel, content in TEXT.items()}
    splits = {d["name"]: d["split"] for d in m.documents}
    assert "val" in splits.values() and "train" in splits.values()
    # The same input gives the same folder, byte for byte (peers may prepare their own copy).
    again = prepare([str(src)], tmp_path / "again", train_vocab=300 if tokenizer == "trained" else 0,
                    val_fraction=0.2, shard_tokens=1024)
    assert again == m


def test_prepare_cuts_large_files_at_line_ends_and_decodes_them_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_mod, "PIECE_BYTES", 1000)
    lines = "".join(f"line {i}: {'x' * (i % 50)}\n" for i in range(600))
    src = corpus(tmp_path / "text", {"big.txt": lines, "small.txt": "tiny\n"})
    m = prepare([str(src)], tmp_path / "data", val_fraction=0.3)
    names = [d["name"] for d in m.documents]
    assert len([n for n in names if n.startswith("big.txt#")]) > 10
    docs = decoded_documents(tmp_path / "data")
    assert all(piece.endswith(b"\n") for n, piece in docs.items() if n.startswith("big"))  # cut at line ends
    big = b"".join(docs[n] for n in names if n.startswith("big.txt#"))
    assert big == lines.encode()


def test_prepare_reads_a_datasets_folder_row_by_row(tmp_path, monkeypatch):
    """A `datasets` save_to_disk folder: one document per row; a DatasetDict keeps its own held-out
    split and leaves "test" out; a single Dataset is split by hash. Decoding gives the rows back."""
    import datasets  # the dev extra (./run test) installs it
    monkeypatch.setattr(prepare_mod, "PIECE_BYTES", 400)  # several pieces from a small dataset
    rows = {s: [f"{s} row {i}: " + " ".join(list(sentences(1, seed=i).values())[0].split()[:12]) for i in range(n)]
            for s, n in (("train", 40), ("validation", 6), ("test", 5))}
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": r, "id": list(range(len(r)))})
                               for s, r in rows.items()})
    dd.save_to_disk(str(tmp_path / "dd"))
    m = prepare([str(tmp_path / "dd")], tmp_path / "data", train_vocab=300)
    docs = decoded_documents(tmp_path / "data")
    by_split = {s: [] for s in ("train", "val")}
    for d in m.documents:  # pieces of consecutive rows, an end-of-text token after each row
        by_split[d["split"]] += docs[d["name"]].decode().split(prepare_mod.EOT)
    assert by_split == {"train": rows["train"], "val": rows["validation"]}  # "test" is not trained on
    assert len([d for d in m.documents if d["split"] == "train"]) > 3

    # One Dataset, bytes (no end-of-text token): rows one per line, held out by hash of the piece.
    datasets.Dataset.from_dict({"body": rows["train"]}).save_to_disk(str(tmp_path / "ds"))
    m = prepare([str(tmp_path / "ds")], tmp_path / "bytes", text_column="body", val_fraction=0.2)
    docs = decoded_documents(tmp_path / "bytes")
    assert b"".join(docs[d["name"]] for d in m.documents) == "".join(r + "\n" for r in rows["train"]).encode()
    assert {d["split"] for d in m.documents} == {"train", "val"}

    # Bad datasets folders: one line each, nothing written.
    datasets.DatasetDict({"test": dd["test"]}).save_to_disk(str(tmp_path / "notrain"))
    datasets.Dataset.from_dict({"text": ["a", None, "c"]}).save_to_disk(str(tmp_path / "holes"))
    for paths, kwargs, message in [([tmp_path / "ds"], {}, "has no column 'text'; its columns: body"),
                                   ([tmp_path / "notrain"], {}, "none named 'train'"),
                                   ([tmp_path / "holes"], {}, "row 1: column 'text' holds NoneType, not text")]:
        with pytest.raises(DataError, match=message) as ei:
            prepare([str(p) for p in paths], tmp_path / "out", **kwargs)
        assert "\n" not in str(ei.value) and not (tmp_path / "out").exists()
    assert prepare_mod.main([str(tmp_path / "ds"), "--out", str(tmp_path / "cli"), "--text-column", "body"]) == 0


def test_prepare_bad_input_is_one_line_and_leaves_nothing(tmp_path):
    src = corpus(tmp_path / "text")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.bin").write_bytes(b"\xff\xfe\x00" * 100)
    (tmp_path / "bin" / "y.bin").write_bytes(b"\xff\xfe\x01" * 100)
    cases = [
        (dict(paths=[str(tmp_path / "missing")]), "does not exist"),
        (dict(paths=[str(src)], tokenizer=str(tmp_path / "nope.json")), "cannot load tokenizer"),
        (dict(paths=[str(src)], train_vocab=100), "vocabulary size"),
        (dict(paths=[str(tmp_path / "bin")], train_vocab=300), "not UTF-8 text"),
        (dict(paths=[str(src / "g.txt")]), "too little to hold out"),
    ]
    for kwargs, message in cases:
        with pytest.raises(DataError, match=message) as ei:
            prepare(out=tmp_path / "out", **kwargs)
        assert "\n" not in str(ei.value)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    prepare([str(tmp_path / "bin")], tmp_path / "out")  # bytes need no text: any file
    with pytest.raises(DataError, match="not an empty folder"):
        prepare([str(src)], tmp_path / "out")


def test_a_corrupt_shard_or_manifest_is_one_line(tmp_path):
    src = corpus(tmp_path / "text")
    good = tmp_path / "good"
    prepare([str(src)], good, train_vocab=300, val_fraction=0.2)
    open_shards(good)

    def broken(name, damage):
        d = tmp_path / name
        shutil.copytree(good, d)
        damage(d)
        with pytest.raises(DataError) as ei:
            open_shards(d)
        assert "\n" not in str(ei.value)
        return str(ei.value)

    def flip(d):
        p = d / "train-00000.bin"
        b = bytearray(p.read_bytes())
        b[10] ^= 1
        p.write_bytes(bytes(b))

    def edit(d, **changes):
        obj = json.loads((d / "manifest.json").read_text())
        obj.update(changes)
        (d / "manifest.json").write_text(json.dumps(obj))

    assert "corrupt" in broken("flipped", flip)
    assert "truncated" in broken("short", lambda d: (d / "val-00000.bin").write_bytes((d / "val-00000.bin").read_bytes()[:-2]))
    assert "missing" in broken("gone", lambda d: (d / "train-00000.bin").unlink())
    assert "not valid JSON" in broken("json", lambda d: (d / "manifest.json").write_text("{\"format\": "))
    assert "not a swarmtrain shard manifest" in broken("format", lambda d: edit(d, format="other/1"))
    assert "dtype" in broken("dtype", lambda d: edit(d, dtype="float32"))
    assert "not a file name" in broken("escape", lambda d: edit(d, tokenizer={"kind": "tokenizers", "file": "../x"}))
    assert "tokenizer" in broken("tok", lambda d: (d / "tokenizer.json").write_text("{}"))
    assert "no shard folder" not in broken("nomanifest", lambda d: (d / "manifest.json").unlink())
    with pytest.raises(DataError, match="does not exist"):
        open_shards(tmp_path / "nowhere")


def test_windows_are_disjoint_between_peers_and_cover_the_data_every_epoch():
    arrays = (np.arange(1000, dtype=np.uint16), np.arange(1000, 1700, dtype=np.uint16))
    T = 10
    starts = {}
    for i in range(3):
        s = WindowSampler(arrays, block_size=T, batch_size=4, shard=(i, 3), seed=99 + i)
        seen = []
        for _ in range(s.windows // 4):
            x, y = next(s)
            assert torch.equal(x[:, 1:], y[:, :-1])
            seen += [int(v) for v in x[:, 0]]
        starts[i] = seen
        assert len(set(seen)) == len(seen)  # one pass: no window twice in an epoch
    assert not set(starts[0]) & set(starts[1]) and not set(starts[1]) & set(starts[2])  # peers never share one
    every = {a[k * T] for a in arrays for k in range((len(a) - 1) // T)}
    assert set().union(*starts.values()) <= every and len(set().union(*starts.values())) >= len(every) - 3 * 4
    # Windows never straddle two shards: each window's tokens are consecutive.
    s = WindowSampler(arrays, block_size=T, batch_size=8, shard=None, seed=1)
    for _ in range(30):
        x, y = next(s)
        assert bool((torch.diff(torch.cat([x, y[:, -1:]], 1)) == 1).all())
    assert s.epoch >= 1  # the second epoch came, in another order
    with pytest.raises(DataError, match="fewer than one batch"):
        WindowSampler(arrays, block_size=T, batch_size=100, shard=(0, 3), seed=0)


def test_a_preset_fills_only_the_sizes_left_at_their_defaults():
    """`--model.preset llama-10M --model.block-size 256` trains 256-token windows. The preset
    used to override the flag silently (the Hugging Face benchmark's peers then trained 512-token
    windows against the plain loop's 256)."""
    from peer import cli

    base = ["--model.preset", "llama-10M", "--model.vocab-size", "8192"]
    assert cli.parse(base).model.block_size == 512  # the preset's own
    m = cli.parse(base + ["--model.block-size", "256", "--model.n-layer", "4"]).model
    assert (m.block_size, m.n_layer, m.n_embd, m.arch) == (256, 4, 384, "llama")
    assert build_model(m).hf.config.num_hidden_layers == 4


def test_llama_weights_are_identical_for_one_seed_and_differ_for_another():
    cfg = ModelConfig(preset="llama-tiny", vocab_size=300)
    a, b, c = (flatten_params(build_model(cfg, seed=s).parameters()) for s in (4, 4, 5))
    assert torch.equal(a, b) and not torch.equal(a, c)
    x = torch.randint(0, 300, (2, 16))
    logits, loss = build_model(cfg, seed=4)(x, x)
    ref = torch.nn.functional.cross_entropy(logits.view(-1, 300), x.view(-1))
    assert torch.allclose(loss, ref)  # the model's own loss: every position of the window counts


@pytest.mark.parametrize("arch", ["llama", "gpt"])
def test_export_loads_with_from_pretrained_and_gives_the_swarms_logits(tmp_path, arch):
    cfg = ModelConfig(preset="llama-tiny", vocab_size=300) if arch == "llama" else ModelConfig(n_layer=2)
    model = build_model(cfg, seed=1)
    theta = flatten_params(model.parameters()) + 0.05 * torch.randn(sum(p.numel() for p in model.parameters()))
    write_flat_(list(model.parameters()), theta)  # "trained": not the seed's weights
    fp = schema_fingerprint(parameter_schema(model.named_parameters()))
    CheckpointDir(tmp_path / "ck", model=describe_model(model)).save(SwarmState(9, fp, theta, torch.zeros_like(theta)))
    prepare([str(corpus(tmp_path / "text"))], tmp_path / "data", train_vocab=300)
    out, rnd = export(tmp_path / "ck", tmp_path / "hf", tokenizer=tmp_path / "data" / "tokenizer.json")
    assert rnd == 9
    hf = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    x = torch.randint(0, cfg.vocab_size, (3, 24))
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=x).logits, model(x)[0], atol=1e-5, rtol=0)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok.decode(tok("naïve café\n")["input_ids"]) == "naïve café\n"


def test_export_refuses_a_wrong_model_and_a_checkpoint_that_does_not_say(tmp_path, capsys):
    model = build_model(ModelConfig(preset="llama-tiny"), seed=0)
    theta = flatten_params(model.parameters())
    fp = schema_fingerprint(parameter_schema(model.named_parameters()))
    CheckpointDir(tmp_path / "archive").save(SwarmState(3, fp, theta, None))  # an archivist's: no description
    assert export_main(["--checkpoint", str(tmp_path / "archive"), "--out", str(tmp_path / "a")]) == 1
    assert "does not say which model" in capsys.readouterr().err
    assert export_main(["--checkpoint", str(tmp_path / "archive"), "--out", str(tmp_path / "b"),
                        "--model.preset", "llama-tiny", "--model.vocab-size", "300"]) == 1
    err = capsys.readouterr().err
    assert "not the run's model" in err and err.count("\n") == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert export_main(["--checkpoint", str(tmp_path / "archive"), "--out", str(tmp_path / "c"),
                        "--model.preset", "llama-tiny"]) == 0  # the run's flags: exported
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "c"), local_files_only=True).num_parameters() == theta.numel()


@pytest.mark.timeout(400)
def test_two_peers_train_a_llama_preset_on_prepared_shards(procs):
    """The guide's path end to end: prepare, two `swarm-peer`s on a Llama preset, export."""
    data = procs.tmp / "data"
    prepare([str(corpus(procs.tmp / "text", sentences(40)))], data, train_vocab=320, val_fraction=0.2)
    _, addr = procs.bootstrap()
    flags = ["--model.preset", "llama-tiny", "--model.vocab-size", "320", "--model.block-size", "32",
             "--data.source", "shards", "--data.paths", str(data), "--data.batch-size", "8",
             "--train.lr", "3e-3", "--sync.every-steps", "15", "--train.max-rounds", "4"]
    peers = [procs.peer(f"p{i}", addr, *flags, "--data.shard", f"{i}/2", "--checkpoint.dir", str(procs.tmp / f"ck{i}"))
             for i in range(2)]
    for p in peers:
        assert wait_exit(procs, p, 300) == 0, procs.log(p)[-3000:]
    s0, s1 = summary(procs, "p0"), summary(procs, "p1")
    assert s0["rounds"] == s1["rounds"] == 4 and s0["digest"] == s1["digest"]  # they agree
    assert s0["val_loss_final"] < s0["val_loss_start"] - 0.3, s0["val_loss_by_round"]  # and learned
    out, rnd = export(procs.tmp / "ck0", procs.tmp / "hf", tokenizer=data / "tokenizer.json")
    assert rnd == 4
    hf = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert type(hf).__name__ == "LlamaForCausalLM"
    state = CheckpointDir.load(CheckpointDir(procs.tmp / "ck1").latest(), fingerprint=None, numel=None)
    assert torch.equal(flatten_params(hf.parameters()), state.theta_sync)  # the other peer's θ, exactly


def guide_commands() -> list[list[str]]:
    """The commands of docs/train-your-own-model.md's tested block, split into argv lists."""
    import re
    import shlex

    from .conftest import REPO

    text = (REPO / "docs" / "train-your-own-model.md").read_text()
    m = re.search(r"<!-- tested: tests/test_hf.py::test_train_your_own_model_guide -->\n```bash\n(.*?)```", text, re.S)
    assert m, "the guide's tested block is gone"
    return [shlex.split(line) for line in m.group(1).splitlines() if line.strip()]


@pytest.mark.timeout(400)
def test_train_your_own_model_guide(procs):
    """docs/train-your-own-model.md's commands, as written, with a tiny Llama and a few rounds:
    prepare, a bootstrap node, two peers, export; then from_pretrained loads the result."""
    paths = {"--identity", "--checkpoint-dir", "--data.paths", "--checkpoint.dir", "--checkpoint", "--out", "--tokenizer"}

    def local(argv: list[str]) -> list[str]:  # the guide's relative paths, under the test's folder; a tiny model
        out = []
        for i, a in enumerate(argv):
            if (argv[i - 1] in paths or (argv[:2] == ["swarm-peer", "prepare"] and i == 2)) and not a.startswith("/"):
                a = str(procs.tmp / a)
            out.append({"llama-10M": "llama-tiny", "8192": "320"}.get(a, a))
        return out

    prep, boot, *peers, exp = (local(c) for c in guide_commands())
    assert [c[:2] for c in (prep, boot, exp)] == [["swarm-peer", "prepare"], ["swarm-bootstrap", "--identity"],
                                                  ["swarm-bootstrap", "export"]] and len(peers) == 2
    corpus(procs.tmp / "my-corpus", sentences(40))
    assert prepare_mod.main(prep[2:]) == 0
    boot[boot.index("--port") + 1] = "0"
    node, addr = procs.bootstrap("boot", *boot[3:])  # its own --identity, --host 127.0.0.1, a free port
    fast = ["--model.block-size", "32", "--data.batch-size", "8", "--train.lr", "3e-3", "--sync.every-steps", "10",
            "--train.max-rounds", "3"]
    ps = [procs.peer(f"p{i}", addr, *[a for a in p[3:]], *fast) for i, p in enumerate(peers)]
    assert all(p[1:3] == ["--join", "ADDR"] for p in peers)
    for p in ps:
        assert wait_exit(procs, p, 300) == 0, procs.log(p)[-3000:]
    s = [summary(procs, f"p{i}") for i in range(2)]
    assert s[0]["rounds"] == s[1]["rounds"] == 3 and s[0]["digest"] == s[1]["digest"]
    assert s[0]["val_loss_final"] < s[0]["val_loss_start"] - 0.3
    assert export_main(exp[2:]) == 0
    out = procs.tmp / "my-llama"
    hf = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    state = CheckpointDir.load(CheckpointDir(procs.tmp / "ckpt-1").latest(), fingerprint=None, numel=None)
    assert state.round == 3 and torch.equal(flatten_params(hf.parameters()), state.theta_sync)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok.decode(tok("the swarm trains the weights.\n")["input_ids"]) == "the swarm trains the weights.\n"
    node.terminate()


@pytest.mark.timeout(400)
def test_python_api_hf_example(procs):
    """docs/python-api.md's Hugging Face example as the page runs it: prepare, the script as two
    peers (host="127.0.0.1" added), export; the exported folder holds the swarm's parameters."""
    import re
    import shlex
    import sys

    from .conftest import REPO

    doc = (REPO / "docs" / "python-api.md").read_text()
    section = doc[doc.index("## A Hugging Face model, token shards and the export"):doc.index("## `Peer` reference")]
    cmds = [shlex.split(line) for line in re.search(r"```bash\n(.*?)```", section, re.S).group(1).splitlines()]
    script = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    old = 'SwarmConfig(run_id="my-llama-py", initial_peers=join)'
    assert old in script and 'add `host="127.0.0.1"` to `SwarmConfig`' in section.replace("\n", " ")
    (procs.tmp / "llama_peer.py").write_text(script.replace(old, old[:-1] + ', host="127.0.0.1")'))
    prep, run, exp = cmds
    assert prep[:2] == ["swarm-peer", "prepare"] and run[:2] == ["python", "llama_peer.py"] and exp[:2] == ["swarm-bootstrap", "export"]
    corpus(procs.tmp / "my-corpus", sentences(40))
    prep[2], prep[prep.index("--out") + 1] = str(procs.tmp / prep[2]), str(procs.tmp / "data")
    assert prepare_mod.main(prep[2:]) == 0
    _, addr = procs.bootstrap()
    peers = []
    for i in range(2):
        log = open(procs.tmp / f"py{i}.log", "wb")
        peers.append(subprocess.Popen([sys.executable, "llama_peer.py", str(procs.tmp / "data"), f"{i}/2", addr],
                                      cwd=procs.tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                      env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}))
        procs.started.append(peers[-1])
        peers[-1].name, peers[-1].logfile = f"py{i}", procs.tmp / f"py{i}.log"
    for p in peers:
        assert wait_exit(procs, p, 300) == 0, procs.log(p)[-3000:]
    digests = [dict(re.findall(r"^round (\d+): loss [\d.]+, digest (\w+)", procs.log(p), re.M)) for p in peers]
    assert "3" in digests[0] and digests[0]["3"] == digests[1].get("3"), digests
    args = exp[2:]
    for flag in ("--checkpoint", "--out", "--tokenizer"):
        args[args.index(flag) + 1] = str(procs.tmp / args[args.index(flag) + 1])
    assert export_main(args) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(procs.tmp / "my-llama"), local_files_only=True)
    state = CheckpointDir.load(CheckpointDir(procs.tmp / "ckpt-1").latest(), fingerprint=None, numel=None)
    assert state.round == 3 and torch.equal(flatten_params(hf.parameters()), state.theta_sync)


def test_a_config_json_or_a_pretrained_folder_gives_every_peer_the_same_model(tmp_path):
    """--model.hf-config (here a GPT-2's config.json) builds seeded weights; --model.init-from
    starts from a folder's weights exactly. Both are one line when the file is wrong."""
    from transformers import GPT2Config

    GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2).to_json_file(str(tmp_path / "config.json"))
    cfg = ModelConfig(hf_config=str(tmp_path / "config.json"), block_size=64)
    assert cfg.arch == "hf"
    a, b = build_model(cfg, seed=7), build_model(cfg, seed=7)
    assert torch.equal(flatten_params(a.parameters()), flatten_params(b.parameters()))
    assert type(a.hf).__name__ == "GPT2LMHeadModel"
    a.hf.save_pretrained(str(tmp_path / "released"))
    started = build_model(ModelConfig(init_from=str(tmp_path / "released"), block_size=32), seed=123)
    assert torch.equal(flatten_params(started.parameters()), flatten_params(a.parameters()))  # the folder's, not the seed's
    x = torch.randint(0, 300, (2, 16))
    assert started.training and torch.allclose(started.eval()(x)[0], a.eval()(x)[0])  # eval: GPT-2 has dropout
    from averaging.errors import ConfigError

    (tmp_path / "bad.json").write_text('{"model_type": "no-such-model"}')
    for kwargs, message in [(dict(hf_config=str(tmp_path / "missing.json")), "does not exist"),
                            (dict(hf_config=str(tmp_path / "bad.json")), "cannot read the transformers config"),
                            (dict(init_from=str(tmp_path / "config.json")), "cannot"),
                            (dict(hf_config=str(tmp_path / "config.json"), block_size=65), "exceeds")]:
        with pytest.raises((ConfigError, ValueError), match=message) as ei:
            build_model(ModelConfig(**kwargs), seed=0)
        assert "\n" not in str(ei.value)
    with pytest.raises(ValueError, match="both name the architecture"):
        ModelConfig(hf_config="a.json", init_from="b/")
