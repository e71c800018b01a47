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
  drawLoss(s.loss_history);
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
refresh();
