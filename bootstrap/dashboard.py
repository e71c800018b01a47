"""The bootstrap node's live web dashboard: one page plus JSON, CSV and Prometheus endpoints.

    GET /                  the dashboard page, bootstrap/static/ (no CDN, fonts or other external resources)
    GET /static/...        its stylesheet and script
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
script and stylesheet (no inline code) backs that up.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from averaging.errors import NetworkError
from peer.loop import PeerLoop

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
            GaugeMetricFamily("swarmtrain_rounds_stalled", "1 if trainers are live but rounds have stopped completing.",
                              value=1.0 if status.get("stalled") else 0.0),
        ]
        if status.get("last_complete_age_s") is not None:  # alert on this: no round completed for too long
            out.append(GaugeMetricFamily("swarmtrain_last_complete_round_age_seconds",
                                         "Seconds since the newest complete round was first seen.",
                                         value=status["last_complete_age_s"]))
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
    """Serves the dashboard on an event loop of its own (a PeerLoop: one thread, which the
    dashboard owns and closes).

    `start()` returns once the port is bound; `close()` stops everything. A Dashboard is started
    at most once. Also usable as a context manager (`with Dashboard(...) as d:`).
    """

    def __init__(self, monitor: Any, host: str, port: int) -> None:
        self._monitor = monitor
        self._host, self._port = host, port
        self._registry = CollectorRegistry(auto_describe=False)   # private: never mixes with the process's metrics
        self._registry.register(_MonitorCollector(monitor))
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="swarmtrain-dashboard-monitor")
        self._loop: PeerLoop | None = None
        self._runner: web.AppRunner | None = None
        self._bound_port: int | None = None
        self._close_lock = threading.Lock()
        self._closed = False

    # ---- lifecycle ----

    def start(self) -> int:
        """Bind host:port (0 = any free port), start serving, and return the bound port.

        Raises NetworkError (one-line message) if the address cannot be bound, e.g. the port is
        in use; nothing is left running then. Raises RuntimeError if called twice.
        """
        if self._loop is not None or self._closed:
            raise RuntimeError("Dashboard.start() may be called only once")
        self._loop = PeerLoop("dashboard").start()
        try:
            self._bound_port = self._loop.call(self._open(), "dashboard start", timeout=START_TIMEOUT_S)
        except Exception as err:  # OSError when the port is taken; a wedged loop times out; anything else too
            self.close()
            # asyncio's bind error repeats the address in its text; the errno's own words are enough.
            errno = getattr(err, "errno", None)
            timed_out = isinstance(err, (TimeoutError, concurrent.futures.TimeoutError))
            reason = (os.strerror(errno) if errno else f"not started within {START_TIMEOUT_S:.0f} s" if timed_out
                      else str(err) or type(err).__name__)
            raise NetworkError(f"dashboard: cannot listen on {self._host}:{self._port}: {reason}".replace("\n", " ")) from err
        log.info("dashboard at %s", self.url)
        return self._bound_port

    def close(self) -> None:
        """Stop serving and the loop. Idempotent; safe before start().

        In-flight requests get SHUTDOWN_GRACE_S to finish; the loop's tasks are then cancelled
        and waited for at most CLOSE_TIMEOUT_S (a monitor call that hangs is left behind).
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self._loop is not None:
            if self._runner is not None:
                try:
                    self._loop.call(self._runner.cleanup(), "dashboard stop", timeout=CLOSE_TIMEOUT_S)
                except Exception as e:  # a request that outlives the grace period: the loop's close cancels it
                    log.warning("dashboard: did not stop cleanly: %s: %s", type(e).__name__, e)
            self._loop.close(timeout=CLOSE_TIMEOUT_S)
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

    # ---- on the loop ----

    async def _open(self) -> int:
        """Serve; the bound port."""
        app = web.Application()
        app.add_routes([
            web.get("/", self._page),
            web.get("/api/status", self._json_route("status")),
            web.get("/api/peers", self._json_route("peers")),
            web.get("/api/ledger", self._json_route("ledger")),
            web.get("/api/ledger.csv", self._ledger_csv),
            web.get("/metrics", self._metrics),
            web.static("/static", STATIC),
        ])
        app.on_response_prepare.append(self._secure)
        # access_log=None: a browser polls three endpoints every 2 s; logging each would drown the node's log.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        return int(self._runner.addresses[0][1])

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

    async def _page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html", headers=_NO_STORE)

    @staticmethod
    async def _secure(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(_SECURITY_HEADERS)


# ---- the page: bootstrap/static/ (index.html, dashboard.css, dashboard.js), package data ----

STATIC = Path(__file__).resolve().parent / "static"

# Only the page's own files may load or run: an injected <script> or <img onerror> would be
# inert even if some future edit used innerHTML by mistake. No inline script or style at all.
_SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
