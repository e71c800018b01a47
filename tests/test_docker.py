"""docker/: the Dockerfile, compose.yaml, the healthcheck and the peer entrypoint.

No Docker engine runs on the project's machines, so the images are never built here (the
opt-in podman test at the end builds one where podman and a registry are available). What is
checked instead, without network or docker:

* compose.yaml: services, build targets, images, volumes, ports, healthchecks, and that each
  service's command line, with compose's ${VAR:-default} interpolation applied (defaults,
  and the values of other environments), PARSES with the real swarm-peer / swarm-bootstrap
  parsers, to the values the rest of the file relies on (join file, ports, volume paths);
* docker/.env.example lists exactly the variables compose.yaml uses, with the same defaults;
* the Dockerfile: stages and targets, torch pinned to ./run's version and installed before
  the project, the CPU index, non-root user, HEALTHCHECK, ENTRYPOINT/CMD (whose flags parse);
* docker/healthcheck.py against a fake /proc and a loopback stub dashboard, and that the
  flags it reads from a command line resolve as the real parsers resolve them;
* docker/peer_entrypoint.py: join-file parsing and waiting, slot locks, and its added
  flags parse with the real parser.
"""
from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path
from unittest import mock

import pytest
import yaml

from bootstrap import cli as bootstrap_cli
from bootstrap.node import BootstrapConfig
from peer import cli as peer_cli
from peer.config import SwarmConfig
from peer.configlib import ConfigError

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
PEER_ID = "QmWH2338V6q5FLN3NsMADqYNozuKPRhJvZSiHCtxj3NZkt"
TARGETS = ("peer-cpu", "bootstrap-cpu", "peer-cuda", "bootstrap-cuda")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"docker_{name}", DOCKER / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


hc = _load("healthcheck")
entry = _load("peer_entrypoint")


# --------------------------------------------------------------------------- helpers


class _Captured(Exception):
    pass


def real_flags(parse) -> set[str]:
    """Every option string of the parser that `parse` (peer_cli.parse / bootstrap_cli.parse) builds."""
    seen = {}

    def capture(self, args=None, namespace=None):
        seen["parser"] = self
        raise _Captured

    with mock.patch.object(peer_cli.OneLineParser, "parse_args", capture), pytest.raises(_Captured):
        parse([])
    return set(seen["parser"]._option_string_actions)


PEER_FLAGS = real_flags(peer_cli.parse)
BOOTSTRAP_FLAGS = real_flags(bootstrap_cli.parse)

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        val = env.get(name)
        if op in (":-", ":?") and not val or op in ("-", "?") and val is None:
            if op.endswith("?"):
                raise AssertionError(f"${{{name}}} is required: {arg}")
            return arg
        return val or ""

    return _VAR.sub(sub, value)


def compose_vars(text: str) -> dict[str, str | None]:
    """Every variable compose.yaml uses -> its default (None: no default)."""
    out: dict[str, str | None] = {}
    for m in _VAR.finditer(text):
        if m.group(0) == "$$":
            continue
        name = m.group(1) or m.group(4)
        default = m.group(3) if m.group(2) in (":-", "-") else None
        assert out.get(name, default) == default, f"${name} has two different defaults in compose.yaml"
        out[name] = default
    return out


def env_example() -> dict[str, str]:
    out = {}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, val = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"bad .env line: {line!r}"
            # compose's .env parser: an inline comment on an empty value would become the value
            assert "#" not in val, f"keep comments on their own lines in .env.example: {line!r}"
            out[key] = val
    return out


COMPOSE_TEXT = (DOCKER / "compose.yaml").read_text()
COMPOSE_RAW = yaml.safe_load(COMPOSE_TEXT)


def compose(env: dict[str, str] | None = None) -> dict:
    return interpolate(COMPOSE_RAW, env or {})


def parse_peer(argv: list[str]):
    return peer_cli.parse(argv)


def peer_argv(env: dict[str, str] | None = None, *, slot: str = "/data/peers/slot-0") -> tuple[list[str], dict]:
    """The swarm-peer command line a compose peer container runs: entrypoint additions + command."""
    c = compose(env)["services"]["peer"]
    penv = {k: str(v) for k, v in c["environment"].items()}
    join = [f"/ip4/172.18.0.2/tcp/31337/p2p/{PEER_ID}"]
    argv = entry.build_argv(c["command"], penv, join_addrs=join, slot_dir=slot, route=lambda maddr: "172.18.0.5")
    assert argv[0] == "swarm-peer"
    return argv[1:], penv


def flag_names(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


# --------------------------------------------------------------------------- Dockerfile parsing


def dockerfile() -> tuple[dict[str, str], dict[str, dict]]:
    """(global ARG defaults, stages by name in order): each stage {'base', 'ins': [(INSTR, args)]}."""
    lines, buf = [], ""
    for raw in (DOCKER / "Dockerfile").read_text().splitlines():
        s = raw.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and s.startswith("#"):
            continue  # a comment inside a continued instruction
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        lines.append(buf + s)
        buf = ""
    assert not buf, "the Dockerfile ends inside a continued line"
    args: dict[str, str] = {}
    stages: dict[str, dict] = {}
    cur = None
    for line in lines:
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest.strip(), re.I)
            assert m, f"every stage needs a name: FROM {rest}"
            assert m.group(2) not in stages, f"two stages named {m.group(2)}"
            cur = stages[m.group(2)] = {"base": m.group(1), "ins": []}
        elif cur is None:
            assert instr == "ARG", f"only ARG may come before the first FROM, not {instr}"
            k, _, v = rest.strip().partition("=")
            args[k] = v
        else:
            cur["ins"].append((instr, rest.strip()))
    return args, stages


ARGS, STAGES = dockerfile()


def chain(target: str) -> list[dict]:
    """The stage and the stages it is built FROM, nearest first."""
    out = []
    while target in STAGES:
        out.append(STAGES[target])
        target = STAGES[target]["base"]
    return out


def last(target: str, instr: str) -> str | None:
    for stage in chain(target):
        for i, a in reversed(stage["ins"]):
            if i == instr:
                return a
    return None


def exec_form(args: str) -> list[str]:
    v = json.loads(args)
    assert isinstance(v, list) and all(isinstance(x, str) for x in v), f"not exec form: {args}"
    return v


def runs(stage: str) -> list[str]:
    return [a for i, a in STAGES[stage]["ins"] if i == "RUN"]


def run_pin() -> str:
    m = re.search(r'pip install -q "torch==([0-9][^"]*)"', (REPO / "run").read_text())
    assert m, "./run no longer pins torch the way this test expects"
    return m.group(1)


# =========================================================================== compose.yaml


def test_compose_services_images_and_build_targets():
    assert set(COMPOSE_RAW["services"]) == {"bootstrap", "peer"}
    for variant in ("cpu", "cuda"):
        c = compose({"VARIANT": variant})["services"]
        for name in ("bootstrap", "peer"):
            build = c[name]["build"]
            assert (DOCKER / build["context"]).resolve() == REPO
            assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"
            assert build["target"] == f"{name}-{variant}" and build["target"] in STAGES
            assert c[name]["image"] == f"swarmtrain-{name}:{variant}"
    assert compose()["services"]["peer"]["build"]["target"] == "peer-cpu"  # the default variant


def test_compose_bootstrap_command_parses_with_the_real_parser():
    c = compose()["services"]
    cfg = bootstrap_cli.parse(c["bootstrap"]["command"])
    assert isinstance(cfg, BootstrapConfig)
    assert cfg.host == "0.0.0.0" and cfg.port == 31337 and cfg.announce_host == ""
    assert cfg.dashboard == 8080 and cfg.dashboard_host == "0.0.0.0"
    assert cfg.identity.startswith("/data/") and cfg.ledger.startswith("/data/")
    assert cfg.run_id == "swarmtrain-demo" and cfg.secret_file == ""
    # the peers wait for exactly the file the bootstrap writes
    assert cfg.maddrs_file == c["peer"]["environment"]["SWARM_JOIN_FILE"]
    # with other values
    env = {"BOOTSTRAP_PORT": "4001", "RUN_ID": "my-run", "BOOTSTRAP_ANNOUNCE_HOST": "203.0.113.5",
           "BOOTSTRAP_MONITOR_EVERY": "0", "BOOTSTRAP_POLL_EVERY": "1.5", "SECRET_FILE": "/run/secrets/run.secret"}
    cfg = bootstrap_cli.parse(compose(env)["services"]["bootstrap"]["command"])
    assert (cfg.port, cfg.run_id, cfg.announce_host, cfg.monitor_every, cfg.poll_every, cfg.secret_file) == (
        4001, "my-run", "203.0.113.5", 0.0, 1.5, "/run/secrets/run.secret")


def test_compose_peer_command_parses_with_the_real_parser():
    argv, penv = peer_argv()
    cfg = parse_peer(argv)
    assert cfg.swarm.host == "0.0.0.0" and cfg.swarm.port == 31338
    assert cfg.swarm.initial_peers == [f"/ip4/172.18.0.2/tcp/31337/p2p/{PEER_ID}"]
    assert cfg.swarm.announce_host == "172.18.0.5" and penv["SWARM_ANNOUNCE_HOST"] == "auto"
    assert cfg.swarm.identity_path == "/data/peers/slot-0/identity.key"
    assert cfg.checkpoint.dir == "/data/peers/slot-0/checkpoints" and cfg.checkpoint.resume
    assert cfg.train.summary_file == "/data/peers/slot-0/summary.json"
    assert penv["SWARM_SLOTS_DIR"] == "/data/peers"
    assert (cfg.sync.every_steps, cfg.sync.every_seconds) == (0, 10.0) and cfg.sync.compression == "fp32" and cfg.train.threads == 1
    assert cfg.log.format == "text" and cfg.swarm.secret_file == ""
    # the run id is the bootstrap's
    assert cfg.swarm.run_id == bootstrap_cli.parse(compose()["services"]["bootstrap"]["command"]).run_id

    env = {"SYNC_EVERY_STEPS": "7", "SYNC_EVERY_SECONDS": "30", "SYNC_COMPRESSION": "int8", "SYNC_MIN_GROUP_SIZE": "3",
           "SYNC_MAX_GROUP_SIZE": "8", "SYNC_MATCHMAKING_WINDOW": "5", "TRAIN_DEVICE": "cuda:1", "TRAIN_THREADS": "4",
           "TRAIN_SEED": "9", "TRAIN_MAX_ROUNDS": "20", "TRAIN_MAX_STEPS": "1000", "CHECKPOINT_EVERY_ROUNDS": "2",
           "CHECKPOINT_KEEP_LAST": "5", "LOG_FORMAT": "json", "LOG_EVERY_STEPS": "25", "PEER_PORT": "4002",
           "RUN_ID": "my-run", "PEER_ANNOUNCE_HOST": "198.51.100.7", "PEER_JOIN_TIMEOUT": "60"}
    argv, penv = peer_argv(env)
    cfg = parse_peer(argv)
    assert (cfg.sync.every_steps, cfg.sync.every_seconds, cfg.sync.compression, cfg.sync.min_group_size,
            cfg.sync.max_group_size, cfg.sync.matchmaking_window) == (7, 30.0, "int8", 3, 8, 5.0)
    assert (cfg.train.device, cfg.train.threads, cfg.train.seed, cfg.train.max_rounds, cfg.train.max_steps) == (
        "cuda:1", 4, 9, 20, 1000)
    assert (cfg.checkpoint.every_rounds, cfg.checkpoint.keep_last, cfg.log.format, cfg.log.every_steps) == (2, 5, "json", 25)
    assert (cfg.swarm.port, cfg.swarm.run_id, cfg.swarm.announce_host) == (4002, "my-run", "198.51.100.7")
    assert penv["SWARM_JOIN_TIMEOUT"] == "60"


def test_compose_command_flags_exist_in_the_clis():
    c = compose()["services"]
    unknown = [f for f in flag_names(c["bootstrap"]["command"]) if f not in BOOTSTRAP_FLAGS]
    unknown += [f for f in flag_names(c["peer"]["command"]) if f not in PEER_FLAGS]
    unknown += [f for f in entry.ADDED_FLAGS if f not in PEER_FLAGS]
    assert not unknown, f"flags that swarm-peer / swarm-bootstrap do not have: {unknown}"


@pytest.mark.parametrize("service,bad", [("peer", "--sync.every-stepz=50"), ("bootstrap", "--maddr-file=/x"),
                                         ("peer", "--swarm.port=notaport"), ("peer", "--sync.compression=fp8")])
def test_a_wrong_flag_in_compose_would_fail_these_tests(service, bad, capsys):
    """The parse tests above have teeth: one typo'd or invalid flag makes the real parser refuse."""
    cmd = compose()["services"][service]["command"] + [bad]
    if service == "peer":
        cmd = entry.build_argv(cmd, {}, join_addrs=[f"/ip4/172.18.0.2/tcp/31337/p2p/{PEER_ID}"],
                               slot_dir="/data/peers/slot-0")[1:]
    parse = parse_peer if service == "peer" else bootstrap_cli.parse
    with pytest.raises((SystemExit, ConfigError, ValueError)):
        parse(cmd)
    parse([a for a in cmd if a != bad])  # and without it, the same command line parses


def test_compose_env_vars_match_env_example():
    used = compose_vars(json.dumps(COMPOSE_RAW))  # the values only, not the comments
    example = env_example()
    assert set(used) == set(example), (
        f"only in compose.yaml: {sorted(set(used) - set(example))}; only in .env.example: {sorted(set(example) - set(used))}")
    wrong = {k: (used[k], example[k]) for k in used if (used[k] or "") != example[k]}
    assert not wrong, f"defaults differ (compose.yaml, .env.example): {wrong}"
    # and the documented defaults are what the commands were parsed with above
    assert compose(example) == compose({})


def test_compose_volumes():
    c = compose()
    assert set(c["volumes"]) == {"bootstrap-data", "peer-data", "join-info"}
    b = {v.split(":")[0]: v.split(":")[1:] for v in c["services"]["bootstrap"]["volumes"]}
    p = {v.split(":")[0]: v.split(":")[1:] for v in c["services"]["peer"]["volumes"]}
    assert b == {"bootstrap-data": ["/data"], "join-info": ["/shared"]}
    assert p == {"peer-data": ["/data"], "join-info": ["/shared", "ro"]}  # the peers never see the bootstrap's key
    bcfg = bootstrap_cli.parse(c["services"]["bootstrap"]["command"])
    for path in (bcfg.identity, bcfg.ledger):
        assert path.startswith("/data/")  # on the bootstrap-data volume
    assert bcfg.maddrs_file.startswith("/shared/")  # on join-info, which the peers mount
    cfg = parse_peer(peer_argv()[0])
    for path in (cfg.swarm.identity_path, cfg.checkpoint.dir, cfg.train.summary_file):
        assert path.startswith("/data/")  # on peer-data


def test_compose_ports():
    c = compose()["services"]
    bcfg = bootstrap_cli.parse(c["bootstrap"]["command"])
    published = [p.rsplit(":", 2) if p.count(":") == 2 else [None, *p.split(":")] for p in c["bootstrap"]["ports"]]
    assert [None, str(bcfg.port), str(bcfg.port)] in published  # the DHT, same number inside and out
    assert ["127.0.0.1", "8080", str(bcfg.dashboard)] in published  # dashboard: this host only, by default
    assert len(published) == 2
    env = {"BOOTSTRAP_PORT": "4001", "DASHBOARD_PORT": "9000", "DASHBOARD_BIND": "0.0.0.0"}
    c2 = compose(env)["services"]["bootstrap"]
    assert c2["ports"] == ["4001:4001", "0.0.0.0:9000:8080"]
    assert bootstrap_cli.parse(c2["command"]).port == 4001
    assert "ports" not in c["peer"]  # replicas of one service cannot publish the same host port


def test_compose_healthchecks_and_startup_order():
    c = compose()["services"]
    for name in ("bootstrap", "peer"):
        h = c[name]["healthcheck"]
        assert h["test"][0] == "CMD" and h["test"][1:] == ["python", "/opt/swarmtrain/healthcheck.py"]
        for key in ("interval", "timeout", "start_period"):
            assert re.fullmatch(r"\d+s", h[key])
        assert h["retries"] >= 1
    assert c["peer"]["depends_on"] == {"bootstrap": {"condition": "service_healthy"}}
    assert c["peer"]["restart"] == "on-failure"  # a peer that reached --train.max-rounds stays down


# =========================================================================== Dockerfile


def test_dockerfile_stages_and_bases():
    assert set(TARGETS) <= set(STAGES)
    assert {"build-cpu", "runtime-cpu", "build-cuda", "runtime-cuda"} <= set(STAGES)
    assert STAGES["build-cpu"]["base"] == STAGES["runtime-cpu"]["base"] == "python:3.11-slim"
    assert STAGES["build-cuda"]["base"] == STAGES["runtime-cuda"]["base"] == "${CUDA_IMAGE}"
    cuda = ARGS["CUDA_IMAGE"]
    assert cuda.startswith("nvidia/cuda:") and "runtime" in cuda
    for v in ("cpu", "cuda"):
        assert STAGES[f"peer-{v}"]["base"] == STAGES[f"bootstrap-{v}"]["base"] == f"runtime-{v}"
        # the slim runtime gets the venv from its own builder
        copies = [a for i, a in STAGES[f"runtime-{v}"]["ins"] if i == "COPY" and a.startswith("--from=")]
        assert f"--from=build-{v} /opt/venv /opt/venv" in copies
        assert not any("pip install" in r for r in runs(f"runtime-{v}"))  # nothing is built in the runtime


def test_dockerfile_installs_torch_first_pinned_like_run():
    pin = run_pin()
    for v in ("cpu", "cuda"):
        cmds = runs(f"build-{v}")
        torch_at = [i for i, r in enumerate(cmds) if re.search(r"\btorch==", r)]
        project_at = [i for i, r in enumerate(cmds) if re.search(r"pip install (\S+ )*\"?\.(\[hf\]\")?(\s|$)", r)]
        assert torch_at and project_at, f"build-{v}: no torch install or no `pip install .`"
        assert torch_at[0] < project_at[0], f"build-{v}: torch must be installed before the project"
        pins = re.findall(r"\btorch==([0-9][^\"'\s]*)", " ".join(cmds))
        assert pins and set(pins) == {pin}, f"build-{v}: torch pinned to {pins}, ./run to {pin}"
        # the project's COPYs come after torch's layer (a code change does not re-download torch)
        ins = STAGES[f"build-{v}"]["ins"]
        first_copy = next(k for k, (i, a) in enumerate(ins) if i == "COPY")
        torch_run = next(k for k, (i, a) in enumerate(ins) if i == "RUN" and "torch==" in a)
        assert torch_run < first_copy
    cpu_torch = next(r for r in runs("build-cpu") if "torch==" in r)
    assert '--index-url "$TORCH_CPU_INDEX"' in cpu_torch
    assert ("ARG", "TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu") in STAGES["build-cpu"]["ins"]
    assert "assert not torch.version.cuda" in cpu_torch  # the build fails on a CUDA wheel


def test_dockerfile_non_root_healthcheck_entrypoints():
    pyproject = (REPO / "pyproject.toml").read_text()
    for script in ("swarm-peer", "swarm-bootstrap"):
        assert f'{script} = "' in pyproject
    for target in TARGETS:
        user = last(target, "USER")
        assert user is not None and user.split(":")[0] not in ("root", "0"), f"{target} runs as {user}"
        health = last(target, "HEALTHCHECK")
        assert health and "CMD" in health and "/opt/swarmtrain/healthcheck.py" in health, target
        assert last(target, "WORKDIR") == "/data"
        assert last(target, "VOLUME") == '["/data"]'
        ep = exec_form(last(target, "ENTRYPOINT"))
        if target.startswith("bootstrap"):
            assert ep == ["swarm-bootstrap"]
        else:
            assert ep == ["python", "/opt/swarmtrain/peer_entrypoint.py"]
            assert entry.build_argv([], {})[0] == "swarm-peer"  # which execs swarm-peer
    for v in ("cpu", "cuda"):
        run = " ".join(runs(f"runtime-{v}"))
        assert "useradd --uid 1000" in run and "chown swarm:swarm /data" in run
        assert last(f"runtime-{v}", "USER") == "swarm"
        copied = [a for i, a in STAGES[f"runtime-{v}"]["ins"] if i == "COPY" and not a.startswith("--from")]
        assert "docker/healthcheck.py docker/peer_entrypoint.py /opt/swarmtrain/" in copied


def test_dockerfile_default_commands_parse_and_ports_are_exposed():
    for v in ("cpu", "cuda"):
        cmd = exec_form(last(f"bootstrap-{v}", "CMD"))
        assert set(flag_names(cmd)) <= BOOTSTRAP_FLAGS
        cfg = bootstrap_cli.parse(cmd)
        assert cfg.dashboard >= 0  # so that the image's healthcheck checks the dashboard
        assert set(last(f"bootstrap-{v}", "EXPOSE").split()) == {str(cfg.port), str(cfg.dashboard)}
        cmd = exec_form(last(f"peer-{v}", "CMD"))
        assert set(flag_names(cmd)) <= PEER_FLAGS
        cfg = parse_peer(entry.build_argv(cmd, {})[1:])
        assert last(f"peer-{v}", "EXPOSE").split() == [str(cfg.swarm.port)]
        if v == "cuda":
            assert cfg.train.device == "cuda"  # fail loudly, not train on the CPU, without a GPU


def test_dockerfile_copies_exist_and_pass_the_dockerignore():
    ignore = [l.strip() for l in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
              if l.strip() and not l.startswith("#")]
    assert ignore[0] == "*"  # an allow-list: .venv, .git, keys and checkpoints never reach the daemon
    allowed = {l[1:].rstrip("/") for l in ignore if l.startswith("!")}
    for stage in STAGES.values():
        for instr, a in stage["ins"]:
            if instr == "COPY" and not a.startswith("--from"):
                for src in a.split()[:-1]:
                    assert (REPO / src).exists(), src
                    assert src.rstrip("/") in allowed, f"{src} is excluded by Dockerfile.dockerignore"


def test_dockerfile_header_and_docs_show_every_build_command():
    head = (DOCKER / "Dockerfile").read_text().split("\nFROM ", 1)[0]
    docs = (REPO / "docs" / "docker.md").read_text()
    for target in TARGETS:
        assert f"--target {target}" in head and f"--target {target}" in docs
    assert "docker compose -f docker/compose.yaml up" in docs and "--scale peer=" in docs


# =========================================================================== healthcheck.py


def test_healthcheck_flags_and_keys_exist():
    assert set(hc.BOOTSTRAP_FLAGS) <= BOOTSTRAP_FLAGS
    assert set(hc.PEER_FLAGS) <= PEER_FLAGS
    assert set(hc.BOOTSTRAP_KEYS) <= {f.name for f in fields(BootstrapConfig)}
    assert set(hc.PEER_SWARM_KEYS) <= {f.name for f in fields(SwarmConfig)}


@pytest.mark.parametrize("args,toml", [
    ([], ""),
    (["--dashboard", "9000", "--port", "4001"], ""),
    (["--dashboard=9000", "--dashboard", "9001", "--maddrs-file=rel.maddrs"], ""),
    (["--config", "b.toml"], 'dashboard = 7000\ndashboard_host = "127.0.0.1"\nmaddrs_file = "/shared/x"\nport = 4444\n'),
    (["--config", "b.toml", "--dashboard", "7001", "--host", "127.0.0.2"], "dashboard = 7000\n"),
])
def test_healthcheck_resolves_bootstrap_settings_like_the_cli(tmp_path, args, toml):
    if toml:
        (tmp_path / "b.toml").write_text(toml)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        real = bootstrap_cli.parse(args)
    finally:
        os.chdir(cwd)
    view = hc.bootstrap_view(hc.Proc(1, "bootstrap", args, str(tmp_path)))
    assert (view.host, view.port, view.dashboard, view.dashboard_host, view.maddrs_file) == (
        real.host, real.port, real.dashboard, real.dashboard_host, real.maddrs_file)


@pytest.mark.parametrize("args,toml", [
    ([], ""), (["--swarm.client-mode"], ""), (["--swarm.client-mode", "--swarm.no-client-mode"], ""),
    (["--config", "p.toml"], "[swarm]\nclient_mode = true\n"),
    (["--config", "p.toml", "--swarm.no-client-mode"], "[swarm]\nclient_mode = true\n"),
])
def test_healthcheck_resolves_client_mode_like_the_cli(tmp_path, args, toml):
    if toml:
        (tmp_path / "p.toml").write_text(toml)
    args = [a if a != "p.toml" else str(tmp_path / "p.toml") for a in args]
    assert hc.peer_client_mode(hc.Proc(1, "peer", args, "/")) == parse_peer(args).swarm.client_mode


def test_healthcheck_classifies_command_lines():
    assert hc.classify(["/opt/venv/bin/python", "/opt/venv/bin/swarm-peer", "--swarm.port", "1"]) == (
        "peer", ["--swarm.port", "1"])
    assert hc.classify(["/opt/venv/bin/python3.11", "/opt/venv/bin/swarm-bootstrap"]) == ("bootstrap", [])
    assert hc.classify(["python", "-m", "bootstrap", "--dashboard", "0"]) == ("bootstrap", ["--dashboard", "0"])
    assert hc.classify(["python", "-m", "peer"]) == ("peer", [])
    assert hc.classify(["/opt/venv/bin/python", "/opt/venv/bin/swarm-peer", "status", "--join", "x"]) is None
    assert hc.classify(["python", "/opt/swarmtrain/healthcheck.py"]) is None
    assert hc.classify(["python", "/opt/swarmtrain/peer_entrypoint.py", "--swarm.port", "1"]) is None
    assert hc.classify(["/usr/local/lib/p2pd", "-hostAddrs=/ip4/0.0.0.0/tcp/31338"]) is None


class FakeProc:
    """A fake /proc: processes (cmdline, comm, state, fds) and /proc/net/tcp."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "net").mkdir(parents=True)
        (root / "net" / "tcp").write_text("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n")
        (root / "net" / "tcp6").write_text("  sl  local_address ...\n")
        self.btime = int(time.time()) - 1000
        (root / "stat").write_text(f"cpu 1 2 3\nbtime {self.btime}\nprocesses 9\n")

    def add(self, pid: int, argv: list[str], *, comm: str = "python3", state: str = "S", started: float | None = None,
            cwd: str = "/", sockets: tuple[int, ...] = (), ppid: int = 0) -> None:
        d = self.root / str(pid)
        (d / "fd").mkdir(parents=True)
        (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
        (d / "comm").write_text(comm + "\n")
        ticks = int(((started if started is not None else time.time()) - self.btime) * os.sysconf("SC_CLK_TCK"))
        rest = ["0"] * 18 + [str(ticks)] + ["0"] * 10  # field 22 (starttime) is the 20th after the state
        (d / "stat").write_text(f"{pid} ({comm}) {state} {ppid} " + " ".join(rest[1:]) + "\n")
        assert hc._stat(self.root, pid)[19] == str(ticks)
        os.symlink(cwd, d / "cwd")
        for n, inode in enumerate(sockets):
            os.symlink(f"socket:[{inode}]", d / "fd" / str(n + 3))

    def listen(self, port: int, inode: int, *, v6: bool = False) -> None:
        table = self.root / "net" / ("tcp6" if v6 else "tcp")
        addr = "00000000000000000000000000000000" if v6 else "00000000"
        with table.open("a") as f:
            f.write(f"   0: {addr}:{port:04X} 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 {inode} 1\n")


@pytest.fixture
def listener():
    """A real listening socket on 127.0.0.1 (the 'p2pd' of the fake /proc)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield s.getsockname()[1]
    s.close()


def test_healthcheck_peer(tmp_path, listener):
    fp = FakeProc(tmp_path / "proc")
    with pytest.raises(hc.Unhealthy, match="no swarm-peer or swarm-bootstrap"):
        hc.check(fp.root)
    fp.add(1, ["/opt/venv/bin/python", "/opt/venv/bin/swarm-peer", "--swarm.port", str(listener)])
    with pytest.raises(hc.Unhealthy, match="p2pd.*not running"):
        hc.check(fp.root)
    fp.add(20, ["/opt/venv/lib/python3.11/site-packages/hivemind/hivemind_cli/p2pd"], comm="p2pd", sockets=(4242, 99))
    with pytest.raises(hc.Unhealthy, match="listens on no TCP port"):
        hc.check(fp.root)
    fp.listen(listener, 4242)
    assert hc.check(fp.root) == f"peer: DHT daemon accepts connections on port {listener}"


def test_healthcheck_peer_port_closed_and_zombie(tmp_path, listener):
    fp = FakeProc(tmp_path / "proc")
    fp.add(1, ["/opt/venv/bin/python", "/opt/venv/bin/swarm-peer"])
    fp.add(20, ["p2pd"], comm="p2pd", sockets=(4242,))
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    fp.listen(closed, 4242)
    with pytest.raises(hc.Unhealthy, match="nothing accepts connections"):
        hc.check(fp.root)
    fp2 = FakeProc(tmp_path / "proc2")
    fp2.add(1, ["/opt/venv/bin/python", "/opt/venv/bin/swarm-peer"], state="Z")
    with pytest.raises(hc.Unhealthy, match="has exited"):
        hc.check(fp2.root)


def test_healthcheck_finds_the_node_not_its_forked_dht_process(tmp_path):
    """hivemind runs the DHT in a forked child with the same command line (and p2pd under it)."""
    fp = FakeProc(tmp_path / "proc")
    argv = ["/opt/venv/bin/python", "/opt/venv/bin/swarm-peer", "--swarm.port", "31338"]
    fp.add(5, argv, ppid=900)    # the child got a lower pid after a pid wrap-around
    fp.add(900, argv, ppid=1)
    fp.add(1, ["/sbin/docker-init", "--", "python", "/opt/swarmtrain/peer_entrypoint.py"], comm="docker-init")
    assert hc.find_node(fp.root).pid == 900


def test_healthcheck_peer_client_mode(tmp_path):
    fp = FakeProc(tmp_path / "proc")
    fp.add(7, ["/sbin/docker-init", "--", "python", "/opt/swarmtrain/peer_entrypoint.py"], comm="docker-init")
    fp.add(8, ["/opt/venv/bin/python", "/opt/venv/bin/swarm-peer", "--swarm.client-mode"])
    fp.add(9, ["p2pd"], comm="p2pd")
    assert "client mode" in hc.check(fp.root)


class StubDashboard:
    """A loopback HTTP server answering /api/status like bootstrap/dashboard.py."""

    def __init__(self, status: dict, code: int = 200) -> None:
        self.status, self.code = status, code
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = json.dumps(outer.status).encode() if self.path == "/api/status" else b"{}"
                self.send_response(outer.code if self.path == "/api/status" else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_healthcheck_bootstrap(tmp_path):
    fp = FakeProc(tmp_path / "proc")
    maddrs = tmp_path / "bootstrap.maddrs"
    stub = StubDashboard({"run_id": "r", "updated": time.time(), "peers_live": 2})
    try:
        fp.add(1, ["/opt/venv/bin/python", "/opt/venv/bin/swarm-bootstrap", "--dashboard", str(stub.port),
                   "--maddrs-file", "bootstrap.maddrs"], cwd=str(tmp_path), started=time.time() - 30)
        with pytest.raises(hc.Unhealthy, match="has not written its addresses"):
            hc.check(fp.root)
        maddrs.write_text(f"/ip4/172.18.0.2/tcp/31337/p2p/{PEER_ID}\n")
        os.utime(maddrs, (time.time() - 3600,) * 2)  # left by an earlier run
        with pytest.raises(hc.Unhealthy, match="stale"):
            hc.check(fp.root)
        os.utime(maddrs, None)
        assert hc.check(fp.root) == "bootstrap: run 'r': 2 live peer(s), records read 0 s ago"
        stub.status["updated"] = time.time() - 500  # the DHT stopped answering
        with pytest.raises(hc.Unhealthy, match="500 s ago"):
            hc.check(fp.root)
        assert "records read" in hc.check(fp.root, max_age=1000)
        stub.status["updated"] = 0.0
        with pytest.raises(hc.Unhealthy, match="not read the run's records yet"):
            hc.check(fp.root)
        stub.status = {"error": "boom"}
        with pytest.raises(hc.Unhealthy, match="without a run_id"):
            hc.check(fp.root)
        stub.code = 500
        with pytest.raises(hc.Unhealthy, match="HTTP 500"):
            hc.check(fp.root)
    finally:
        stub.close()
    with pytest.raises(hc.Unhealthy, match="did not answer"):
        hc.check(fp.root)


def test_healthcheck_bootstrap_without_dashboard_checks_the_dht(tmp_path, listener):
    fp = FakeProc(tmp_path / "proc")
    fp.add(1, ["/opt/venv/bin/python", "/opt/venv/bin/swarm-bootstrap", "--port", str(listener)])
    fp.add(30, ["p2pd"], comm="p2pd", sockets=(777,))
    fp.listen(listener, 777, v6=False)
    assert hc.check(fp.root) == f"bootstrap: DHT daemon accepts connections on port {listener}"


def test_healthcheck_decodes_proc_net_addresses():
    assert hc._decode_addr("0100007F") == "127.0.0.1"
    assert hc._decode_addr("00000000000000000000000001000000") == "::1"


def test_healthcheck_main_exit_codes(tmp_path, capsys):
    with mock.patch.object(hc, "check", side_effect=hc.Unhealthy("x broke")):
        assert hc.main([]) == 1
    assert capsys.readouterr().out == "unhealthy: x broke\n"
    with mock.patch.object(hc, "check", return_value="peer: fine"):
        assert hc.main(["--max-age", "5"]) == 0
    assert capsys.readouterr().out == "healthy: peer: fine\n"


def test_healthcheck_is_stdlib_only():
    """It runs every few seconds: no torch, hivemind or project import."""
    out = subprocess.run([sys.executable, "-X", "importtime", str(DOCKER / "healthcheck.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    imported = {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "hivemind", "numpy", "peer", "bootstrap", "averaging", "aiohttp"}


# =========================================================================== peer_entrypoint.py


def test_entrypoint_parses_the_maddrs_file():
    text = (f"/ip4/127.0.0.1/tcp/31337/p2p/{PEER_ID}\n/ip4/172.18.0.2/tcp/31337/p2p/{PEER_ID}\n"
            f"/ip6/::1/tcp/31337/p2p/{PEER_ID}\n\n/ip4/10.0.0.2/tcp/31337\n")
    assert entry.parse_maddrs(text) == [f"/ip4/172.18.0.2/tcp/31337/p2p/{PEER_ID}"]
    only_loopback = f"/ip4/127.0.0.1/tcp/31337/p2p/{PEER_ID}\n"  # a bootstrap on the host network
    assert entry.parse_maddrs(only_loopback) == [only_loopback.strip()]
    assert entry.parse_maddrs("") == []


def test_entrypoint_waits_for_the_join_file(tmp_path):
    path = tmp_path / "bootstrap.maddrs"
    t0 = time.monotonic()
    with pytest.raises(entry.EntrypointError, match="no bootstrap address in .* after"):
        entry.wait_for_join_file(str(path), 0.3, poll=0.05)
    assert time.monotonic() - t0 < 5
    addr = f"/ip4/127.0.0.1/tcp/31337/p2p/{PEER_ID}"
    threading.Timer(0.2, lambda: path.write_text(addr + "\n")).start()
    assert entry.wait_for_join_file(str(path), 10, poll=0.05) == [addr]


def test_entrypoint_slots_are_exclusive(tmp_path):
    a, fa = entry.claim_slot(str(tmp_path / "peers"))
    b, fb = entry.claim_slot(str(tmp_path / "peers"))
    assert (a, b) == (0, 1)
    assert os.get_inheritable(fa)  # the lock is held by swarm-peer after exec
    os.close(fa)                   # replica 0 exits
    c, fc = entry.claim_slot(str(tmp_path / "peers"))
    assert c == 0                  # a new replica takes its identity and checkpoints back
    os.close(fb)
    os.close(fc)
    _, fd = entry.claim_slot(str(tmp_path / "p2"), max_slots=1)
    with pytest.raises(entry.EntrypointError, match="all 1 slots"):
        entry.claim_slot(str(tmp_path / "p2"), max_slots=1)
    os.close(fd)


def test_entrypoint_prepare_end_to_end(tmp_path):
    """prepare() with the compose environment: waits for the file, claims a slot, and the result parses."""
    join = tmp_path / "shared" / "bootstrap.maddrs"
    join.parent.mkdir()
    join.write_text(f"/ip4/127.0.0.1/tcp/31337/p2p/{PEER_ID}\n")
    env = {"SWARM_JOIN_FILE": str(join), "SWARM_JOIN_TIMEOUT": "5", "SWARM_ANNOUNCE_HOST": "auto",
           "SWARM_SLOTS_DIR": str(tmp_path / "peers")}
    argv = entry.prepare(["--swarm.port", "31338", "--checkpoint.resume"], env)
    assert argv[0] == "swarm-peer"
    cfg = parse_peer(argv[1:])
    assert cfg.swarm.initial_peers == [f"/ip4/127.0.0.1/tcp/31337/p2p/{PEER_ID}"]
    assert cfg.swarm.announce_host == "127.0.0.1"  # the route to a loopback bootstrap
    assert cfg.swarm.identity_path == str(tmp_path / "peers" / "slot-0" / "identity.key")
    assert (tmp_path / "peers" / "slot-0").is_dir()
    # flags given on the command line win over the added ones
    argv = entry.build_argv(["--swarm.announce-host", "10.1.2.3", "--checkpoint.dir", "/elsewhere"],
                            {"SWARM_ANNOUNCE_HOST": "192.0.2.1"}, slot_dir="/data/peers/slot-3")
    cfg = parse_peer(argv[1:])
    assert cfg.swarm.announce_host == "10.1.2.3" and cfg.checkpoint.dir == "/elsewhere"
    assert cfg.swarm.identity_path == "/data/peers/slot-3/identity.key"


def test_entrypoint_passes_status_and_help_through():
    env = {"SWARM_JOIN_FILE": "/nonexistent/never", "SWARM_SLOTS_DIR": "/nonexistent/x"}
    assert entry.prepare(["status", "--join", "x"], env) == ["swarm-peer", "status", "--join", "x"]
    assert entry.prepare(["--help"], env) == ["swarm-peer", "--help"]
    assert entry.build_argv(["--sync.every-steps", "5"], {}) == ["swarm-peer", "--sync.every-steps", "5"]


def test_entrypoint_main_reports_errors(tmp_path, capsys):
    env = {"SWARM_JOIN_FILE": str(tmp_path / "missing"), "SWARM_JOIN_TIMEOUT": "0"}
    with mock.patch.dict(os.environ, env), mock.patch.object(entry.os, "execvp") as ex:
        assert entry.main([]) == 1
    ex.assert_not_called()
    assert "peer-entrypoint: error: no bootstrap address" in capsys.readouterr().err
    with mock.patch.dict(os.environ, {}, clear=True), mock.patch.object(entry.os, "execvp") as ex:
        entry.main(["--swarm.port", "1"])
    ex.assert_called_once_with("swarm-peer", ["swarm-peer", "--swarm.port", "1"])


# =========================================================================== opt-in: a real build


PODMAN_CHECKS = """\
FROM {tag}
RUN test "$(id -u)" = 1000 && test "$(pwd)" = /data && test -w /data
RUN python /opt/swarmtrain/peer_entrypoint.py --help | grep -q -- --sync.every-steps
RUN swarm-bootstrap --help | grep -q -- --maddrs-file
RUN python -c "import torch, peer, bootstrap; assert torch.__version__.startswith('{pin}') and not torch.version.cuda"
"""


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(os.environ.get("SWARMTRAIN_PODMAN_BUILD") != "1" or shutil.which("podman") is None,
                    reason="opt-in: set SWARMTRAIN_PODMAN_BUILD=1 on a machine with podman to build the peer-cpu "
                           "image for real (it needs python:3.11-slim, PyPI and PyTorch's CPU index, or "
                           "SWARMTRAIN_PODMAN_BUILD_ARGS pointing elsewhere; see docs/docker.md)")
def test_podman_builds_the_cpu_peer_image(tmp_path):
    """Builds peer-cpu, checks its config, then checks its contents with RUN steps of a derived build
    (which works where `podman run` cannot start a container, e.g. inside another sandbox)."""
    extra = shlex.split(os.environ.get("SWARMTRAIN_PODMAN_BUILD_ARGS", ""))
    tag = "localhost/swarmtrain-peer:test"
    build = subprocess.run(["podman", "build", "--format", "docker", "-f", "docker/Dockerfile", "--target", "peer-cpu",
                            "--ignorefile", "docker/Dockerfile.dockerignore", "-t", tag, *extra, "."],
                           cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    image = json.loads(subprocess.run(["podman", "image", "inspect", tag], capture_output=True, text=True,
                                      check=True).stdout)[0]
    info = image["Config"]
    assert info["User"] == "swarm" and info["WorkingDir"] == "/data"
    assert info["Entrypoint"] == ["python", "/opt/swarmtrain/peer_entrypoint.py"]
    health = image.get("Healthcheck") or info.get("Healthcheck")  # podman shows it beside Config; needs --format docker
    assert health and "/opt/swarmtrain/healthcheck.py" in " ".join(health["Test"])
    (tmp_path / "Containerfile").write_text(PODMAN_CHECKS.format(tag=tag, pin=run_pin()))
    isolation = [a for i, a in enumerate(extra) if a.startswith("--isolation") or i and extra[i - 1] == "--isolation"]
    check = subprocess.run(["podman", "build", "--pull=never", *isolation,
                            "-f", str(tmp_path / "Containerfile"), str(tmp_path)],
                           capture_output=True, text=True, timeout=600)
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
