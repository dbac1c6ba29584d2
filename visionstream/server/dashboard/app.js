// visionstream dashboard: tiles from /streams, boxes from /ws, frames from latest.jpg, health from /stats.
// Plain browser JavaScript, no build step, nothing fetched from anywhere but this server.
"use strict";

const STREAMS_EVERY_MS = 2000;   // per-stream counters and the tile list
const STATS_EVERY_MS = 2000;     // the server panel (the server samples its history every 2 s)
// Frames are fetched at most this often per tile, and all tiles together at most FRAMES_PER_S: each one is
// a JPEG decode in the browser (15-25 ms of CPU for 810x1080 on the 2-core test box), and the browser may
// share the server's cores (docs/BENCHMARKS.md, Dashboard). Decoding straight to the tile's size
// (createImageBitmap) costs about a third less than an <img> showing the full-size frame.
const TILE_MIN_MS = 250;
const FRAMES_PER_S = 4;
const PALETTE = ["#4cc2ff", "#ffb547", "#3ddc84", "#ff6b9a", "#b48cff", "#ffe156", "#5ce1e6", "#ff8a4c",
                 "#9be15d", "#f06bff"];

let token = null;
const tiles = new Map();         // stream name -> tile state
let ws = null, wsEvery = 0, wsBackoff = 500, running = false;
let timers = [];

// ------------------------------------------------------------------ access

function readToken() {
  const params = new URLSearchParams(location.search);
  const fromUrl = params.get("token");
  if (fromUrl !== null) {
    sessionStorage.setItem("visionstream-token", fromUrl);
    params.delete("token");  // out of the address bar, the history and any screenshot
    const q = params.toString();
    history.replaceState(null, "", location.pathname + (q ? "?" + q : "") + location.hash);
    return fromUrl;
  }
  return sessionStorage.getItem("visionstream-token");
}

class Unauthorized extends Error {}

async function api(path) {
  const headers = token ? {Authorization: "Bearer " + token} : {};
  const r = await fetch(path, {headers, cache: "no-store"});
  if (r.status === 401) throw new Unauthorized();
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r;
}

function showPrompt(message) {
  stop();
  document.getElementById("app").hidden = true;
  document.getElementById("prompt").hidden = false;
  const err = document.getElementById("token-error");
  err.textContent = message || "";
  err.hidden = !message;
  document.getElementById("token-input").focus();
}

document.getElementById("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  token = document.getElementById("token-input").value;
  sessionStorage.setItem("visionstream-token", token);
  start();
});

async function start() {
  try {
    const body = await (await api("/streams")).json();
    document.getElementById("prompt").hidden = true;
    document.getElementById("app").hidden = false;
    running = true;
    applyStreams(body);
    connectWs();
    refreshStats();
    timers.push(setInterval(refreshStreams, STREAMS_EVERY_MS));
    timers.push(setInterval(refreshStats, STATS_EVERY_MS));
    timers.push(setInterval(pumpFrames, 50));
  } catch (e) {
    if (e instanceof Unauthorized) {
      showPrompt(token ? "That token was refused." : "");
    } else {
      setConn("down", "server unreachable");
      setTimeout(start, 2000);
    }
  }
}

function stop() {
  running = false;
  timers.forEach(clearInterval);
  timers = [];
  if (ws) { ws.onclose = null; ws.close(); ws = null; }
}

function failed(e) {
  if (e instanceof Unauthorized) showPrompt("The token was refused.");
  else setConn("down", "server unreachable");
}

function setConn(state, text) {
  const el = document.getElementById("conn");
  el.dataset.state = state;
  el.textContent = text;
}

// ------------------------------------------------------------------ live results

// Each tile's frame interval: the frame budget shared by the tiles.
function frameInterval() { return Math.max(TILE_MIN_MS, 1000 * tiles.size / FRAMES_PER_S); }

function connectWs() {
  const url = new URL("/ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (token) url.searchParams.set("token", token);  // a browser WebSocket cannot send headers
  // The server samples for us: each stream's newest result once per frame interval, not every result.
  wsEvery = Math.round(frameInterval());
  url.searchParams.set("every_ms", String(wsEvery));
  ws = new WebSocket(url);
  ws.onopen = () => { wsBackoff = 500; setConn("live", "live"); };
  ws.onmessage = (ev) => onResult(JSON.parse(ev.data));
  ws.onclose = (ev) => {
    ws = null;
    if (!running) return;
    if (ev.code === 1008) { showPrompt("The token was refused."); return; }
    setConn("down", ev.code === 1013 ? "too many viewers, retrying" : "reconnecting");
    setTimeout(() => { if (running) connectWs(); }, wsBackoff);
    wsBackoff = Math.min(wsBackoff * 2, 8000);
  };
}

// A result says its stream has a newer frame; the boxes drawn come with the frame itself (X-Detections),
// so they are always those of the picture shown.
function onResult(msg) {
  if (msg.type !== "result") return;
  const t = tiles.get(msg.stream_name) || addTile(msg.stream_name);
  if (t.newest === null || msg.frame_id !== t.shown) t.newest = msg.frame_id;
}

function resampleWs() {  // the tile count changed the frame interval: ask the server for the new rate
  const want = Math.round(frameInterval());
  if (ws && ws.readyState === WebSocket.OPEN && Math.abs(want - wsEvery) > wsEvery / 4) {
    ws.onclose = null;
    ws.close();
    connectWs();
  }
}

// ------------------------------------------------------------------ tiles

function addTile(name) {
  const el = document.getElementById("tile-template").content.firstElementChild.cloneNode(true);
  el.dataset.stream = name;
  el.querySelector(".name").textContent = name;
  el.querySelector(".name").title = name;
  const t = {name, el, frame: el.querySelector("canvas.frame"), canvas: el.querySelector("canvas.boxes"),
             newest: null, shown: null, current: null, fetching: false, lastFetch: 0, bitmap: null, size: null,
             blob: null};
  new ResizeObserver(() => redraw(t)).observe(t.canvas);
  tiles.set(name, t);
  const grid = document.getElementById("grid");
  const after = [...grid.children].find((c) => c.dataset.stream > name);
  grid.insertBefore(el, after || null);
  document.getElementById("empty").hidden = true;
  return t;
}

function removeTile(t) {
  t.el.remove();
  if (t.bitmap) t.bitmap.close();
  tiles.delete(t.name);
}

async function refreshStreams() {
  try {
    applyStreams(await (await api("/streams")).json());
  } catch (e) { failed(e); }
}

function applyStreams(body) {
  const seen = new Set();
  for (const s of body.streams) {
    seen.add(s.name);
    const t = tiles.get(s.name) || addTile(s.name);
    if (t.el.dataset.connected !== String(s.connected)) t.el.dataset.connected = String(s.connected);
    // Without /ws results (a viewer that lost some, or a stream it missed) the counters still move frames on.
    if (s.last_frame_id !== null && s.last_frame_id !== t.shown) t.newest = s.last_frame_id;
    if (s.image_size) t.size = s.image_size;
    t.el.querySelector(".lossless").hidden = !s.lossless;
    setIn(t.el, ".fps", s.connected ? s.fps.toFixed(1) + " fps" : "");
    const lat = s.latency_ms;
    setIn(t.el, ".lat", lat.p50 === null ? "no results yet"
      : "p50 " + fmtMs(lat.p50) + " · p99 " + fmtMs(lat.p99) + " ms · " + s.processed.toLocaleString() + " done");
    const drops = t.el.querySelector(".drops");
    const dropsText = JSON.stringify(s.drops_by_reason);
    if (drops.dataset.drops === dropsText) continue;  // unchanged: no DOM work (each change is a repaint)
    drops.dataset.drops = dropsText;
    drops.replaceChildren();
    const reasons = Object.entries(s.drops_by_reason).sort((a, b) => b[1] - a[1]);
    if (reasons.length) drops.append("drops");
    for (const [reason, n] of reasons) {
      const chip = document.createElement("span");
      chip.className = "chip";
      chip.textContent = reason + " " + n.toLocaleString();
      drops.append(chip);
    }
  }
  for (const t of [...tiles.values()]) if (!seen.has(t.name)) removeTile(t);  // gone for longer than gone_after_s
  document.getElementById("empty").hidden = tiles.size > 0;
  resampleWs();
}

function pumpFrames() {
  if (document.hidden) return;  // a tab in the background fetches nothing
  // Fairly spread the frame budget: the tile that waited longest goes first.
  const now = performance.now();
  const interval = frameInterval();
  const due = [...tiles.values()].filter((t) => !t.fetching && t.newest !== null && t.newest !== t.shown
                                                && now - t.lastFetch >= interval);
  due.sort((a, b) => a.lastFetch - b.lastFetch);
  for (const t of due) fetchFrame(t);
}

async function fetchFrame(t) {
  t.fetching = true;
  t.lastFetch = performance.now();
  try {
    const r = await api("/streams/" + encodeURIComponent(t.name) + "/latest.jpg");
    const fid = Number(r.headers.get("X-Frame-Id"));
    const size = (r.headers.get("X-Image-Size") || "").split(",").map(Number);
    const detections = JSON.parse(r.headers.get("X-Detections") || "[]");
    const blob = await r.blob();
    if (fid === t.shown) { t.newest = fid; return; }
    t.blob = blob;
    t.current = {frame_id: fid, detections, image_size: size.length === 2 && size[0] > 0 ? size : null};
    await paintFrame(t);
    t.shown = fid;
    t.el.dataset.frameId = String(fid);
    t.el.querySelector(".fid").textContent = "frame " + fid;
  } catch (e) {
    if (e instanceof Unauthorized) failed(e);  // a 404 (stream just left) is retried at its next result
  } finally {
    t.fetching = false;
  }
}

// ------------------------------------------------------------------ drawing

// Where the image sits in a w x h view (letterboxed: object-fit contain), in device pixels.
function fit(w, h, iw, ih) {
  const s = Math.min(w / iw, h / ih);
  const dw = Math.max(1, Math.round(iw * s)), dh = Math.max(1, Math.round(ih * s));
  return {s, dw, dh, ox: Math.round((w - dw) / 2), oy: Math.round((h - dh) / 2)};
}

function viewSize(c) {
  const dpr = window.devicePixelRatio || 1;
  return [Math.round(c.clientWidth * dpr), Math.round(c.clientHeight * dpr)];
}

async function paintFrame(t) {
  const [w, h] = viewSize(t.frame);
  if (!w || !h || !t.current) return;
  const fid = t.current.frame_id;
  let size = t.current.image_size || t.size;
  let bmp;
  if (size) {  // decoded straight to the size it is shown at
    const f = fit(w, h, size[0], size[1]);
    bmp = await createImageBitmap(t.blob, {resizeWidth: f.dw, resizeHeight: f.dh, resizeQuality: "low"});
  } else {
    bmp = await createImageBitmap(t.blob);
    size = [bmp.width, bmp.height];
  }
  if (t.bitmap) t.bitmap.close();
  t.bitmap = bmp;
  t.size = size;
  const c = t.frame;
  if (c.width !== w || c.height !== h) { c.width = w; c.height = h; }
  const f = fit(w, h, size[0], size[1]);
  const ctx = c.getContext("2d");
  ctx.clearRect(0, 0, w, h);
  ctx.drawImage(bmp, f.ox, f.oy, f.dw, f.dh);
  c.dataset.width = String(size[0]);  // the frame's own size, as an <img> would give naturalWidth
  c.dataset.height = String(size[1]);
  c.dataset.frameId = String(fid);
  draw(t);
}

function redraw(t) {
  if (t.blob && t.current) paintFrame(t); else draw(t);
}

function colorFor(cls) { return PALETTE[((cls % PALETTE.length) + PALETTE.length) % PALETTE.length]; }

function fmtConf(c) { return c.toFixed(2); }

function fmtMs(v) { return v === null || v === undefined ? "–" : v < 10 ? v.toFixed(1) : Math.round(v).toString(); }

function draw(t) {
  const c = t.canvas;
  const dpr = window.devicePixelRatio || 1;
  const [w, h] = viewSize(c);
  if (!w || !h) return;
  if (c.width !== w || c.height !== h) { c.width = w; c.height = h; }
  const ctx = c.getContext("2d");
  ctx.clearRect(0, 0, w, h);
  const res = t.current;
  if (!res || !t.size) {
    c.dataset.boxes = "[]";
    c.dataset.labels = "";
    delete c.dataset.frameId;
    return;
  }
  // The image is letterboxed into the tile (object-fit: contain): boxes follow the same transform.
  const fid = res.frame_id;
  const [iw, ih] = res.image_size || t.size;
  const {s, ox, oy} = fit(w, h, iw, ih);
  const font = Math.max(11, Math.round(12 * dpr));
  ctx.font = "600 " + font + "px system-ui, sans-serif";
  ctx.textBaseline = "top";
  ctx.lineWidth = Math.max(2, 2 * dpr);
  const drawn = [];
  const placed = [];  // the label rectangles so far: a label that would cover one steps down past it
  for (const d of res.detections) {  // every box first, so that no box line crosses a label
    const [x1, y1, x2, y2] = d.bbox;
    ctx.strokeStyle = colorFor(d.cls);
    ctx.strokeRect(ox + x1 * s, oy + y1 * s, (x2 - x1) * s, (y2 - y1) * s);
  }
  for (const d of res.detections) {
    const [x1, y1] = d.bbox;
    const x = ox + x1 * s, y = oy + y1 * s;
    const color = colorFor(d.cls);
    const tracked = d.track_id !== undefined && d.track_id !== null;
    const text = d.label + (tracked ? " #" + d.track_id : "") + " " + fmtConf(d.conf);
    const tw = ctx.measureText(text).width + 8, th = font + 6;
    let ty = y - th >= 0 ? y - th : y;
    const tx = Math.max(0, Math.min(x - ctx.lineWidth / 2, w - tw));  // a box at the right edge keeps its label
    for (let i = 0; i < 8 && placed.some((r) => r.x < tx + tw && tx < r.x + r.w && r.y < ty + th && ty < r.y + r.h);
      i++) ty += th;
    placed.push({x: tx, y: ty, w: tw, h: th});
    ctx.fillStyle = color;
    ctx.fillRect(tx, ty, tw, th);
    ctx.fillStyle = "#0b0d11";
    ctx.fillText(text, tx + 4, ty + 3);
    drawn.push({label: d.label, conf: d.conf, track_id: tracked ? d.track_id : null, bbox: d.bbox, text});
  }
  c.dataset.boxes = JSON.stringify(drawn);
  c.dataset.labels = drawn.map((b) => b.label).join(" ");
  c.dataset.frameId = String(fid);
}

// ------------------------------------------------------------------ server panel

async function refreshStats() {
  try {
    const [stats, hist] = await Promise.all([(await api("/stats")).json(), (await api("/stats/history")).json()]);
    renderStats(stats, hist.samples);
  } catch (e) { failed(e); }
}

function renderStats(s, samples) {
  const model = document.getElementById("model");
  model.replaceChildren();
  model.append("model ", bold(s.model), " on ", bold(s.device),
               " · " + s.lanes + " lane" + (s.lanes === 1 ? "" : "s"),
               s.tracking && s.tracking !== "off" ? " · tracking " + s.tracking : "");
  const live = Object.values(s.streams).filter((x) => x.connected).length;
  document.getElementById("summary").textContent =
    live + " stream" + (live === 1 ? "" : "s") + " · " + s.processed_frames.toLocaleString() + " results · " +
    s.dropped_frames.toLocaleString() + " dropped · up " + fmtUptime(s.uptime_s);
  setText("m-fps", s.fps.toFixed(1));
  setText("m-p50", fmtMs(s.latency_ms.p50));
  setText("m-p99", fmtMs(s.latency_ms.p99));
  setText("m-queue", String(s.queue_size));
  setText("m-lanes", s.lanes_busy + " / " + s.lanes);
  setText("m-cpu", Math.round(s.cpu).toString());
  setText("m-ram", Math.round(s.ram).toString());
  setText("m-rss", "server " + Math.round(s.process.rss_mb) + " MB");
  const col = (k) => samples.map((x) => x[k]);
  spark("c-fps", [col("fps")]);
  spark("c-lat", [col("p50_ms"), col("p99_ms")]);
  spark("c-queue", [col("queue")]);
  spark("c-lanes", [col("lanes_busy")], samples.length ? samples[samples.length - 1].lanes : 1);
  spark("c-cpu", [col("cpu"), col("process_cpu").map((v) => v === null ? null : v / (navigator.hardwareConcurrency || 1))], 100);
  spark("c-ram", [col("ram")], 100);
}

function setIn(el, selector, text) {
  const target = el.querySelector(selector);
  if (target.textContent !== text) target.textContent = text;
}

function bold(text) { const b = document.createElement("b"); b.textContent = text; return b; }
function setText(id, text) { document.getElementById(id).textContent = text; }
function fmtUptime(sec) {
  if (sec < 90) return Math.round(sec) + " s";
  if (sec < 5400) return Math.round(sec / 60) + " min";
  return (sec / 3600).toFixed(1) + " h";
}

function spark(id, series, fixedMax) {
  const c = document.getElementById(id);
  const dpr = window.devicePixelRatio || 1;
  const w = Math.round(c.clientWidth * dpr), h = Math.round(c.clientHeight * dpr);
  if (!w || !h) return;
  if (c.width !== w || c.height !== h) { c.width = w; c.height = h; }
  const ctx = c.getContext("2d");
  ctx.clearRect(0, 0, w, h);
  const n = Math.max(...series.map((s) => s.length));
  c.dataset.points = String(n);
  if (n < 2) return;
  let max = fixedMax || 0;
  if (!fixedMax) for (const s of series) for (const v of s) if (v !== null && v > max) max = v;
  max = max > 0 ? max * 1.1 : 1;
  const colors = ["#4cc2ff", "#ffb547"];
  series.forEach((s, i) => {
    ctx.beginPath();
    let started = false;
    s.forEach((v, k) => {
      if (v === null) return;
      const x = (k / (n - 1)) * w, y = h - 2 - (v / max) * (h - 4);
      if (started) ctx.lineTo(x, y); else { ctx.moveTo(x, y); started = true; }
    });
    ctx.strokeStyle = colors[i % colors.length];
    ctx.lineWidth = 1.5 * dpr;
    ctx.stroke();
    if (i === 0 && started) {  // a soft fill under the first series
      ctx.lineTo(w, h); ctx.lineTo(0, h); ctx.closePath();
      ctx.fillStyle = "rgba(76, 194, 255, 0.12)";
      ctx.fill();
    }
  });
}

token = readToken();
start();
