"""The bootstrap node's live web dashboard: one page plus JSON, CSV and Prometheus endpoints.

    GET /                  the dashboard page (self-contained: no CDN, fonts or other external resources)
    GET /api/status        run summary, loss history and recent rounds    (monitor.status())
    GET /api/peers         live peers                                     (monitor.peers())
    GET /api/ledger        contribution leaderboard, best first           (monitor.ledger())
    GET /api/ledger.csv    the leaderboard as a CSV download               (monitor.ledger_csv())
    GET /metrics           Prometheus text exposition, computed from the monitor at scrape time

The data source is any object with those four thread-safe methods (bootstrap.monitor provides
one); nothing here imports it. Monitor calls run in a small worker pool, never on the event
loop, because they take a lock that a slow DHT poll may hold. A monitor call that raises
answers HTTP 500 with {"error": "..."}; the server keeps serving.

Everything a peer reports (ids, device names, versions) is untrusted: the page inserts it
with textContent only, and a Content-Security-Policy that allows nothing but the page's own
inline script and style (pinned by hash) backs that up.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from averaging.errors import NetworkError

log = logging.getLogger("swarmtrain.bootstrap.dashboard")

START_TIMEOUT_S = 10.0   # binding a socket is instant; this only guards against a wedged loop
CLOSE_TIMEOUT_S = 5.0    # close() never blocks longer than about this
SHUTDOWN_GRACE_S = 2.0   # in-flight requests get this long to finish when closing
_NO_STORE = {"Cache-Control": "no-store"}


def _jsonable(x: Any) -> Any:
    """Replace NaN/±inf (a diverging loss) with null: json.dumps would emit NaN, which browsers reject."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


class _MonitorCollector(Collector):
    """Turns monitor data into Prometheus metric families at scrape time."""

    def __init__(self, monitor: Any) -> None:
        self._monitor = monitor

    def collect(self) -> Iterable[Metric]:
        # Read everything first, so a failing monitor call yields an error, not half a scrape.
        status, peers = self._monitor.status(), self._monitor.peers()
        out: list[Metric] = [
            GaugeMetricFamily("swarmtrain_peers_live", "Live peers in the run.", value=status["peers_live"]),
            GaugeMetricFamily("swarmtrain_round", "Newest round reached by a live peer.", value=status["round"]),
            GaugeMetricFamily("swarmtrain_peers_agree", "1 if all peers at the newest round hold the same parameters.",
                              value=1.0 if status["agree"] else 0.0),
            GaugeMetricFamily("swarmtrain_throughput_samples_per_second", "Swarm training throughput.",
                              value=status["throughput_samples_per_s"]),
            CounterMetricFamily("swarmtrain_samples", "Samples trained on by the swarm.", value=status["total_samples"]),
        ]
        if status.get("mean_loss") is not None:
            out.append(GaugeMetricFamily("swarmtrain_train_loss", "Mean training loss of live peers.",
                                         value=status["mean_loss"]))
        rounds = CounterMetricFamily("swarmtrain_rounds", "Sync rounds seen by this node, by outcome.", labels=["status"])
        # Counted by the monitor, once per settled round (one older than the newest), so it never goes down.
        for outcome, n in sorted(status.get("rounds_total", {}).items()):
            rounds.add_metric([str(outcome)], n)
        out.append(rounds)
        speed = GaugeMetricFamily("swarmtrain_peer_samples_per_second", "Training throughput of one peer.", labels=["peer"])
        credit = GaugeMetricFamily("swarmtrain_peer_credit", "Estimated compute contributed by one peer (FLOP).",
                                   labels=["peer"])
        seen: set[str] = set()
        for p in peers:
            sid = str(p["short_id"])
            if sid in seen:   # short ids come from peers; a duplicate label set would break the scrape
                continue
            seen.add(sid)
            speed.add_metric([sid], p["samples_per_s"])
            credit.add_metric([sid], p["credit"])
        out += [speed, credit]
        return out


class Dashboard:
    """Serves the dashboard from one daemon thread that owns its own asyncio event loop.

    `start()` returns once the port is bound; `close()` stops everything. A Dashboard is started
    at most once. Also usable as a context manager (`with Dashboard(...) as d:`).
    """

    def __init__(self, monitor: Any, host: str, port: int) -> None:
        self._monitor = monitor
        self._host, self._port = host, port
        self._registry = CollectorRegistry(auto_describe=False)   # private: never mixes with the process's metrics
        self._registry.register(_MonitorCollector(monitor))
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="swarmtrain-dashboard-monitor")
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._start_error: BaseException | None = None
        self._bound_port: int | None = None
        self._close_lock = threading.Lock()
        self._closed = False

    # ---- lifecycle ----

    def start(self) -> int:
        """Bind host:port (0 = any free port), start serving, and return the bound port.

        Raises NetworkError (one-line message) if the address cannot be bound, e.g. the port is
        in use; nothing is left running then. Raises RuntimeError if called twice.
        """
        if self._thread is not None or self._closed:
            raise RuntimeError("Dashboard.start() may be called only once")
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="swarmtrain-dashboard", daemon=True)
        self._thread.start()
        if not ready.wait(START_TIMEOUT_S):
            self.close()
            raise NetworkError(f"dashboard: could not start on {self._host}:{self._port} within {START_TIMEOUT_S:.0f} s")
        if self._start_error is not None:
            err = self._start_error
            self.close()
            # asyncio's bind error repeats the address in its text; the errno's own words are enough.
            errno = getattr(err, "errno", None)
            reason = os.strerror(errno) if errno else (str(err) or type(err).__name__)
            raise NetworkError(f"dashboard: cannot listen on {self._host}:{self._port}: {reason}".replace("\n", " ")) from err
        assert self._bound_port is not None
        log.info("dashboard at %s", self.url)
        return self._bound_port

    def close(self) -> None:
        """Stop serving and join the thread. Idempotent; safe before start().

        In-flight requests get SHUTDOWN_GRACE_S to finish. Bounded: if the thread has not ended
        after CLOSE_TIMEOUT_S (a monitor call hung), it is logged and left behind (it is a daemon).
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        loop, thread = self._loop, self._thread
        if loop is not None:
            try:
                loop.call_soon_threadsafe(loop.stop)
            except RuntimeError:   # the loop already closed itself (failed start)
                pass
        if thread is not None:
            thread.join(CLOSE_TIMEOUT_S)
            if thread.is_alive():
                log.warning("dashboard: server thread did not stop within %.0f s", CLOSE_TIMEOUT_S)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "Dashboard":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def port(self) -> int:
        """The bound port once started, else the requested one."""
        return self._bound_port if self._bound_port is not None else self._port

    @property
    def url(self) -> str:
        """Where a browser on this machine reaches the page (wildcard hosts map to loopback)."""
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self._host, self._host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"

    # ---- the server thread ----

    def _serve(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._open())
            except BaseException as e:   # OSError when the port is taken; anything else is reported too
                self._start_error = e
                # Clean up before start() returns: once it has, the owner may call close(),
                # whose loop.stop() would cut this cleanup short.
                self._shutdown(loop)
                return
            ready.set()
            loop.run_forever()   # until close() calls loop.stop()
            self._shutdown(loop)
        finally:
            ready.set()
            loop.close()

    def _shutdown(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            if self._runner is not None:
                loop.run_until_complete(self._runner.cleanup())
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        except Exception:
            log.exception("dashboard: error while shutting down")

    async def _open(self) -> None:
        app = web.Application()
        app.add_routes([
            web.get("/", self._page),
            web.get("/api/status", self._json_route("status")),
            web.get("/api/peers", self._json_route("peers")),
            web.get("/api/ledger", self._json_route("ledger")),
            web.get("/api/ledger.csv", self._ledger_csv),
            web.get("/metrics", self._metrics),
        ])
        # access_log=None: a browser polls three endpoints every 2 s; logging each would drown the node's log.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        self._bound_port = int(self._runner.addresses[0][1])

    # ---- handlers ----

    async def _off_loop(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    @staticmethod
    def _error(what: str, e: Exception) -> web.Response:
        log.warning("dashboard: %s failed: %s: %s", what, type(e).__name__, e)
        return web.json_response({"error": f"{type(e).__name__}: {e}"}, status=500, headers=_NO_STORE)

    def _json_route(self, method: str) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            try:
                text = await self._off_loop(lambda: json.dumps(_jsonable(getattr(self._monitor, method)()),
                                                               allow_nan=False))
            except Exception as e:
                return self._error(method, e)
            return web.Response(text=text, content_type="application/json", headers=_NO_STORE)
        return handler

    async def _ledger_csv(self, request: web.Request) -> web.Response:
        try:
            text = await self._off_loop(lambda: str(self._monitor.ledger_csv()))
        except Exception as e:
            return self._error("ledger_csv", e)
        return web.Response(text=text, content_type="text/csv", headers={
            **_NO_STORE, "Content-Disposition": 'attachment; filename="swarmtrain-ledger.csv"'})

    async def _metrics(self, request: web.Request) -> web.Response:
        try:
            body = await self._off_loop(lambda: generate_latest(self._registry))
        except Exception as e:
            return self._error("metrics", e)
        return web.Response(body=body, headers={**_NO_STORE, "Content-Type": CONTENT_TYPE_LATEST})

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(text=_PAGE, content_type="text/html", headers=_PAGE_HEADERS)


# ---- the page ----

_CSS = """
:root { --bg: #0f1419; --panel: #171d24; --line: #2a323c; --text: #d8dee6; --muted: #8b96a3;
        --accent: #4fa3f7; --ok: #3fb950; --bad: #f85149; --warn: #d29922; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px; background: var(--bg); color: var(--text);
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
header { display: flex; align-items: baseline; gap: 16px; flex-wrap: wrap; margin-bottom: 16px; }
h1 { font-size: 20px; margin: 0; font-weight: 600; }
h2 { font-size: 15px; margin: 0 0 10px; font-weight: 600; display: flex; gap: 12px; align-items: baseline; }
a { color: var(--accent); }
.muted { color: var(--muted); font-weight: 400; }
.mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.pill { padding: 1px 10px; border-radius: 10px; font-size: 12px; border: 1px solid var(--line); color: var(--muted); }
.pill.ok { color: var(--ok); border-color: var(--ok); }
.pill.bad { color: var(--bad); border-color: var(--bad); }
.stats { display: grid; grid-template-columns: repeat(auto-fit, minmax(140px, 1fr)); gap: 12px; margin-bottom: 16px; }
.stat, section.panel { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; }
.stat { padding: 10px 14px; }
.stat .label { display: block; color: var(--muted); font-size: 12px; }
.stat .value { display: block; font-size: 20px; font-weight: 600; font-variant-numeric: tabular-nums; }
section.panel { padding: 14px 16px; margin-bottom: 16px; overflow-x: auto; }
table { width: 100%; border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 10px; text-align: left; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { color: var(--muted); font-weight: 500; font-size: 12px; }
td.num, th.num { text-align: right; }
tbody tr:hover { background: #1d252e; }
.ok { color: var(--ok); } .bad { color: var(--bad); } .warn { color: var(--warn); }
.empty { color: var(--muted); margin: 8px 0 0; }
#loss-plot { width: 100%; height: auto; display: block; }
#loss-plot .axis { stroke: var(--muted); stroke-width: 1; }
#loss-plot .grid { stroke: var(--line); stroke-dasharray: 3 4; }
#loss-plot .line { fill: none; stroke: var(--accent); stroke-width: 2; }
#loss-plot .pt { fill: var(--accent); }
#loss-plot .pt:hover { fill: #fff; }
#loss-plot text { fill: var(--muted); font-size: 11px; }
footer { color: var(--muted); font-size: 12px; }
"""

_JS = r"""
"use strict";
const $ = (id) => document.getElementById(id);
const SVG_NS = "http://www.w3.org/2000/svg";
const DASH = "\u2013";
const POLL_MS = 2000;

// Formatters accept anything: values come from untrusted peers, so never assume a number.
const isNum = (x) => typeof x === "number" && isFinite(x);
const fmtInt = (x) => isNum(x) ? Math.round(x).toLocaleString("en-US") : DASH;
const fmtFixed = (x, d) => isNum(x) ? x.toFixed(d) : DASH;
function fmtSI(x, unit) {            // 1.2 PFLOP, 34 MB
  if (!isNum(x)) return DASH;
  const prefixes = ["", "k", "M", "G", "T", "P", "E", "Z", "Y"];
  let v = Math.abs(x), i = 0;
  while (v >= 1000 && i < prefixes.length - 1) { v /= 1000; i++; }
  const s = i === 0 ? String(Math.round(v)) : v.toFixed(v < 100 ? 1 : 0);
  return (x < 0 ? "-" : "") + s + " " + prefixes[i] + unit;
}
function fmtDuration(s) {
  if (!isNum(s)) return DASH;
  if (s < 60) return s.toFixed(1) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}
function fmtAgo(s) {
  if (!isNum(s)) return DASH;
  s = Math.max(0, s);
  if (s < 60) return Math.round(s) + " s ago";
  if (s < 3600) return Math.floor(s / 60) + " min ago";
  return Math.floor(s / 3600) + " h ago";
}
const fmtClock = (t) => isNum(t) ? new Date(t * 1000).toLocaleTimeString("en-GB") : DASH;
const str = (x) => (x === null || x === undefined) ? DASH : String(x);

function setText(id, text, cls) {
  const el = $(id);
  el.textContent = text;
  if (cls !== undefined) el.className = cls;
}

// One <tr> per item; cells(item) gives [text, className?, title?] triples. textContent only.
function fillTable(id, items, cells) {
  const rows = items.map((item) => {
    const tr = document.createElement("tr");
    for (const [text, cls, title] of cells(item)) {
      const td = document.createElement("td");
      td.textContent = text;
      if (cls) td.className = cls;
      if (title) td.title = title;
      tr.appendChild(td);
    }
    return tr;
  });
  $(id).tBodies[0].replaceChildren(...rows);
  $(id + "-empty").hidden = rows.length > 0;
}

function svgEl(parent, name, attrs, text) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  parent.appendChild(el);
  return el;
}

function drawLoss(history) {
  const svg = $("loss-plot");
  const W = 960, H = 260, L = 60, R = 16, T = 14, B = 30;
  const pts = (Array.isArray(history) ? history : []).filter((p) => p && isNum(p.t) && isNum(p.loss));
  svg.replaceChildren();
  svg.setAttribute("data-points", String(pts.length));
  svgEl(svg, "line", {x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis"});
  svgEl(svg, "line", {x1: L, y1: T, x2: L, y2: H - B, class: "axis"});
  if (pts.length === 0) {
    svgEl(svg, "text", {x: (L + W - R) / 2, y: (T + H - B) / 2, "text-anchor": "middle"}, "no loss reported yet");
    return;
  }
  const ts = pts.map((p) => p.t), ls = pts.map((p) => p.loss);
  const tMin = Math.min(...ts), tMax = Math.max(...ts), lMin = Math.min(...ls), lMax = Math.max(...ls);
  // Pad degenerate ranges (one point, flat loss) so the scale never divides by zero.
  const t0 = tMin === tMax ? tMin - 1 : tMin, t1 = tMin === tMax ? tMax + 1 : tMax;
  const pad = lMin === lMax ? (Math.abs(lMin) * 0.05 || 1) : (lMax - lMin) * 0.05;
  const lo = lMin - pad, hi = lMax + pad;
  const x = (t) => L + (t - t0) / (t1 - t0) * (W - L - R);
  const y = (v) => T + (hi - v) / (hi - lo) * (H - T - B);
  for (const v of lMin === lMax ? [lMax] : [lMax, lMin]) {
    svgEl(svg, "line", {x1: L, y1: y(v), x2: W - R, y2: y(v), class: "grid"});
    svgEl(svg, "text", {x: L - 6, y: y(v) + 4, "text-anchor": "end"}, v.toFixed(3));
  }
  svgEl(svg, "text", {x: L, y: H - 10, "text-anchor": "start"}, fmtClock(tMin));
  svgEl(svg, "text", {x: W - R, y: H - 10, "text-anchor": "end"}, fmtClock(tMax));
  svgEl(svg, "text", {x: (L + W - R) / 2, y: H - 10, "text-anchor": "middle"}, "swarm train loss over time");
  svgEl(svg, "polyline", {class: "line", points: pts.map((p) => x(p.t).toFixed(1) + "," + y(p.loss).toFixed(1)).join(" ")});
  for (const p of pts) {
    const c = svgEl(svg, "circle", {class: "pt", cx: x(p.t).toFixed(1), cy: y(p.loss).toFixed(1), r: 3});
    svgEl(c, "title", {}, "round " + str(p.round) + " \u00b7 loss " + p.loss.toFixed(4) + " \u00b7 " +
          fmtInt(p.samples) + " samples \u00b7 " + fmtClock(p.t));
  }
}

function renderStatus(s) {
  setText("run-id", str(s.run_id));
  setText("round", fmtInt(s.round));
  setText("peers-live", fmtInt(s.peers_live));
  setText("throughput", fmtFixed(s.throughput_samples_per_s, 1));
  setText("total-samples", fmtInt(s.total_samples));
  setText("mean-loss", fmtFixed(s.mean_loss, 4));
  setText("agree", s.agree ? "yes" : "no", "value " + (s.agree ? "ok" : "bad"));
  setText("updated", fmtClock(s.updated));
  drawLoss(s.loss_history);
  const outcome = {complete: "ok", failed: "bad", partial: "warn"};
  const rounds = (Array.isArray(s.rounds) ? s.rounds : []).slice().reverse();   // newest first
  fillTable("rounds", rounds, (r) => [
    [fmtInt(r.round), "num"], [str(r.status), outcome[r.status] || ""],
    [fmtInt(r.complete) + " / " + fmtInt(r.peers), "num", fmtInt(r.failed) + " failed"],
    [fmtDuration(r.duration_s), "num"], [fmtSI(r.bytes, "B"), "num"], [fmtClock(r.t), "num"],
  ]);
}

function renderPeers(peers) {
  fillTable("peers", Array.isArray(peers) ? peers : [], (p) => [
    [str(p.short_id), "mono", str(p.peer_id)], [str(p.role), p.role === "archivist" ? "warn" : ""],
    [str(p.device)], [fmtFixed(p.samples_per_s, 1), "num"], [fmtFixed(p.loss, 4), "num"],
    [fmtInt(p.round), "num"], [fmtSI(p.credit, "FLOP"), "num"], [fmtAgo(p.age_s), "num", fmtClock(p.last_seen)],
  ]);
}

function renderLedger(ledger) {
  fillTable("leaderboard", Array.isArray(ledger) ? ledger : [], (e) => [
    [fmtInt(e.rank), "num"], [str(e.short_id), "mono", str(e.peer_id)], [str(e.device)],
    [fmtInt(e.samples), "num"], [fmtDuration(e.compute_s), "num"], [fmtInt(e.rounds), "num"],
    [fmtSI(e.credit, "FLOP"), "num"],
  ]);
}

async function getJSON(url) {
  const r = await fetch(url, {cache: "no-store"});
  if (!r.ok) {
    let msg = "HTTP " + r.status;
    try { msg = (await r.json()).error || msg; } catch (e) { /* not JSON */ }
    throw new Error(url + ": " + msg);
  }
  return r.json();
}

// Relative URLs, so the page also works behind a reverse proxy under a path prefix.
const SOURCES = [["api/status", renderStatus], ["api/peers", renderPeers], ["api/ledger", renderLedger]];

async function refresh() {
  try {
    const results = await Promise.allSettled(SOURCES.map(([url]) => getJSON(url)));
    const errors = [];
    results.forEach((res, i) => {
      if (res.status !== "fulfilled") { errors.push(String(res.reason && res.reason.message || res.reason)); return; }
      try { SOURCES[i][1](res.value); } catch (e) { errors.push(SOURCES[i][0] + ": " + e); }
    });
    const conn = $("conn");
    conn.textContent = errors.length ? "error" : "live";
    conn.className = "pill " + (errors.length ? "bad" : "ok");
    conn.title = errors.join("\n");
  } finally {
    setTimeout(refresh, POLL_MS);   // after completion, so a slow server never piles up requests
  }
}
refresh();
"""

_BODY = """<body>
<header>
  <h1>swarmtrain <span class="muted">run</span> <span id="run-id" class="mono">&ndash;</span></h1>
  <span id="conn" class="pill">connecting&hellip;</span>
</header>
<div class="stats">
  <div class="stat"><span class="label">round</span><span id="round" class="value">&ndash;</span></div>
  <div class="stat"><span class="label">live peers</span><span id="peers-live" class="value">&ndash;</span></div>
  <div class="stat"><span class="label">throughput (samples/s)</span><span id="throughput" class="value">&ndash;</span></div>
  <div class="stat"><span class="label">total samples</span><span id="total-samples" class="value">&ndash;</span></div>
  <div class="stat"><span class="label">mean train loss</span><span id="mean-loss" class="value">&ndash;</span></div>
  <div class="stat"><span class="label">peers agree</span><span id="agree" class="value">&ndash;</span></div>
  <div class="stat"><span class="label">last update</span><span id="updated" class="value">&ndash;</span></div>
</div>
<section class="panel">
  <h2>Swarm loss</h2>
  <svg id="loss-plot" viewBox="0 0 960 260" data-points="0" role="img" aria-label="swarm training loss over time"></svg>
</section>
<section class="panel">
  <h2>Active peers</h2>
  <table id="peers">
    <thead><tr><th>peer</th><th>role</th><th>device</th><th class="num">samples/s</th><th class="num">loss</th>
      <th class="num">round</th><th class="num">contribution</th><th class="num">last seen</th></tr></thead>
    <tbody></tbody>
  </table>
  <p id="peers-empty" class="empty">no live peers</p>
</section>
<section class="panel">
  <h2>Leaderboard <a href="api/ledger.csv" download>CSV</a></h2>
  <table id="leaderboard">
    <thead><tr><th class="num">rank</th><th>peer</th><th>device</th><th class="num">samples</th>
      <th class="num">compute time</th><th class="num">rounds</th><th class="num">credit</th></tr></thead>
    <tbody></tbody>
  </table>
  <p id="leaderboard-empty" class="empty">no contributions yet</p>
</section>
<section class="panel">
  <h2>Recent rounds</h2>
  <table id="rounds">
    <thead><tr><th class="num">round</th><th>outcome</th><th class="num">complete / peers</th>
      <th class="num">duration</th><th class="num">bytes</th><th class="num">finished</th></tr></thead>
    <tbody></tbody>
  </table>
  <p id="rounds-empty" class="empty">no rounds yet</p>
</section>
<footer>machine-readable: <a href="api/status">status</a> &middot; <a href="api/peers">peers</a> &middot;
  <a href="api/ledger">ledger</a> &middot; <a href="api/ledger.csv">ledger.csv</a> &middot; <a href="metrics">metrics</a></footer>
"""

_PAGE = ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n'
         '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
         '<title>swarmtrain dashboard</title>\n<link rel="icon" href="data:,">\n'
         f"<style>{_CSS}</style></head>\n{_BODY}<script>{_JS}</script>\n</body></html>\n")


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# Only this page's own inline script and style may run: an injected <script> or <img onerror>
# would be inert even if some future edit used innerHTML by mistake.
_PAGE_HEADERS = {
    "Content-Security-Policy": (f"default-src 'none'; script-src {_csp_hash(_JS)}; style-src {_csp_hash(_CSS)}; "
                                "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                                "frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
