"""`./run setup` installs the system packages the suite needs, or names the one command to run.

The script is run for real, with PATH narrowed to a folder holding only what it needs: so
chromium, chromedriver, ip and tc are "missing" whatever this machine has. `id` and
`apt-get` are stand-ins there, to play a non-root user or to record what root would install.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

from .conftest import REPO

PACKAGES = ["iproute2", "chromium", "chromium-driver"]


def _bin(tmp_path: Path, uid: int) -> Path:
    b = tmp_path / "bin"
    b.mkdir()
    for tool in ("bash", "dirname"):
        (b / tool).symlink_to(shutil.which(tool))
    _script(b / "id", f'echo {uid}')
    _script(b / "apt-get", f'echo "$*" >> {tmp_path / "apt.log"}')
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    _script(venv / "python", f'echo "$*" >> {tmp_path / "python.log"}')  # the venv's pip, recorded
    return b


def _script(path: Path, body: str) -> None:
    path.write_text(f"#!{shutil.which('bash')}\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _setup(tmp_path: Path, uid: int) -> subprocess.CompletedProcess:
    env = {"PATH": str(_bin(tmp_path, uid)), "VENV": str(tmp_path / "venv"), "HOME": os.environ.get("HOME", "/root")}
    return subprocess.run([shutil.which("bash"), str(REPO / "run"), "setup"], env=env, capture_output=True,
                          text=True, timeout=60)


def test_setup_as_a_user_stops_with_the_one_command_to_run(tmp_path):
    p = _setup(tmp_path, uid=1000)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].endswith("sudo apt-get install -y --no-install-recommends " + " ".join(PACKAGES)), lines[0]
    assert not (tmp_path / "apt.log").exists() and not (tmp_path / "python.log").exists()  # stopped at once


def test_setup_as_root_installs_the_system_packages_then_the_venv(tmp_path):
    p = _setup(tmp_path, uid=0)
    assert p.returncode == 0, p.stderr
    apt = (tmp_path / "apt.log").read_text().splitlines()
    assert apt[0] == "update -qq"
    assert apt[1].split()[-3:] == PACKAGES and apt[1].startswith("install -y")
    assert "install -q -e .[dev]" in (tmp_path / "python.log").read_text()


def test_ci_runs_only_the_readme_test_command():
    lines = [ln for ln in (REPO / ".ci" / "run").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[-1] == "exec ./run test" and not any("apt-get" in ln for ln in lines)
