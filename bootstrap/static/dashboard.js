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

// A line chart into an <svg viewBox="0 0 W H">. series: [{cls, pts: [{x, y, title?}], dots?}];
// xFmt formats the axis ends. Never divides by zero: one point or a flat line gets a padded range.
function drawChart(svg, series, {xFmt, xLabel, yFmt, empty}) {
  const W = Number(svg.viewBox.baseVal.width) || 960, H = Number(svg.viewBox.baseVal.height) || 260;
  const L = 60, R = 16, T = 14, B = 30;
  svg.replaceChildren();
  svgEl(svg, "line", {x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis"});
  svgEl(svg, "line", {x1: L, y1: T, x2: L, y2: H - B, class: "axis"});
  const all = series.flatMap((s) => s.pts);
  if (all.length === 0) {
    svgEl(svg, "text", {x: (L + W - R) / 2, y: (T + H - B) / 2, "text-anchor": "middle"}, empty);
    return;
  }
  const xs = all.map((p) => p.x), ys = all.map((p) => p.y);
  const xMin = Math.min(...xs), xMax = Math.max(...xs), yMin = Math.min(...ys), yMax = Math.max(...ys);
  const x0 = xMin === xMax ? xMin - 1 : xMin, x1 = xMin === xMax ? xMax + 1 : xMax;
  const pad = yMin === yMax ? (Math.abs(yMin) * 0.05 || 1) : (yMax - yMin) * 0.05;
  const lo = yMin - pad, hi = yMax + pad;
  const x = (v) => (L + (v - x0) / (x1 - x0) * (W - L - R)).toFixed(1);
  const y = (v) => (T + (hi - v) / (hi - lo) * (H - T - B)).toFixed(1);
  for (const v of yMin === yMax ? [yMax] : [yMax, yMin]) {
    svgEl(svg, "line", {x1: L, y1: y(v), x2: W - R, y2: y(v), class: "grid"});
    svgEl(svg, "text", {x: L - 6, y: Number(y(v)) + 4, "text-anchor": "end"}, yFmt(v));
  }
  svgEl(svg, "text", {x: L, y: H - 10, "text-anchor": "start"}, xFmt(xMin));
  svgEl(svg, "text", {x: W - R, y: H - 10, "text-anchor": "end"}, xFmt(xMax));
  svgEl(svg, "text", {x: (L + W - R) / 2, y: H - 10, "text-anchor": "middle"}, xLabel);
  for (const s of series) {
    if (s.pts.length === 0) continue;
    svgEl(svg, "polyline", {class: s.cls, points: s.pts.map((p) => x(p.x) + "," + y(p.y)).join(" ")});
    if (!s.dots) continue;
    for (const p of s.pts) {
      const c = svgEl(svg, "circle", {class: s.cls + " pt", cx: x(p.x), cy: y(p.y), r: 3});
      if (p.title) svgEl(c, "title", {}, p.title);
    }
  }
}

// The loss plot's x axis: what a run organizer compares runs by (samples), or rounds, or time.
const X_AXES = {
  samples: {key: "samples", label: "samples trained on by the swarm", fmt: (v) => fmtSI(v, "")},
  round: {key: "round", label: "round", fmt: (v) => fmtInt(v)},
  time: {key: "t", label: "time", fmt: fmtClock},
};

// Exponential moving average with the bias at the start corrected (as TensorBoard's smoothing).
function smooth(pts, alpha) {
  let avg = 0, w = 0;
  return pts.map((p) => { avg = alpha * avg + (1 - alpha) * p.y; w = alpha * w + (1 - alpha); return {x: p.x, y: avg / w}; });
}

let lastStatus = null;   // redrawn when the axis or the smoothing changes, without waiting for a poll

function drawLoss(s) {
  const axis = X_AXES[$("loss-x").value] || X_AXES.samples, alpha = Number($("loss-smooth").value);
  $("loss-smooth-value").textContent = alpha.toFixed(2);
  const train = (Array.isArray(s.loss_history) ? s.loss_history : [])
    .filter((p) => p && isNum(p[axis.key]) && isNum(p.loss))
    .map((p) => ({x: p[axis.key], y: p.loss, title: "round " + str(p.round) + " \u00b7 loss " + p.loss.toFixed(4) +
                  " \u00b7 " + fmtInt(p.samples) + " samples \u00b7 " + fmtClock(p.t)}));
  const val = (Array.isArray(s.val_history) ? s.val_history : [])
    .filter((p) => p && isNum(p[axis.key]) && isNum(p.val_loss))
    .map((p) => ({x: p[axis.key], y: p.val_loss, title: "round " + str(p.round) + " \u00b7 validation loss " +
                  p.val_loss.toFixed(4) + " \u00b7 " + fmtInt(p.samples) + " samples"}));
  const svg = $("loss-plot");
  svg.setAttribute("data-points", String(train.length));
  svg.setAttribute("data-val-points", String(val.length));
  // Smoothed: the raw points stay, faint (their titles tell each poll's numbers).
  const trainSeries = alpha > 0 ? [{cls: "raw", pts: train, dots: true}, {cls: "line", pts: smooth(train, alpha)}]
    : [{cls: "line", pts: train, dots: true}];
  drawChart(svg, [...trainSeries, {cls: "val", pts: val, dots: true}], {xFmt: axis.fmt, xLabel: axis.label, yFmt: (v) => v.toFixed(3), empty: "no loss reported yet"});
}

function drawThroughput(history) {
  const pts = (Array.isArray(history) ? history : []).filter((p) => p && isNum(p.t));
  const series = (key) => pts.filter((p) => isNum(p[key])).map((p) => ({x: p.t, y: p[key]}));
  const tp = series("throughput"), peers = series("peers");
  $("throughput-plot").setAttribute("data-points", String(tp.length));
  drawChart($("throughput-plot"), [{cls: "line", pts: tp}], {xFmt: fmtClock, xLabel: "swarm samples/s over time",
    yFmt: (v) => fmtFixed(v, 1), empty: "no throughput reported yet"});
  drawChart($("peers-plot"), [{cls: "line", pts: peers}], {xFmt: fmtClock, xLabel: "live trainers over time",
    yFmt: (v) => fmtFixed(v, 0), empty: "no peers seen yet"});
}

// The run's configuration as most trainers report it: [label, value] rows.
function renderRunConfig(c, others) {
  const rows = !c || typeof c !== "object" ? [] : [
    ["model", fmtInt(c.params) + " parameters"],
    ["sync every", [c.every_steps > 0 ? "H = " + fmtInt(c.every_steps) + " inner steps" : "",
                    c.every_seconds > 0 ? "T = " + fmtFixed(c.every_seconds, 0) + " s" : ""].filter(Boolean).join(", or ")],
    ["outer optimizer", (c.nesterov ? "Nesterov" : "SGD") + ", lr " + fmtFixed(c.outer_lr, 2) + ", momentum " +
                        fmtFixed(c.outer_momentum, 2)],
    ["wire codec", str(c.compression) + (c.fragments > 1 ? ", " + fmtInt(c.fragments) + " fragments (streaming)" : "") +
                   (c.overlap ? ", overlapped with training" : "")],
    ["aggregator", str(c.aggregator)],
    ["group size", fmtInt(c.min_group_size) + " to " + fmtInt(c.max_group_size) + " peers"],
  ];
  fillTable("run-config", rows, ([k, v]) => [[k, "muted"], [v]]);
  const warn = $("config-others");
  warn.hidden = !(isNum(others) && others > 0);
  warn.textContent = warn.hidden ? "" : fmtInt(others) + " trainer(s) report a different configuration: " +
    "check that every peer was started with the run's flags.";
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
  setText("version", str(s.version));
  // When a round last completed, and a warning once rounds stop completing while peers train
  // (a split swarm, or a lone peer failing round after round, used to look healthy here).
  const last = s.last_complete_round === null || s.last_complete_round === undefined ? "none yet"
    : "#" + fmtInt(s.last_complete_round) + ", " + fmtAgo(s.last_complete_age_s);
  setText("last-complete", last, "value " + (s.stalled ? "bad" : "ok"));
  const stall = $("stall");
  stall.hidden = !s.stalled;
  stall.textContent = s.stalled ? "No round has completed for " + fmtDuration(s.stall_after_s) + " or more while " +
    fmtInt(s.peers_live) + " peer(s) train (" + fmtInt(s.failed_since_complete) + " round(s) failed since the last " +
    "complete one): the peers cannot reach each other, or are alone. Check `swarm-peer status` and the peers' logs." : "";
  lastStatus = s;
  drawLoss(s);
  drawThroughput(s.loss_history);
  renderRunConfig(s.run_config, s.config_others);
  renderEvents(s.events);
  const outcome = {complete: "ok", failed: "bad", partial: "warn"};
  const rounds = (Array.isArray(s.rounds) ? s.rounds : []).slice().reverse();   // newest first
  fillTable("rounds", rounds, (r) => [
    [fmtInt(r.round), "num"], [str(r.status), outcome[r.status] || ""],
    [fmtInt(r.complete) + " / " + fmtInt(r.peers), "num", fmtInt(r.failed) + " failed"],
    [fmtDuration(r.duration_s), "num"], [fmtSI(r.bytes, "B"), "num"], [fmtClock(r.t), "num"],
  ]);
}

function renderEvents(events) {
  const newest = (Array.isArray(events) ? events : []).slice().reverse();
  fillTable("events", newest, (e) => [
    [fmtClock(e.t), "num"], [str(e.event), e.event === "joined" ? "ok" : "warn"],
    [str(e.peer_id).slice(-8), "mono", str(e.peer_id)], [str(e.role)], [str(e.device)],
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
for (const id of ["loss-x", "loss-smooth"]) {
  $(id).addEventListener("input", () => { if (lastStatus) drawLoss(lastStatus); });
}
refresh();
