"""The bootstrap dashboard: JSON/CSV/metrics endpoints, failure behaviour, and the live page in headless chromium."""
from __future__ import annotations

import copy
import csv
import io
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from averaging.errors import NetworkError
from bootstrap.dashboard import Dashboard

from .browser import SKIP_REASON, chromium_available, open_chromium

NOW = 1_750_000_000.0
EVIL = "<script>window.__pwned=1</script>"


def _peer(i: int, short_id: str, role: str = "trainer", device: str = "cpu") -> dict:
    return {"peer_id": f"12D3KooW{short_id}{'x' * 20}", "short_id": short_id, "role": role, "device": device,
            "round": 9, "step": 450 + i, "samples": 14_400 + 100 * i, "samples_per_s": 30.5 + i, "loss": 2.5 - 0.1 * i,
            "compute_s": 480.0 + i, "rounds_ok": 8, "rounds_failed": i, "bytes_sent": 10_000_000, "bytes_recv": 9_000_000,
            "version": "0.1.0", "last_seen": NOW - 2 - i, "age_s": 2.0 + i, "credit": 1.2e15 * (3 - i)}


class FakeMonitor:
    """Realistic, mutable monitor data; `fail` names methods that should raise."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.fail: set[str] = set()
        self._status = {
            "run_id": "test-run", "round": 9, "agree": True, "peers_live": 3, "throughput_samples_per_s": 94.5,
            "total_samples": 43_500, "mean_loss": 2.4, "updated": NOW,
            "loss_history": [{"t": NOW - 300 + 30 * i, "round": i, "loss": 4.0 - 0.2 * i + 0.3 * (i % 2),
                              "samples": 4000 * (i + 1), "throughput": 60.0 + 5 * i, "peers": 2 + i // 4}
                             for i in range(10)],
            "val_history": [{"t": NOW - 300 + 90 * i, "round": 3 * i, "val_loss": 4.2 - 0.3 * i, "samples": 12000 * (i + 1)}
                            for i in range(3)],
            "run_config": {"params": 431_360, "every_steps": 50, "every_seconds": 0.0, "outer_lr": 0.7,
                           "outer_momentum": 0.9, "nesterov": True, "compression": "int8", "aggregator": "mean",
                           "fragments": 1, "overlap": False, "min_group_size": 2, "max_group_size": 64},
            "config_others": 0,
            "rounds": [{"round": 6 + i, "status": s, "peers": 3, "complete": 3 if s == "complete" else 1,
                        "failed": 0 if s == "complete" else 2, "duration_s": 4.2 + i, "bytes": 12_345_678, "t": NOW - 60 + 15 * i}
                       for i, s in enumerate(["complete", "failed", "complete", "partial"])],
            "rounds_total": {"complete": 2, "failed": 1, "partial": 1},
            "last_complete_round": 8, "last_complete_age_s": 40.0, "stalled": False, "stall_after_s": 120.0,
            "failed_since_complete": 1, "version": "0.1.0",
            "events": [{"t": NOW - 120, "event": "joined", "peer_id": "Qm" + "d4e5f6", "role": "trainer", "device": "cuda:0"},
                       {"t": NOW - 30, "event": "left", "peer_id": "Qm" + "zz9988", "role": "trainer", "device": "cpu"}],
        }
        self._peers = [_peer(0, "a1b2c3"), _peer(1, "d4e5f6", device="cuda:0"), _peer(2, "archv1", role="archivist")]
        self._ledger = [{"rank": i + 1, "peer_id": p["peer_id"], "short_id": p["short_id"], "device": p["device"],
                         "samples": p["samples"], "compute_s": p["compute_s"], "rounds": 8, "credit": p["credit"],
                         "first_seen": NOW - 3600, "last_seen": p["last_seen"]} for i, p in enumerate(self._peers)]

    def _get(self, name: str, value):
        if name in self.fail:
            raise RuntimeError(f"{name} exploded")
        with self.lock:
            return copy.deepcopy(value)

    def status(self) -> dict:
        return self._get("status", self._status)

    def peers(self) -> list[dict]:
        return self._get("peers", self._peers)

    def ledger(self) -> list[dict]:
        return self._get("ledger", self._ledger)

    def ledger_csv(self) -> str:
        rows = self._get("ledger_csv", self._ledger)
        out = io.StringIO()
        w = csv.DictWriter(out, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        return out.getvalue()

    def add_peer(self, p: dict) -> None:
        with self.lock:
            self._peers.append(p)
            self._status["peers_live"] = len(self._peers)


@pytest.fixture
def fake() -> FakeMonitor:
    return FakeMonitor()


@pytest.fixture
def dash(fake: FakeMonitor):
    d = Dashboard(fake, "127.0.0.1", 0)
    d.start()
    yield d
    d.close()


def get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def dashboard_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "swarmtrain-dashboard"]


@pytest.mark.timeout(30)
def test_json_endpoints(dash: Dashboard, fake: FakeMonitor) -> None:
    for path, expected in [("api/status", fake.status()), ("api/peers", fake.peers()), ("api/ledger", fake.ledger())]:
        code, headers, body = get(dash.url + path)
        assert code == 200 and headers["Content-Type"].startswith("application/json"), path
        assert json.loads(body) == expected, path


@pytest.mark.timeout(30)
def test_nan_loss_is_null_not_invalid_json(dash: Dashboard, fake: FakeMonitor) -> None:
    fake._status["mean_loss"] = float("nan")
    code, _, body = get(dash.url + "api/status")
    assert code == 200 and json.loads(body)["mean_loss"] is None   # strict parsers (browsers) reject NaN


@pytest.mark.timeout(30)
def test_ledger_csv(dash: Dashboard, fake: FakeMonitor) -> None:
    code, headers, body = get(dash.url + "api/ledger.csv")
    assert code == 200
    assert headers["Content-Type"].startswith("text/csv")
    assert headers["Content-Disposition"].startswith("attachment")
    assert body.decode() == fake.ledger_csv()
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert [r["short_id"] for r in rows] == ["a1b2c3", "d4e5f6", "archv1"]


@pytest.mark.timeout(30)
def test_metrics(dash: Dashboard, fake: FakeMonitor) -> None:
    code, headers, body = get(dash.url + "metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}
    st = fake.status()
    assert samples[("swarmtrain_peers_live", ())] == st["peers_live"]
    assert samples[("swarmtrain_round", ())] == st["round"]
    assert samples[("swarmtrain_throughput_samples_per_second", ())] == st["throughput_samples_per_s"]
    assert samples[("swarmtrain_samples_total", ())] == st["total_samples"]
    assert samples[("swarmtrain_train_loss", ())] == st["mean_loss"]
    assert samples[("swarmtrain_peers_agree", ())] == 1.0
    assert samples[("swarmtrain_rounds_stalled", ())] == 0.0
    assert samples[("swarmtrain_last_complete_round_age_seconds", ())] == st["last_complete_age_s"]
    for outcome, n in [("complete", 2), ("failed", 1), ("partial", 1)]:
        assert samples[("swarmtrain_rounds_total", (("status", outcome),))] == n
    for p in fake.peers():
        assert samples[("swarmtrain_peer_samples_per_second", (("peer", p["short_id"]),))] == p["samples_per_s"]
        assert samples[("swarmtrain_peer_credit", (("peer", p["short_id"]),))] == p["credit"]

    # A report without a loss drops the loss gauge rather than exporting a stale or NaN value.
    with fake.lock:
        fake._status["mean_loss"] = None
    text = get(dash.url + "metrics")[2].decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert not any(name == "swarmtrain_train_loss" for name, _ in samples)   # no loss reported: no sample


@pytest.mark.timeout(30)
def test_monitor_error_is_500_and_server_survives(dash: Dashboard, fake: FakeMonitor) -> None:
    fake.fail = {"peers", "status"}
    for path in ("api/peers", "api/status", "metrics"):
        code, headers, body = get(dash.url + path)
        assert code == 500 and headers["Content-Type"].startswith("application/json"), path
        assert "exploded" in json.loads(body)["error"], path
    assert get(dash.url + "api/ledger")[0] == 200   # other endpoints unaffected
    fake.fail = set()
    code, _, body = get(dash.url + "api/peers")
    assert code == 200 and len(json.loads(body)) == 3


@pytest.mark.timeout(30)
def test_page_is_self_contained(dash: Dashboard) -> None:
    code, headers, body = get(dash.url)
    html = body.decode()
    assert code == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    for marker in ('id="loss-plot"', 'id="peers"', 'id="leaderboard"', 'id="rounds"', 'id="round"'):
        assert marker in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "page must not load external resources"
    assert get(dash.url + "nope")[0] == 404


@pytest.mark.timeout(30)
def test_port_in_use_and_close_lifecycle(fake: FakeMonitor) -> None:
    before = len(dashboard_threads())
    blocker = socket.socket()
    try:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        d = Dashboard(fake, "127.0.0.1", port)
        with pytest.raises(NetworkError) as ei:
            d.start()
        msg = str(ei.value)
        assert "\n" not in msg and str(port) in msg and "in use" in msg.lower(), msg
        assert len(dashboard_threads()) == before   # a failed start leaves nothing running
        d.close()                                   # and close() after it is harmless
    finally:
        blocker.close()

    Dashboard(fake, "127.0.0.1", 0).close()         # close() before start() is a no-op
    d = Dashboard(fake, "127.0.0.1", 0)
    port = d.start()
    assert port > 0 and d.port == port and d.url == f"http://127.0.0.1:{port}/"
    assert get(d.url + "api/status")[0] == 200
    with pytest.raises(RuntimeError):
        d.start()
    t0 = time.monotonic()
    d.close()
    d.close()
    assert time.monotonic() - t0 < 5
    assert len(dashboard_threads()) == before
    with pytest.raises(OSError):
        get(f"http://127.0.0.1:{port}/api/status")


@pytest.mark.skipif(not chromium_available(), reason=SKIP_REASON)
@pytest.mark.timeout(120)
def test_live_page_in_chromium(dash: Dashboard, fake: FakeMonitor, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def count(driver, css: str) -> int:
        return len(driver.find_elements(By.CSS_SELECTOR, css))

    with open_chromium(tmp_path) as driver:
        driver.set_page_load_timeout(30)
        driver.get(dash.url)
        wait = WebDriverWait(driver, 20)
        wait.until(lambda d: count(d, "#peers tbody tr") == 3)
        wait.until(lambda d: d.find_element(By.ID, "loss-plot").get_attribute("data-points") == "10")
        # The loss plot: raw train points (faint), their smoothed line, and the validation loss per round.
        assert count(driver, "#loss-plot circle.raw") == 10 and count(driver, "#loss-plot circle.val") == 3
        polylines = {p.get_attribute("class"): p.get_attribute("points")
                     for p in driver.find_elements(By.CSS_SELECTOR, "#loss-plot polyline")}
        assert set(polylines) == {"raw", "line", "val"} and polylines["line"] != polylines["raw"]
        assert "samples trained on by the swarm" in driver.find_element(By.ID, "loss-plot").text
        set_control = "const e = document.getElementById(arguments[0]); e.value = arguments[1]; " \
                      "e.dispatchEvent(new Event('input'));"
        driver.execute_script(set_control, "loss-smooth", "0")  # no smoothing: one line through the points
        assert count(driver, "#loss-plot polyline") == 2 and count(driver, "#loss-plot circle.line") == 10
        assert driver.find_element(By.CSS_SELECTOR, "#loss-plot polyline.line").get_attribute("points") == polylines["raw"]
        driver.execute_script(set_control, "loss-x", "round")
        texts = [t.text for t in driver.find_elements(By.CSS_SELECTOR, "#loss-plot text")]
        assert "round" in texts and texts[-3:-1] == ["0", "9"], texts  # the x axis runs over rounds 0..9
        assert driver.find_element(By.ID, "throughput-plot").get_attribute("data-points") == "10"
        assert count(driver, "#peers-plot polyline") == 1
        config = {tr.find_elements(By.TAG_NAME, "td")[0].text: tr.find_elements(By.TAG_NAME, "td")[1].text
                  for tr in driver.find_elements(By.CSS_SELECTOR, "#run-config tbody tr")}
        assert config == {"model": "431,360 parameters", "sync every": "H = 50 inner steps",
                          "outer optimizer": "Nesterov, lr 0.70, momentum 0.90", "wire codec": "int8",
                          "aggregator": "mean", "group size": "2 to 64 peers"}, config
        assert not driver.find_element(By.ID, "config-others").is_displayed()
        wait.until(lambda d: count(d, "#leaderboard tbody tr") == 3)
        assert count(driver, "#rounds tbody tr") == 4
        assert driver.find_element(By.ID, "round").text == "9"
        assert driver.find_element(By.ID, "run-id").text == "test-run"
        assert driver.find_element(By.ID, "agree").text == "yes"
        first = [td.text for td in driver.find_elements(By.CSS_SELECTOR, "#peers tbody tr:first-child td")]
        assert first[0] == "a1b2c3" and first[6] == "3.6 PFLOP" and first[7] == "2 s ago", first
        assert not driver.find_element(By.ID, "peers-empty").is_displayed()

        # Live update, with a hostile short id: it must show up as text and never run.
        fake.add_peer(_peer(3, EVIL, device='<img src=x onerror="window.__pwned=2">'))
        wait.until(lambda d: count(d, "#peers tbody tr") == 4)
        wait.until(lambda d: d.find_element(By.ID, "peers-live").text == "4")
        cells = driver.find_elements(By.CSS_SELECTOR, "#peers tbody tr:nth-child(4) td")
        assert cells[0].text == EVIL and cells[2].text.startswith("<img")
        assert count(driver, "#peers script, #peers img") == 0
        assert driver.execute_script("return window.__pwned === undefined")
        assert driver.find_element(By.ID, "conn").text == "live"

        # The organizer's view: when a round last completed, and a warning once they stop.
        last = driver.find_element(By.ID, "last-complete")
        assert last.text == "#8, 40 s ago" and "ok" in last.get_attribute("class")
        assert not driver.find_element(By.ID, "stall").is_displayed()
        assert driver.find_element(By.ID, "version").text == "0.1.0"
        events = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
                  for tr in driver.find_elements(By.CSS_SELECTOR, "#events tbody tr")]
        assert [e[1:4] for e in events] == [["left", "Qmzz9988", "trainer"], ["joined", "Qmd4e5f6", "trainer"]], events
        with fake.lock:
            fake._status.update(stalled=True, last_complete_age_s=400.0, failed_since_complete=28, config_others=1)
        wait.until(lambda d: d.find_element(By.ID, "stall").is_displayed())
        assert driver.find_element(By.ID, "config-others").text.startswith("1 trainer(s) report a different configuration")
        banner = driver.find_element(By.ID, "stall").text
        assert "No round has completed for 2 min 0 s or more while 4 peer(s) train (28 round(s) failed" in banner, banner
        assert driver.find_element(By.ID, "last-complete").text == "#8, 6 min ago"
        assert "bad" in driver.find_element(By.ID, "last-complete").get_attribute("class")

        shot = tmp_path / "dashboard.png"
        assert driver.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert len(data) > 1000 and data.startswith(b"\x89PNG\r\n\x1a\n")
