"""Every shell command in README.md and docs/*.md is run by a test, or marked as illustrative.

The convention. Each fenced ```bash, ```sh, ```console or ```shell block is preceded by one
HTML comment (blank lines, and other comments such as <!-- convergence:begin -->, may sit
in between):

    <!-- tested: tests/test_x.py::test_name, tests/test_y.py::test_other -->
        one or more tests that run the block's commands (checked to exist, with ast)
    <!-- illustrative: why -->   (or just <!-- illustrative -->)
        it cannot run here: it installs from PyPI, needs a GPU or an account, ...

`test_every_shell_block_is_marked` enforces it. The blocks marked for the tests in this file
are run by them, on 127.0.0.1 only, with these rewrites (see `Scenario.rewrite`):

- a placeholder or public address (`ADDR`, `/ip4/<host>/tcp/31337/p2p/<peer id>`,
  `/ip4/203.0.113.5/…/p2p/Qm…`) becomes the address of a bootstrap node started by the
  block itself, or else by the test (`B's` addresses: the block's second bootstrap node);
- fixed ports (`--port`, `--swarm.port`, `--dashboard`, `port =` in a TOML file) become
  free ports; curl's `127.0.0.1:8080` becomes the dashboard that was started;
- `/var/lib/swarmtrain/` becomes a directory under the test's temporary directory, which
  is also the working directory and $HOME; documentation IPs become 127.0.0.1;
- bootstrap nodes get `--host 127.0.0.1` and an addresses file; peers get
  `--swarm.host 127.0.0.1`, a small data slice and batch, 1 thread, `--train.max-steps 3`,
  and their own run id unless the command names one (so peers with different models never
  meet); each peer must exit 0 after joining (`joined run`) and print its `SUMMARY`;
- `--config FILE` uses the TOML block whose first line is `# FILE`, from the same document
  or else from docs/start-a-run.md; a secret file the block uses but does not create with
  `keygen` is created first (the organizer's);
- consecutive training peers of a block run at the same time, unless they share an identity.

The other runners: `test_console_transcripts` runs each `$ command` of a ```console block
and matches the documented output (`…` and `<placeholder>` match anything);
`test_run_demo` / `test_run_test` run what `./run demo` / `./run test` execute after setup;
`test_quickstart_swarm_by_hand` runs the quickstart's bootstrap, two peers and status;
`test_python_api_example` runs docs/python-api.md's complete example as two peers;
`test_pytest_commands_collect` collects the documented pytest commands.

Independently of the markers, `test_every_command_parses` feeds every `swarm-peer`,
`swarm-peer status` and `swarm-bootstrap` command in the docs, illustrative ones included,
to the real argument parsers and config loader; `test_toml_examples_load` loads every TOML
example with the real loader; `test_doc_links_resolve` checks every relative link.
"""
from __future__ import annotations

import ast
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .conftest import REPO, free_port

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

BIN = Path(sys.executable).parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "console", "shell"}
MARKER = re.compile(r"^\s*<!--\s*(tested|illustrative)\b\s*(?::\s*(.*?))?\s*-->\s*$")
COMMENT = re.compile(r"^\s*<!--.*-->\s*$")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+.-]*)\s*$")
# Placeholder or example addresses in the docs; all of them are replaced before anything runs.
MADDR = re.compile(r"/ip4/\S+?/p2p/(?:<[^<>\s]*>|[^\s,\"'<])+")
DOC_IPS = re.compile(r"\b(?:203\.0\.113|198\.51\.100|192\.0\.2)\.\d{1,3}\b")
ANY_IPV4 = re.compile(r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b")
TEST_ADDR = "/ip4/127.0.0.1/tcp/31337/p2p/QmWH2338V6q5FLN3NsMADqYNozuKPRhJvZSiHCtxj3NZkt"


def squash(text: str) -> str:
    """`<A's IP>` -> `<A's_IP>`, so that a placeholder is one shell word."""
    return re.sub(r"<[^<>]*>", lambda m: m.group(0).replace(" ", "_"), text)


# ---------------------------------------------------------------- the blocks
@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str  # the content, dedented to the fence's indentation
    marker: tuple[str, str] | None  # ("tested", "tests/a.py::t, …") or ("illustrative", reason)

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    @property
    def tests(self) -> list[str]:
        if not self.marker or self.marker[0] != "tested":
            return []
        return [t.strip() for t in self.marker[1].split(",") if t.strip()]


def parse_blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        j = i + 1
        while j < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[j]):
            j += 1
        body = [l[len(indent):] if l.startswith(indent) else l.lstrip() for l in lines[i + 1:j]]
        marker, k = None, i - 1
        while k >= 0 and (not lines[k].strip() or COMMENT.match(lines[k])):
            mm = MARKER.match(lines[k])
            if mm:
                marker = (mm.group(1), mm.group(2) or "")
                break
            k -= 1
        out.append(Block(path, i + 1, lang.lower(), "\n".join(body), marker))
        i = j + 1
    return out


ALL_BLOCKS = [b for p in DOCS for b in parse_blocks(p)]
SHELL_BLOCKS = [b for b in ALL_BLOCKS if b.lang in SHELL_LANGS]


def marked_for(test_name: str) -> list[Block]:
    return [b for b in ALL_BLOCKS if f"tests/test_docs.py::{test_name}" in b.tests]


def ids(blocks: list[Block]) -> list[str]:
    return [b.id for b in blocks]


def commands(block: Block) -> list[str]:
    """The block's command lines: continuations joined, comments and console output dropped."""
    text = block.text.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        s = line.strip()
        if block.lang == "console":
            if not s.startswith("$ "):
                continue
            s = s[2:]
        if not s or s.startswith("#"):
            continue
        out.append(re.sub(r"\s+#.*$", "", s))
    return out


def toml_block(doc: Path, name: str) -> str | None:
    """The TOML example whose first line is `# name` (or `# name: …`): from `doc`, else start-a-run.md."""
    for d in (doc, REPO / "docs" / "start-a-run.md"):
        for b in parse_blocks(d):
            first = b.text.splitlines()[0] if b.text else ""
            if b.lang == "toml" and re.match(rf"^#\s*{re.escape(name)}\b", first):
                return b.text
    return None


# ---------------------------------------------------------------- (a)-(c): the markers
def _test_exists(ref: str) -> bool:
    file, _, name = ref.partition("::")
    path = REPO / file
    if not name or not path.is_file():
        return False
    tree = ast.parse(path.read_text())
    cls, _, meth = name.partition("::")
    for node in tree.body:
        if meth and isinstance(node, ast.ClassDef) and node.name == cls:
            return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == meth for n in node.body)
        if not meth and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return True
    return False


def test_every_shell_block_is_marked():
    assert len(SHELL_BLOCKS) > 20, "the block parser found too few blocks"
    unmarked = [b.id for b in SHELL_BLOCKS if b.marker is None]
    assert not unmarked, ("shell blocks without <!-- tested: tests/…::test --> or <!-- illustrative --> "
                          "before them:\n  " + "\n  ".join(unmarked))


def test_every_named_test_exists():
    bad = [f"{b.id}: {t}" for b in ALL_BLOCKS for t in b.tests if not _test_exists(t)]
    empty = [b.id for b in ALL_BLOCKS if b.marker and b.marker[0] == "tested" and not b.tests]
    assert not bad and not empty, "markers naming tests that do not exist:\n  " + "\n  ".join(bad + empty)


def test_marker_parser_handles_the_edge_cases(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("<!-- illustrative -->\n\n```bash\na\n```\n"
                   "<!-- tested: tests/test_docs.py::test_every_named_test_exists -->\n<!-- convergence:begin -->\n"
                   "```sh\nb\n```\n"
                   "- item\n\n  <!-- illustrative: needs a GPU -->\n  ```console\n  $ c\n  ```\n"
                   "text\n```bash\nd\n```\n")
    got = [(b.lang, b.text, b.marker) for b in parse_blocks(doc)]
    assert got == [("bash", "a", ("illustrative", "")),
                   ("sh", "b", ("tested", "tests/test_docs.py::test_every_named_test_exists")),
                   ("console", "$ c", ("illustrative", "needs a GPU")),
                   ("bash", "d", None)]
    assert _test_exists("tests/test_docs.py::test_every_named_test_exists")
    assert not _test_exists("tests/test_docs.py::no_such_test") and not _test_exists("tests/nope.py::t")


# ---------------------------------------------------------------- every command parses
def _argv(cmd: str) -> list[str]:
    """Tokens up to the first pipe / redirect / separator, without leading VAR=value."""
    toks = []
    for t in shlex.split(cmd):
        if t in ("|", "||", "&&", ";", ">", ">>", "2>", "2>&1", "&") or t.startswith((">", "2>")):
            break
        toks.append(t)
    while toks and re.match(r"^[A-Z_][A-Z0-9_]*=", toks[0]):
        toks.pop(0)
    return toks


def _parse_check(cmd: str, doc: Path, tmp: Path, monkeypatch) -> str | None:
    """Feed one documented command to the real parser; return an error, or None."""
    from averaging.access import generate_secret_file
    from averaging.errors import NetworkError
    from bootstrap import cli as bcli
    from peer import cli as pcli

    secret = tmp / "doc.secret"
    if not secret.exists():
        generate_secret_file(secret)
    text = MADDR.sub(TEST_ADDR, squash(cmd))
    text = re.sub(r"\bADDR\b", TEST_ADDR, text)
    argv = _argv(text)
    if not argv:
        return None
    head, rest = argv[0], argv[1:]
    if head in ("python", "python3", ".venv/bin/python", sys.executable) and rest[:2] == ["-m", "peer"]:
        head, rest = "swarm-peer", rest[2:]
    if head in ("python", "python3", ".venv/bin/python", sys.executable) and rest[:2] == ["-m", "bootstrap"]:
        head, rest = "swarm-bootstrap", rest[2:]
    # files the command reads: a config file from the same document, a secret
    for flag in ("--config",):
        if flag in rest:
            k = rest.index(flag) + 1
            name = Path(rest[k]).name
            body = toml_block(doc, name)
            if body is None:
                return f"--config {rest[k]}: no TOML block starting with '# {name}' in {doc.name}"
            f = tmp / name
            f.write_text(MADDR.sub(TEST_ADDR, body))
            rest[k] = str(f)
    for flag in ("--secret-file",):
        if flag in rest:
            rest[rest.index(flag) + 1] = str(secret)
    try:
        if head == "swarm-peer" and rest[:1] == ["status"]:
            def no_network(*a, **k):
                raise NetworkError("stubbed: no network in this test")
            monkeypatch.setattr("averaging.dht.SwarmDHT.start", no_network)
            rc = pcli.status(rest[1:])
            return None if rc == 1 else f"swarm-peer status exited with {rc}"
        if head == "swarm-peer" and rest[:1] == ["prepare"]:
            from peer.prepare import parser as prepare_parser
            prepare_parser().parse_args(rest[1:])
            return None
        if head == "swarm-bootstrap" and rest[:1] == ["export"]:
            from bootstrap.export import parser as export_parser
            export_parser().parse(rest[1:])
            return None
        if head == "swarm-peer":
            try:
                pcli.parse(rest)
            except SystemExit as e:  # --print-config exits 0 after printing
                return None if e.code == 0 else f"exit {e.code}"
            return None
        if head == "swarm-bootstrap" and rest[:1] == ["keygen"]:
            if "--identity" in rest:
                out = ["--identity", str(tmp / f"k{time.monotonic_ns()}.key")]
            else:
                out = ["--out", str(tmp / f"k{time.monotonic_ns()}.secret")] if "--out" in rest else []
            return None if bcli.keygen(out) == 0 else "keygen failed"
        if head == "swarm-bootstrap":
            bcli.parse(rest)
            return None
        if head == "./run":
            labels = re.findall(r"^\s*([\w-]+)\)", (REPO / "run").read_text(), re.M)
            return None if rest[:1] and rest[0] in labels else f"./run has no subcommand {rest[:1]}"
        if head.endswith("python") and rest[:2] == ["-m", "pytest"]:
            for t in rest[2:]:
                if not t.startswith("-") and not (REPO / t.split("::")[0]).exists():
                    return f"no such test path {t}"
            for var in re.findall(r"\b(SWARMTRAIN_[A-Z_]+)=", cmd):
                files = [REPO / t.split("::")[0] for t in rest[2:] if t.startswith("tests/")]
                if not any(var in f.read_text() for f in files):
                    return f"{var} is not read by {files}"
            return None
    except SystemExit as e:
        return f"argparse exit {e.code}"
    except ValueError as e:  # ConfigError included
        return str(e)
    return None  # not one of ours (pip, curl, tensorboard, ...)


def _expected_to_fail(block: Block, cmd: str) -> bool:
    """A console command whose documented output is an error (checked by test_console_transcripts)."""
    if block.lang != "console":
        return False
    after = block.text.split(f"$ {cmd}", 1)[-1].split("\n$ ", 1)[0]
    return "error:" in after


def test_every_command_parses(tmp_path, monkeypatch, capsys):
    errors, checked = [], 0
    for b in SHELL_BLOCKS:
        for cmd in commands(b):
            if _expected_to_fail(b, cmd) or cmd.startswith("python circle.py"):
                continue
            err = _parse_check(cmd, b.path, tmp_path, monkeypatch)
            checked += 1
            if err:
                errors.append(f"{b.id}: {cmd}\n    {err}")
    capsys.readouterr()
    assert checked > 40
    assert not errors, "documented commands the real parsers refuse:\n" + "\n".join(errors)


# ---------------------------------------------------------------- TOML examples
def test_toml_examples_load(tmp_path):
    from bootstrap.node import BootstrapConfig
    from peer import settings
    from peer.config import RunConfig

    blocks = [b for b in ALL_BLOCKS if b.lang == "toml"]
    assert len(blocks) >= 4
    for i, b in enumerate(blocks):
        f = tmp_path / f"{i}.toml"
        f.write_text(b.text)
        sectioned = any(re.match(r"^\s*\[", l) for l in b.text.splitlines())
        try:
            settings.load(RunConfig if sectioned else BootstrapConfig, path=f, environ={})
        except ValueError as e:
            pytest.fail(f"{b.id}: {e}")


def test_complete_config_file_lists_every_key_with_its_default():
    """running-a-peer.md's "complete config file" is every RunConfig key, at its default
    unless the line says "example"."""
    from peer import settings
    from peer.config import RunConfig

    block = toml_block(REPO / "docs" / "running-a-peer.md", "run.toml")
    assert block is not None
    documented = tomllib.loads(block)
    examples, section = set(), ""
    for line in block.splitlines():
        m = re.match(r"^\[([\w.]+)\]", line)
        if m:
            section = m.group(1)
        m = re.match(r"^(\w+)\s*=.*#\s*example\b", line)
        if m:
            examples.add(f"{section}.{m.group(1)}")

    def leaves(tree: dict, prefix: str = "") -> dict:  # {"sync.outer.lr": 0.7, ...}
        out = {}
        for k, v in tree.items():
            out.update(leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out

    defaults, have = leaves(settings.to_dict(RunConfig())), leaves(documented)
    assert set(have) == set(defaults), f"missing: {sorted(set(defaults) - set(have))}, unknown: {sorted(set(have) - set(defaults))}"
    wrong = [(k, have[k], defaults[k]) for k in sorted(set(defaults) - examples) if have[k] != defaults[k]]
    assert not wrong, f"documented defaults that are not the defaults: {wrong}"


# ---------------------------------------------------------------- running the blocks
RUN_IDS = itertools.count(1)  # a run id per documented peer, across the module

@dataclass
class Node:
    proc: subprocess.Popen
    log: Path
    addr: str
    url: str | None  # dashboard URL


@dataclass
class Scenario:
    """Runs a block's commands in a temporary directory, on 127.0.0.1 only."""

    block: Block
    tmp: Path
    shared: "Scenario | None" = None  # whose open bootstrap node to use when the block starts none
    nodes: list[Node] = field(default_factory=list)
    implicit: Node | None = None
    n: int = 0

    def __post_init__(self) -> None:
        (self.tmp / "home").mkdir()
        (self.tmp / "varlib").mkdir()
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HOME": str(self.tmp / "home"),
                    "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        # data files the documented commands name
        (self.tmp / "notes.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 400)
        (self.tmp / "corpus").mkdir()
        for i in range(3):
            (self.tmp / "corpus" / f"part{i}.txt").write_text(f"corpus file {i}: swarms train together\n" * 300)
        import numpy as np

        rng = np.random.default_rng(0)
        np.save(self.tmp / "tokens.npy", rng.integers(0, 50304, 20_000, dtype=np.uint16))
        rng.integers(0, 100277, 20_000, dtype=np.uint32).tofile(self.tmp / "tokens.bin")

    # -------------------------------------------------------- rewriting
    def needs_secret(self) -> str | None:
        m = re.search(r"--(?:swarm\.)?secret-file\s+(\S+)", " ".join(commands(self.block)))
        return self.rewrite_paths(m.group(1)) if m else None

    @staticmethod
    def rewrite_paths(text: str) -> str:
        return text.replace("/var/lib/swarmtrain/", "varlib/")

    def address_for(self, placeholder: str) -> str:
        if "B's" in placeholder and len(self.nodes) > 1:
            return self.nodes[1].addr
        if self.nodes:
            return self.nodes[0].addr
        return self.implicit_node().addr

    def rewrite(self, cmd: str) -> str:
        cmd = self.rewrite_paths(squash(cmd))
        cmd = MADDR.sub(lambda m: self.address_for(m.group(0)), cmd)
        cmd = re.sub(r"\bADDR\b", lambda m: self.address_for("ADDR"), cmd)
        cmd = re.sub(r"(--(?:swarm\.)?port)\s+(\d+)", lambda m: f"{m.group(1)} {free_port() if m.group(2) != '0' else 0}", cmd)
        cmd = re.sub(r"(--dashboard)\s+(\d+)", lambda m: f"{m.group(1)} {free_port()}", cmd)
        if "curl" in cmd:
            url = next((n.url for n in reversed(self.nodes) if n.url), None) or self.implicit_node().url
            cmd = re.sub(r"http://127\.0\.0\.1:\d+/", url, cmd)
        cmd = DOC_IPS.sub("127.0.0.1", cmd)
        for ip in ANY_IPV4.findall(cmd):
            assert ip in ("127.0.0.1", "0.0.0.0"), f"{self.block.id}: would reach {ip}: {cmd}"
        return cmd

    def write_config(self, name: str) -> None:
        body = toml_block(self.block.path, name)
        assert body is not None, f"{self.block.id}: --config {name}, but {self.block.path.name} has no '# {name}' TOML block"
        body = self.rewrite_paths(body)
        body = MADDR.sub(lambda m: self.address_for(m.group(0)), body)
        body = re.sub(r"(?m)^(port|dashboard)\s*=\s*\d+", lambda m: f"{m.group(1)} = {free_port()}", body)
        body = DOC_IPS.sub("127.0.0.1", body).replace('"0.0.0.0"', '"127.0.0.1"')
        for ip in ANY_IPV4.findall(body):
            assert ip == "127.0.0.1", f"{self.block.id}: {name} would reach {ip}"
        (self.tmp / name).write_text(body)

    @staticmethod
    def split(cmd: str) -> tuple[str, str]:
        """(command, redirections/pipes that follow it)."""
        m = re.search(r"\s(?=(?:\d?>|\|))", cmd)
        return (cmd[: m.start()], cmd[m.start():]) if m else (cmd, "")

    # -------------------------------------------------------- processes
    def bash(self, cmd: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", cmd], cwd=self.tmp, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def start_bootstrap(self, cmd: str) -> Node:
        self.n += 1
        maddrs, log = self.tmp / f"node{self.n}.maddrs", self.tmp / f"node{self.n}.log"
        if "--port" not in cmd and "--config" not in cmd:
            cmd += f" --port {free_port()}"
        cmd += f" --host 127.0.0.1 --monitor-every 2 --maddrs-file {maddrs.name}"
        with open(log, "wb") as out:
            p = subprocess.Popen(["bash", "-c", "exec " + cmd], cwd=self.tmp, env=self.env, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        conf = re.search(r"--config\s+(\S+)", cmd)
        conf = tomllib.loads((self.tmp / conf.group(1)).read_text()) if conf else {}
        dashboard = bool(re.search(r"--dashboard\s+\d", cmd)) or conf.get("dashboard", -1) >= 0
        ready = "Dashboard: http" if dashboard else "Join the run with:"
        deadline = time.monotonic() + 90
        while not (maddrs.exists() and ready in log.read_text(errors="replace")):
            if p.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.block.id}: bootstrap node did not start: {cmd}\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        text = log.read_text(errors="replace")
        addr = next(a for a in maddrs.read_text().split() if "/127.0.0.1/" in a)
        join = re.search(r"Join the run with:\n\s+(swarm-peer --join \S+.*)", text)
        assert join and addr.rsplit("/p2p/", 1)[1] in join.group(1), text
        m = re.search(r"--run-id\s+(\S+)", cmd)
        run_id = m.group(1) if m else conf.get("run_id", "swarmtrain-demo")
        if run_id != "swarmtrain-demo":
            assert f"--swarm.run-id {run_id}" in join.group(1), join.group(1)
        url = re.search(r"Dashboard: (http://\S+/)", text).group(1) if dashboard else None
        node = Node(p, log, addr, url)
        self.nodes.append(node)
        return node

    def implicit_node(self) -> Node:
        if self.shared is not None and not self.needs_secret():
            return self.shared.implicit_node()
        if self.implicit is None:
            secret = self.needs_secret()
            cmd = f"swarm-bootstrap --identity implicit.key --dashboard {free_port()}"
            if secret:
                assert (self.tmp / secret).exists(), f"{self.block.id}: {secret} is used before it is created"
                cmd += f" --secret-file {secret}"
            self.implicit = self.start_bootstrap(cmd)
            self.nodes.remove(self.implicit)  # not one of the block's own nodes
        return self.implicit

    def stop(self) -> None:
        for node in [*self.nodes, *([self.implicit] if self.implicit else [])]:
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in [*self.nodes, *([self.implicit] if self.implicit else [])]:
            try:
                rc = node.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(node.proc.pid, signal.SIGKILL)
                raise AssertionError(f"{self.block.id}: a bootstrap node did not stop on SIGTERM")
            assert rc == 0 and "bootstrap node stopped" in node.log.read_text(), node.log.read_text()[-2000:]

    def kill_all(self) -> None:
        for node in [*self.nodes, *([self.implicit] if self.implicit else [])]:
            if node.proc.poll() is None:
                os.killpg(node.proc.pid, signal.SIGKILL)

    # -------------------------------------------------------- one command
    def run(self, raw: str, expected_output: str | None) -> None:
        argv = shlex.split(self.split(raw)[0])
        head = argv[0]
        m = re.search(r"--config\s+(\S+\.toml)", raw)
        if m and not (self.tmp / m.group(1)).exists() and "--print-config" not in raw:
            self.write_config(Path(m.group(1)).name)
        if head == "swarm-bootstrap" and argv[1:2] == ["keygen"]:
            p = self.bash(self.rewrite(raw), 60)
            assert p.returncode == 0, p.stderr
            if expected_output:
                assert p.stdout.strip() == self.rewrite_paths(expected_output), (p.stdout, expected_output)
            return
        if head == "swarm-bootstrap":
            self.start_bootstrap(self.rewrite(raw))
            return
        if head == "swarm-peer" and argv[1:2] == ["status"]:
            cmd, tail = self.split(self.rewrite(raw))
            p = self.bash(f"{cmd} --wait 1{tail}", 120)
            assert p.returncode == 0, f"{cmd}\n{p.stderr[-3000:]}"
            if "--json" in cmd:
                assert json.loads(p.stdout.strip().splitlines()[-1])["run_id"]
            else:
                assert p.stdout.startswith("run '"), p.stdout
            return
        if head == "swarm-peer" and "--print-config" in raw:
            cmd, tail = self.split(self.rewrite(raw))
            p = self.bash(cmd + tail, 60)
            assert p.returncode == 0, p.stderr
            out = self.tmp / tail.split(">")[-1].strip() if ">" in tail else None
            text = out.read_text() if out else p.stdout
            from peer import settings
            from peer.config import RunConfig

            (self.tmp / "printed.toml").write_text(text)
            settings.load(RunConfig, path=self.tmp / "printed.toml", environ={})
            return
        if head == "swarm-peer":
            self.run_peers([raw])
            return
        if head == "curl":
            p = self.bash(self.rewrite(raw), 60)
            saves = bool(re.search(r"\s-\w*O", raw))
            assert p.returncode == 0 and (p.stdout.strip() or saves), f"{raw}\n{p.stdout}\n{p.stderr}"
            if saves:
                assert (self.tmp / "swarmtrain-ledger.csv").read_text().startswith("rank,peer_id")
            return
        raise AssertionError(f"{self.block.id}: test_doc_block_runs does not know how to run: {raw}")

    def run_peers(self, raws: list[str]) -> None:
        """Run training peers (at the same time): each must join, train 3 steps, and leave with exit 0."""
        jobs = []
        for raw in raws:
            m = re.search(r"--config\s+(\S+\.toml)", raw)
            if m and not (self.tmp / m.group(1)).exists():
                self.write_config(Path(m.group(1)).name)
            cmd, tail = self.split(self.rewrite(raw))
            extra = (" --swarm.host 127.0.0.1 --train.threads 1 --data.max-bytes 300000 --train.eval-batches 1"
                     " --data.batch-size 4 --train.max-steps 3")
            if "--swarm.run-id" not in cmd:  # a run of its own: peers of other blocks may train other models
                extra += f" --swarm.run-id docs-{os.getpid()}-{next(RUN_IDS)}"
            jobs.append((cmd + extra + tail, tail))

        def one(job: tuple[str, str]) -> None:
            full, tail = job
            p = self.bash(full, 240)
            outputs = p.stdout + p.stderr
            for target in re.findall(r"\d?>\s*(\S+)", tail):
                outputs += (self.tmp / target).read_text(errors="replace")
            assert p.returncode == 0, f"{full}\nexit {p.returncode}\n{outputs[-3000:]}"
            assert "joined run" in outputs and "SUMMARY {" in outputs, outputs[-3000:]

        with ThreadPoolExecutor(max(1, len(jobs))) as pool:
            for f in [pool.submit(one, j) for j in jobs]:
                f.result()

    def run_block(self) -> None:
        lines = self.block.text.replace("\\\n", " ").splitlines()
        steps: list[tuple[str, str | None]] = []
        for i, line in enumerate(lines):
            s = re.sub(r"\s+#.*$", "", line.strip())
            if not s or s.startswith("#"):
                continue
            nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
            steps.append((s, nxt[1:].strip() if nxt.startswith("# wrote ") else None))
        # A secret file the block uses but does not create came from the run's organizer.
        text = " ".join(cmd for cmd, _ in steps)
        created = {self.rewrite_paths(m) for m in re.findall(r"keygen --out\s+(\S+)", text)}
        from averaging.access import generate_secret_file

        for name in {self.rewrite_paths(m) for m in re.findall(r"--(?:swarm\.)?secret-file\s+(\S+)", text)}:
            if name not in created:
                generate_secret_file(self.tmp / name)
        # Consecutive training peers run at the same time, unless they share an identity file.
        i = 0
        while i < len(steps):
            group = [steps[i][0]]
            while (self._is_trainer(group[0]) and i + len(group) < len(steps) and self._is_trainer(steps[i + len(group)][0])
                   and not self._identities(steps[i + len(group)][0]) & set().union(*map(self._identities, group))):
                group.append(steps[i + len(group)][0])
            if len(group) > 1:
                self.run_peers(group)
            else:
                self.run(*steps[i])
            i += len(group)

    @staticmethod
    def _is_trainer(cmd: str) -> bool:
        return cmd.startswith("swarm-peer ") and not cmd.startswith("swarm-peer status") and "--print-config" not in cmd

    @staticmethod
    def _identities(cmd: str) -> set[str]:
        return set(re.findall(r"--swarm\.identity-path\s+(\S+)", cmd))


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory):
    """One open bootstrap node (with a dashboard) for the blocks that do not start their own."""
    sc = Scenario(ALL_BLOCKS[0], tmp_path_factory.mktemp("shared-bootstrap"))
    try:
        yield sc
        sc.stop()
    finally:
        sc.kill_all()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("block", marked_for("test_doc_block_runs"), ids=ids(marked_for("test_doc_block_runs")))
def test_doc_block_runs(block, tmp_path, shared_node):
    sc = Scenario(block, tmp_path, shared=shared_node)
    try:
        sc.run_block()
        sc.stop()
    finally:
        sc.kill_all()


# ---------------------------------------------------------------- console transcripts
def _line_pattern(expected: str) -> re.Pattern:
    parts = re.split(r"(…|<[^>]+>)", expected)
    return re.compile("".join(".*?" if p == "…" else ".+?" if p.startswith("<") and p.endswith(">") else re.escape(p)
                              for p in parts))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("block", marked_for("test_console_transcripts"), ids=ids(marked_for("test_console_transcripts")))
def test_console_transcripts(block, tmp_path):
    """Run each `$ command` of the block and match the documented output (… = anything)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HOME": str(tmp_path)}
    others = [t for t in block.tests if not t.endswith("::test_console_transcripts")]
    chunks = re.split(r"(?m)^\$ ", block.text)[1:]
    ran = 0
    for chunk in chunks:
        cmd_line, *expected = chunk.splitlines()
        cmd, _, comment = cmd_line.partition("  #")
        if "ADDR" in cmd:  # needs a live swarm with another model: the other named tests cover it
            assert others, f"{block.id}: `{cmd}` needs a swarm, but the marker names no other test"
            continue
        m = re.search(r"contains:\s*(.*)$", comment)
        if m:
            name = re.search(r"--config\s+(\S+)", cmd).group(1)
            (tmp_path / name).write_text(re.sub(r"\]\s*", "]\n", m.group(1)) + "\n")
        for ip in ANY_IPV4.findall(cmd):  # documentation IPs only where the config is refused before anything starts
            assert ip == "127.0.0.1" or (DOC_IPS.match(ip) and any(re.search(r"error: (invalid config|unrecognized)", l)
                                                                   for l in expected)), f"{block.id}: would reach {ip}"
        p = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        got = [l for l in (p.stdout + p.stderr).splitlines() if l.strip()]
        for want in (l for l in expected if l.strip()):
            pat = _line_pattern(want)
            assert any(pat.fullmatch(g) for g in got), f"{block.id}: `{cmd}`\nexpected: {want}\ngot:\n" + "\n".join(got)
        if any("error:" in l for l in expected):
            assert p.returncode != 0, f"{block.id}: `{cmd}` exited 0"
        ran += 1
    assert ran, f"{block.id}: no command was run"


# ---------------------------------------------------------------- ./run demo, ./run test
def test_run_test():
    """`./run test [args]` is `pytest -q [args]` after setup (the whole suite, without
    arguments, on 2 pytest-xdist workers); run the documented example."""
    script = (REPO / "run").read_text()
    assert re.search(r'test\) setup; shift\n\s+if \[ \$# -eq 0 \]; then set -- -n "\$\{SWARMTRAIN_TEST_WORKERS:-2\}" '
                     r'--dist loadfile; fi\n\s+exec "\$VENV/bin/python" -m pytest -q "\$@"', script), script
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_outer.py", "-v"],
                       cwd=REPO, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0 and " passed" in p.stdout, p.stdout[-3000:]


@pytest.mark.timeout(400)
def test_run_demo(tmp_path):
    """`./run demo` is `python -m bootstrap.demo` after setup; run it, smaller than the default."""
    assert re.search(r'demo\) python_env; shift; exec "\$VENV/bin/python" -m bootstrap.demo "\$@"', (REPO / "run").read_text())
    p = subprocess.run([sys.executable, "-m", "bootstrap.demo", "--peers", "2", "--rounds", "2", "--every-steps", "10",
                        "--workdir", str(tmp_path / "demo")], cwd=REPO, capture_output=True, text=True, timeout=360,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    for want in ("demo: bootstrap node at /ip4/127.0.0.1/", "[bootstrap] Dashboard: http://127.0.0.1:",
                 "=== swarmtrain demo summary ===", "sync rounds completed: 2", "parameters agree across peers: yes",
                 "contribution ledger (credit = samples x training FLOPs per sample):"):
        assert want in out, f"missing {want!r}:\n{out[-4000:]}"


# ---------------------------------------------------------------- quickstart: a swarm by hand
@pytest.mark.timeout(400)
def test_quickstart_swarm_by_hand(tmp_path):
    [block] = marked_for("test_quickstart_swarm_by_hand")
    boot_cmd, peer_cmd, status_cmd = commands(block)
    sc = Scenario(block, tmp_path)
    peers = []
    try:
        node = sc.start_bootstrap(sc.rewrite(boot_cmd))
        assert node.url and urllib.request.urlopen(node.url + "api/status", timeout=10).status == 200
        # 40 steps per round: the 4 rounds left after round 1 take ~30 s on an idle machine, and
        # longer on a loaded one (the steps slow down with it), so "terminal 4" (a fresh DHT
        # client: several seconds to start) still finds them training. With 10 steps the peers
        # could finish before it looked.
        fast = " --sync.every-steps 40 --train.threads 1 --data.max-bytes 2000000 --train.eval-batches 2 --log-format text"
        for i in range(2):  # "terminals 2 and 3: the same command twice"
            log = open(tmp_path / f"peer{i}.log", "wb")
            peers.append(subprocess.Popen(["bash", "-c", "exec " + sc.rewrite(peer_cmd) + fast +
                                           f" --train.summary-file peer{i}.json"], cwd=tmp_path, env=sc.env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + 180
        while not all("round 1 complete" in (tmp_path / f"peer{i}.log").read_text() for i in range(2)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in peers), \
                (tmp_path / "peer0.log").read_text()[-2000:] + (tmp_path / "peer1.log").read_text()[-2000:]
            time.sleep(0.5)
        st = sc.bash(sc.rewrite(status_cmd), 90)  # "terminal 4", while the peers train
        assert st.returncode == 0 and re.search(r"run 'swarmtrain-demo': [12] live peer", st.stdout), st.stdout + st.stderr
        for i, p in enumerate(peers):
            assert p.wait(timeout=240) == 0, (tmp_path / f"peer{i}.log").read_text()[-3000:]
        sums = [json.loads((tmp_path / f"peer{i}.json").read_text()) for i in range(2)]
        assert [s["rounds"] for s in sums] == [5, 5] and sums[0]["digest"] == sums[1]["digest"], sums
        sc.stop()
    finally:
        for p in peers:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        sc.kill_all()


# ---------------------------------------------------------------- the Python API
def _python_blocks(doc: str) -> list[str]:
    return [b.text for b in ALL_BLOCKS if b.path == REPO / doc and b.lang == "python"]


@pytest.mark.timeout(400)
def test_python_api_example(tmp_path):
    """docs/python-api.md's complete example, as the page says to test it on one machine:
    its bootstrap command, host="127.0.0.1" added to SwarmConfig, two peers."""
    [block] = marked_for("test_python_api_example")
    [run_cmd] = commands(block)
    doc = (REPO / "docs" / "python-api.md").read_text()
    boot_cmd = re.search(r"`(swarm-bootstrap --identity boot\.key --host 127\.0\.0\.1 --port \d+ --run-id circle)`", doc).group(1)
    script = next(t for t in _python_blocks("docs/python-api.md") if "class Classifier" in t)
    assert 'add `host="127.0.0.1"` to `SwarmConfig`' in doc.replace("\n", " ")
    old = 'SwarmConfig(run_id="circle", initial_peers=sys.argv[1:])'
    assert old in script
    (tmp_path / "circle.py").write_text(script.replace(old, old[:-1] + ', host="127.0.0.1")'))
    sc = Scenario(block, tmp_path)
    procs = []
    try:
        sc.start_bootstrap(sc.rewrite(boot_cmd))
        cmd = sc.rewrite(run_cmd).replace("python ", f"{sys.executable} ", 1)
        for i in range(2):
            log = open(tmp_path / f"circle{i}.log", "wb")
            procs.append(subprocess.Popen(["bash", "-c", "exec " + cmd], cwd=tmp_path, env=sc.env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        outs = []
        for i, p in enumerate(procs):
            rc = p.wait(timeout=300)
            outs.append((tmp_path / f"circle{i}.log").read_text())
            assert rc == 0, outs[-1][-3000:]
        printed = []
        for out in outs:
            rounds = re.findall(r"^round (\d+): (\d) peers, [\d.]+s, val accuracy ([\d.]+), digest (\w+)", out, re.M)
            assert rounds and int(rounds[-1][0]) >= 15, out[-3000:]  # 20, unless it caught up by downloading
            assert float(rounds[-1][2]) > 0.9, rounds[-1]  # the classifier learned the circle
            printed.append({int(r): d for r, _, _, d in rounds})
        common = set(printed[0]) & set(printed[1])
        assert common and all(printed[0][r] == printed[1][r] for r in common), printed
        sc.stop()
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        sc.kill_all()


@pytest.mark.timeout(200)
def test_readme_api_example(tmp_path):
    """The README's Python example runs as written, with its address and data filled in."""
    [code] = _python_blocks("README.md")
    sc = Scenario(ALL_BLOCKS[0], tmp_path)
    try:
        node = sc.implicit_node()
        placeholder = MADDR.search(code).group(0)
        code = code.replace(f'SwarmConfig(initial_peers=["{placeholder}"])',
                            f'SwarmConfig(initial_peers=["{node.addr}"], host="127.0.0.1")')
        assert node.addr in code

        def my_batches():
            g = __import__("torch").Generator().manual_seed(0)
            for _ in range(60):
                x = __import__("torch").randn(16, 8, generator=g)
                yield x, x.sum(1, keepdim=True)

        ns = {"my_batches": my_batches}
        exec(compile(code, "README.md", "exec"), ns)
        peer = ns["peer"]
        assert peer.local_step == 60 and peer.total_samples == 960
        assert peer.history and all(not r.ok for r in peer.history)  # alone: it trained and tried to sync
        sc.stop()
    finally:
        sc.kill_all()


def test_python_api_snippets(tmp_path, monkeypatch):
    """The configuration snippets and the exception tree of docs/python-api.md are real."""
    import averaging
    from peer import settings

    blocks = _python_blocks("docs/python-api.md")
    ns = {"ADDR": "/ip4/127.0.0.1/tcp/31337/p2p/QmWH2338V6q5FLN3NsMADqYNozuKPRhJvZSiHCtxj3NZkt"}
    cfg_code = next(b for b in blocks if b.startswith("from peer import CheckpointConfig"))
    exec(cfg_code, ns)
    assert ns["cfg"].sync.every_steps == 100 and ns["cfg"].checkpoint.dir == "ckpt"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "peer.toml").write_text('[sync]\nevery_steps = 100\n[swarm]\nrun_id = "circle"\n')
    exec(next(b for b in blocks if "settings.load(PeerConfig" in b), ns)
    assert ns["cfg"].swarm.run_id == "circle"
    import logging
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = []  # basicConfig only acts on a root logger without handlers
    try:
        exec(next(b for b in blocks if "logging.basicConfig" in b), ns)  # "Seeing the logs"
        assert root.level == logging.INFO and root.handlers
    finally:
        root.handlers, _ = saved
        root.setLevel(saved[1])
    from peer import SyncConfig

    doc = (REPO / "docs" / "python-api.md").read_text()
    with pytest.raises(ValueError) as e:
        SyncConfig(every_steps=0, every_seconds=0)
    assert f"`ValueError: {e.value.errors()[0]['ctx']['error']}`" in doc
    assert issubclass(settings.ConfigError, ValueError)
    # the exception tree, as drawn
    tree = next(b.text for b in ALL_BLOCKS if b.path.name == "python-api.md" and b.text.startswith("SwarmError"))
    stack: list[tuple[int, type]] = []
    for line in tree.splitlines():
        m = re.match(r"^([│ ├└─]*)(\w+)", line)
        depth, cls = len(m.group(1)), getattr(averaging, m.group(2))
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if stack:
            assert issubclass(cls, stack[-1][1]), (cls, stack[-1][1])
        stack.append((depth, cls))


# ---------------------------------------------------------------- documented pytest commands
@pytest.mark.timeout(300)
@pytest.mark.parametrize("block", marked_for("test_pytest_commands_collect"), ids=ids(marked_for("test_pytest_commands_collect")))
def test_pytest_commands_collect(block):
    """Documented `pytest` commands collect their tests (the suite runs the tests themselves)."""
    for cmd in commands(block):
        cmd = cmd.replace(".venv/bin/python", sys.executable)
        p = subprocess.run(["bash", "-c", cmd + " --collect-only -q -p no:cacheprovider"], cwd=REPO,
                           capture_output=True, text=True, timeout=240)
        assert p.returncode == 0 and re.search(r"\d+ tests? collected", p.stdout), p.stdout[-2000:] + p.stderr[-2000:]


# ---------------------------------------------------------------- links between the docs
def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*]", "", heading).strip().lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out, fenced = set(), False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
        m = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if m and not fenced:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_doc_links_resolve():
    """Every relative link in README.md and docs/ points to an existing file (and heading)."""
    bad = []
    for doc in DOCS:
        text = re.sub(r"(?ms)^\s*(```|~~~).*?^\s*\1", "", doc.read_text())
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.exists():
                bad.append(f"{doc.relative_to(REPO)}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                bad.append(f"{doc.relative_to(REPO)}: {target} (no such heading)")
    assert not bad, "broken links:\n  " + "\n  ".join(bad)
