"""The admin plane's live page: one self-contained HTML document (no build step, no
external assets). Its script reads `/admin/backends` every few seconds and draws, per
backend, health, in flight against capacity, and the learned curves as SVG charts. With
admin keys configured, open it as `/#key=<admin key>`."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>sluiceway</title>
<link rel="icon" href="data:,">
<style>
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.3em; margin: 0 0 .2em; }
#status { color: #666; margin-bottom: 1em; }
#backends { display: flex; flex-wrap: wrap; gap: 1em; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .8em 1em;
        width: 560px; }
.card h2 { font-size: 1.1em; margin: 0 0 .4em; }
.badge { display: inline-block; padding: 0 .5em; border-radius: 3px; color: #fff;
         font-size: .85em; margin-left: .4em; }
.healthy { background: #2a7; } .unknown { background: #888; } .loading { background: #c90; }
.down { background: #c33; } .draining { background: #557; }
.ejected { background: #b50; } .half_open { background: #a80; }
.bar { background: #eee; height: 10px; border-radius: 3px; margin: .3em 0 .6em; }
.bar div { background: #36c; height: 10px; border-radius: 3px; }
.charts { display: flex; gap: .5em; }
.facts { color: #444; font-size: .9em; }
svg text { font-size: 10px; fill: #555; }
.error { color: #c33; }
</style>
</head>
<body>
<h1>sluiceway</h1>
<div id="status">loading...</div>
<div id="backends"></div>
<script>
"use strict";
const REFRESH_MS = 3000;
const key = new URLSearchParams(location.hash.slice(1)).get("key");
const headers = key ? {"Authorization": "Bearer " + key} : {};

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function fmt(value, digits) {
  return value === null || value === undefined ? "-" : Number(value).toFixed(digits);
}

// A line chart of [x, y] points on a log2 x axis (concurrency) from 0 on y.
function chart(title, points, unit) {
  const w = 270, h = 150, left = 40, bottom = 20, top = 18;
  const root = svg("svg", {width: w, height: h, role: "img", "aria-label": title});
  const label = svg("text", {x: left, y: 12});
  label.textContent = title;
  root.appendChild(label);
  root.appendChild(svg("line", {x1: left, y1: h - bottom, x2: w - 5, y2: h - bottom,
                                stroke: "#999"}));
  root.appendChild(svg("line", {x1: left, y1: top, x2: left, y2: h - bottom, stroke: "#999"}));
  if (!points.length) {
    const none = svg("text", {x: left + 10, y: h / 2});
    none.textContent = "nothing learned yet";
    root.appendChild(none);
    return root;
  }
  const maxX = Math.max(2, ...points.map(p => p[0]));
  const maxY = Math.max(...points.map(p => p[1])) * 1.1 || 1;
  const x = c => left + (w - left - 10) * Math.log2(c) / Math.log2(maxX);
  const y = v => h - bottom - (h - bottom - top) * v / maxY;
  root.appendChild(svg("polyline", {
    points: points.map(p => x(p[0]) + "," + y(p[1])).join(" "),
    fill: "none", stroke: "#36c", "stroke-width": 2}));
  for (const p of points) root.appendChild(svg("circle", {cx: x(p[0]), cy: y(p[1]), r: 2.5,
                                                        fill: "#36c"}));
  const yMax = svg("text", {x: 2, y: top + 4});
  yMax.textContent = fmt(maxY, maxY < 10 ? 2 : 0);
  root.appendChild(yMax);
  const xMax = svg("text", {x: w - 40, y: h - 5});
  xMax.textContent = maxX + " conc.";
  root.appendChild(xMax);
  const u = svg("text", {x: 2, y: h - bottom});
  u.textContent = unit;
  root.appendChild(u);
  return root;
}

function card(b) {
  const node = el("div", {class: "card", "data-backend": b.name});
  const head = el("h2", {}, b.name);
  head.appendChild(el("span", {class: "badge " + b.health}, b.health));
  if (b.draining) head.appendChild(el("span", {class: "badge draining"},
                                      b.removing ? "removing" : "draining"));
  if (b.ejection.state !== "active") head.appendChild(el("span", {
      class: "badge " + b.ejection.state}, b.ejection.state.replace("_", "-")));
  node.appendChild(head);
  node.appendChild(el("div", {class: "facts"}, b.kind + " at " + b.url));
  const cap = b.capacity;
  node.appendChild(el("div", {class: "facts"},
    "in flight " + b.in_flight + " / " + (cap === null ? "?" : cap) +
    " - completed " + b.completed + ", failed " + b.failed +
    " - TTFT " + fmt(b.ttft_s, 3) + " s, " + fmt(b.decode_tok_s, 1) + " tok/s per stream"));
  const bar = el("div", {class: "bar"});
  const fill = el("div", {});
  fill.style.width = Math.min(100, 100 * b.in_flight / (cap || Math.max(1, b.in_flight))) + "%";
  bar.appendChild(fill);
  node.appendChild(bar);
  const charts = el("div", {class: "charts"});
  charts.appendChild(chart("throughput (output tok/s) vs concurrency", b.throughput_curve,
                           "tok/s"));
  charts.appendChild(chart("TTFT (s) vs concurrency", b.ttft_curve, "s"));
  node.appendChild(charts);
  return node;
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    const resp = await fetch("/admin/backends", {headers});
    if (!resp.ok) {
      status.className = "error";
      status.textContent = resp.status === 401
        ? "an admin key is needed: open this page as /#key=<admin key>"
        : "HTTP " + resp.status;
      return;
    }
    const pool = await resp.json();
    status.className = "";
    status.textContent = "policy " + pool.policy + " - queue " + pool.queue_depth +
      " - " + pool.backends.length + " backends - " + new Date().toLocaleTimeString();
    document.getElementById("backends").replaceChildren(...pool.backends.map(card));
  } catch (err) {
    status.className = "error";
    status.textContent = "admin plane unreachable: " + err;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
</script>
</body>
</html>
"""
