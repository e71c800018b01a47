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

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import pytest
import yaml

from bootstrap import cli as bootstrap_cli
from bootstrap.node import BootstrapConfig
from peer import cli as peer_cli
from averaging.errors import ConfigError

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
    assert (cfg.sync.every_steps, cfg.sync.every_seconds) == (0, 10.0) and cfg.sync.codec.name == "fp32" and cfg.train.threads == 1
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
    mm = cfg.sync.matchmaking
    assert (cfg.sync.every_steps, cfg.sync.every_seconds, cfg.sync.codec.name, mm.min_group_size,
            mm.max_group_size, mm.window) == (7, 30.0, "int8", 3, 8, 5.0)
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
                                         ("peer", "--swarm.port=notaport"), ("peer", "--sync.codec.name=fp8")])
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


def test_healthcheck_env_name_is_the_writers():
    from peer import heartbeat

    assert hc.ENV == heartbeat.ENV
    assert f'{hc.ENV}={hc.DEFAULT}' in " ".join(re.findall(r"ENV [^\n]+", (DOCKER / "Dockerfile").read_text()))


def test_healthcheck_reads_the_heartbeat(tmp_path):
    """Healthy only for a fresh, ok beat of a running process; one line saying why otherwise."""
    from peer.heartbeat import Heartbeat

    f = tmp_path / "hb.json"
    with pytest.raises(hc.Unhealthy, match="no heartbeat at"):
        hc.check(f)
    with Heartbeat(f, "peer") as beat:  # a first beat, "starting", from this (running) process
        assert hc.check(f) == "peer: starting"
        beat.beat(detail="step 3, round 1", stale_after=30, force=True)
        assert hc.check(f) == "peer: step 3, round 1"
        with pytest.raises(hc.Unhealthy, match=r"no heartbeat for 4\d s \(expected within 30 s\); the last said: step 3"):
            hc.check(f, now=time.time() + 45)  # the loop stopped beating: it hangs
        beat.beat(ok=False, detail="run 'x': records read 300 s ago", force=True)
        with pytest.raises(hc.Unhealthy, match="records read 300 s ago"):
            hc.check(f)
    assert not f.exists()  # a node that stopped removes its heartbeat
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    f.write_text(json.dumps({"pid": int(dead.stdout), "role": "bootstrap", "time": time.time(), "stale_after": 60,
                             "ok": True, "detail": "fine"}))
    with pytest.raises(hc.Unhealthy, match=r"bootstrap \(pid \d+\) is not running"):
        hc.check(f)  # a crashed node's last file is not health
    for junk in ("{", "[]", json.dumps({"pid": "1", "role": "peer"})):
        f.write_text(junk)
        with pytest.raises(hc.Unhealthy, match="is not a heartbeat"):
            hc.check(f)


def test_healthcheck_main_exit_codes(tmp_path, capsys, monkeypatch):
    from peer.heartbeat import Heartbeat

    monkeypatch.setenv(hc.ENV, str(tmp_path / "hb.json"))
    assert hc.main([]) == 1
    assert capsys.readouterr().out.startswith("unhealthy: no heartbeat at")
    with Heartbeat.from_env("bootstrap"):
        assert hc.main([]) == 0
        assert capsys.readouterr().out == "healthy: bootstrap: starting\n"


@pytest.mark.timeout(300)
def test_real_nodes_beat_while_they_work(procs, monkeypatch):
    """A real swarm-bootstrap and two swarm-peers with SWARMTRAIN_HEARTBEAT set: each file says
    healthy while the node works, and is gone once it stopped."""
    from .conftest import wait_exit, wait_for

    files = {n: procs.tmp / f"{n}.heartbeat" for n in ("boot", "p0", "p1")}
    monkeypatch.setenv(hc.ENV, str(files["boot"]))
    boot, addr = procs.bootstrap("boot")
    peers = []
    for n in ("p0", "p1"):
        monkeypatch.setenv(hc.ENV, str(files[n]))
        # no round limit: they train until stopped, so none can finish before its heartbeat is read
        peers.append(procs.peer(n, addr, "--sync.every-steps", "20"))
    seen = {}

    def beating() -> bool:
        for n, f in files.items():
            try:
                seen[n] = hc.check(f)
            except hc.Unhealthy:  # not written yet
                pass
        return "records read" in seen.get("boot", "") and all("step" in seen.get(n, "") for n in ("p0", "p1"))

    wait_for(beating, 120, "every node to report a healthy heartbeat", peers[0])
    assert seen["boot"].startswith("bootstrap: run 'swarmtrain-demo': records read")
    assert all(seen[n].startswith("peer: step ") for n in ("p0", "p1")), seen
    for p in peers:
        p.send_signal(signal.SIGTERM)
    for p in peers:
        assert wait_exit(procs, p, 60) == 0, procs.log(p)[-2000:]
    assert not files["p0"].exists() and not files["p1"].exists()
    assert hc.check(files["boot"]).startswith("bootstrap: ")  # still watching the run
    boot.send_signal(signal.SIGTERM)
    assert wait_exit(procs, boot, 30) == 0
    assert not files["boot"].exists()


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
