"""A live 3-peer swarm seen through the bootstrap's dashboard: in headless chromium, through
the JSON API and /metrics, through `swarm-peer status`, and across a bootstrap restart
(the contribution ledger is kept on disk and nothing is counted twice)."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .browser import SKIP_REASON, chromium_available, open_chromium
from .conftest import PY, REPO, wait_exit, wait_for

pytestmark = pytest.mark.timeout(420)


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def dashboard_url(procs, boot) -> str:
    m = wait_for(lambda: re.search(r"Dashboard: (http://\S+/)", procs.log(boot)), 60, "the dashboard URL", boot)
    return m.group(1)


def test_live_swarm_dashboard_status_and_ledger_restart(procs, tmp_path):
    ledger = tmp_path / "ledger.json"
    boot, addr = procs.bootstrap("boot", "--dashboard", "0", "--ledger", str(ledger), "--poll-every", "1")
    url = dashboard_url(procs, boot)
    peers = [procs.peer(f"p{i}", addr, "--sync.every-steps", "10", "--log.every-steps", "5") for i in range(3)]

    # The monitor has seen the 3 peers train: all live, a loss curve, 3 contributors with credit.
    def ready():
        st, led = get_json(url + "api/status"), get_json(url + "api/ledger")
        return (st["peers_live"] == 3 and len(st["loss_history"]) >= 2 and st["round"] >= 2
                and len(led) == 3 and all(r["samples"] > 0 and r["credit"] > 0 for r in led)
                and len(st["val_history"]) >= 2)  # the peers' validation loss of θ_sync, by round
    wait_for(ready, 240, "the dashboard to show 3 training peers", boot)
    st = get_json(url + "api/status")
    # The run's configuration as the peers run it (their flags and the defaults), nobody different.
    assert st["run_config"]["every_steps"] == 10 and st["run_config"]["outer_lr"] == 0.7, st["run_config"]
    assert st["run_config"]["compression"] == "fp32" and st["run_config"]["params"] > 0 and st["config_others"] == 0
    rounds = [v["round"] for v in st["val_history"]]
    assert rounds == sorted(set(rounds)) and all(0 < v["val_loss"] < 10 for v in st["val_history"])

    # --- the page in a real browser
    if chromium_available():
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        with open_chromium(tmp_path) as driver:
            driver.get(url)
            wait = WebDriverWait(driver, 30)
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#peers tbody tr")) == 3)
            wait.until(lambda d: int(d.find_element(By.ID, "loss-plot").get_attribute("data-points") or 0) >= 2)
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#leaderboard tbody tr")) == 3)
            assert len(driver.find_elements(By.CSS_SELECTOR, "#loss-plot circle.pt")) >= 2
            wait.until(lambda d: int(d.find_element(By.ID, "loss-plot").get_attribute("data-val-points") or 0) >= 2)
            assert "H = 10 inner steps" in driver.find_element(By.ID, "run-config").text
            assert int(driver.find_element(By.ID, "round").text) >= 2
            table = driver.find_element(By.ID, "peers").text
            for r in get_json(url + "api/peers"):
                assert r["short_id"] in table
            shot = tmp_path / "dashboard.png"
            driver.save_screenshot(str(shot))
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        pytest.fail(SKIP_REASON)  # ./run setup installs chromium: its absence is a setup bug

    # --- Prometheus metrics and the CSV export agree with the JSON API
    metrics = {s.name: s.value for fam in text_string_to_metric_families(get_text(url + "metrics"))
               for s in fam.samples if not s.labels}
    assert metrics["swarmtrain_peers_live"] == 3 and metrics["swarmtrain_round"] >= 2
    assert len(get_text(url + "api/ledger.csv").strip().splitlines()) == 1 + 3

    # --- `swarm-peer status` prints the same swarm without training
    out = subprocess.run([PY, "-m", "peer", "status", "--join", addr, "--json"], cwd=REPO, capture_output=True,
                         text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    st = json.loads(out.stdout.strip().splitlines()[-1])
    assert st["peers_live"] == 3 and st["agree"] in (True, False) and len(st["peers"]) == 3
    table = subprocess.run([PY, "-m", "peer", "status", "--join", addr], cwd=REPO, capture_output=True, text=True, timeout=90)
    assert table.returncode == 0 and "3 live peer(s)" in table.stdout, table.stdout + table.stderr[-2000:]

    # --- the ledger survives a bootstrap restart
    boot.send_signal(signal.SIGTERM)
    assert wait_exit(procs, boot, 60) == 0
    saved = {r["peer_id"]: r["samples"] for r in json.loads(ledger.read_text())["peers"]}
    assert len(saved) == 3 and all(v > 0 for v in saved.values())

    via = re.search(r"others can join through this peer: (\S+)", procs.log(peers[0])).group(1)
    boot2, _ = procs.bootstrap("boot2", "--dashboard", "0", "--ledger", str(ledger), "--poll-every", "1",
                               "--initial-peers", via, identity=tmp_path / "boot.key")
    url2 = dashboard_url(procs, boot2)
    first = {r["peer_id"]: r["samples"] for r in get_json(url2 + "api/ledger")}
    assert first.keys() == saved.keys() and all(first[p] >= saved[p] for p in saved)  # loaded, not reset

    # Once the restarted monitor sees the peers again, each peer's credit equals its own sample
    # counter (the peers never restarted): counted once, not added again on top of the saved total.
    def consistent():
        live = {p["peer_id"]: p["samples"] for p in get_json(url2 + "api/peers") if p["role"] == "trainer"}
        led = {r["peer_id"]: r["samples"] for r in get_json(url2 + "api/ledger")}
        after = {p["peer_id"]: p["samples"] for p in get_json(url2 + "api/peers") if p["role"] == "trainer"}
        return (len(live) == 3 and all(led[p] > saved[p] for p in saved)
                and all(live[p] <= led[p] <= after[p] for p in live))
    wait_for(consistent, 90, "the restarted bootstrap's ledger to follow the live peers", boot2)
