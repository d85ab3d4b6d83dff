// ditstream browser client: speaks the /v1/stream protocol of docs/protocol.md.
// Frames out: [u32 BE header length][JSON {seq, ts}][JPEG]; frames in: the same, plus timings.
// Flow control: at most MAX_IN_FLIGHT unanswered frames (outputs come back in order, and a frame
// the server dropped is older than the next answered one, so in-flight = lastSent - lastAnswered).
"use strict";

const MAX_IN_FLIGHT = 2;
const SEND_FPS = 30;
const $ = (id) => document.getElementById(id);

const state = {
  ws: null, running: false, seq: 0, lastAnswered: -1, config: null, limits: null,
  source: null, timer: null, encoding: false,
  stats: { sent: 0, received: 0, skipped: 0, fps: 0, latencyMs: null, serverMs: null, errors: [] },
  recent: [],  // output arrival times (ms) for the fps readout
};
window.ditstream = state;  // for tests and the curious

// ------------------------------------------------------------------ sources
class PatternSource {
  // A moving test pattern: hue sweep, a bouncing ball and a clock, so motion and latency show.
  draw(ctx, w, h, t) {
    const hue = (t / 40) % 360;
    const g = ctx.createLinearGradient(0, 0, w, h);
    g.addColorStop(0, `hsl(${hue},70%,55%)`);
    g.addColorStop(1, `hsl(${(hue + 120) % 360},70%,35%)`);
    ctx.fillStyle = g; ctx.fillRect(0, 0, w, h);
    const x = w / 2 + Math.cos(t / 700) * w * 0.3, y = h / 2 + Math.sin(t / 450) * h * 0.3;
    ctx.fillStyle = "#fff"; ctx.beginPath(); ctx.arc(x, y, Math.max(4, w * 0.12), 0, 2 * Math.PI); ctx.fill();
    ctx.fillStyle = "#000"; ctx.font = `${Math.max(8, Math.round(h / 12))}px monospace`;
    ctx.fillText((t / 1000).toFixed(2), w * 0.05, h * 0.95);
  }
  stop() {}
}

class CameraSource {
  constructor(video, stream) { this.video = video; this.stream = stream; }
  static async open(video) {
    const stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
    video.srcObject = stream;
    await video.play();
    return new CameraSource(video, stream);
  }
  draw(ctx, w, h) {
    // Centre-crop the camera to the stream's aspect ratio ("cover"), then scale to the stream size.
    const vw = this.video.videoWidth, vh = this.video.videoHeight;
    if (!vw || !vh) return;
    const s = Math.max(w / vw, h / vh), cw = w / s, ch = h / s;
    ctx.drawImage(this.video, (vw - cw) / 2, (vh - ch) / 2, cw, ch, 0, 0, w, h);
  }
  stop() { this.stream.getTracks().forEach((t) => t.stop()); }
}

// ------------------------------------------------------------------ protocol
function packFrame(header, jpegBytes) {
  const head = new TextEncoder().encode(JSON.stringify(header));
  const out = new Uint8Array(4 + head.length + jpegBytes.byteLength);
  new DataView(out.buffer).setUint32(0, head.length, false);
  out.set(head, 4);
  out.set(new Uint8Array(jpegBytes), 4 + head.length);
  return out.buffer;
}

function unpackFrame(buf) {
  const n = new DataView(buf).getUint32(0, false);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 4, n)));
  return { header, image: new Blob([new Uint8Array(buf, 4 + n)], { type: "image/jpeg" }) };
}

function sendConfig(changes) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify({ type: "config", ...changes }));
}

function currentSettings() {
  return {
    prompt: $("prompt").value, strength: parseFloat($("strength").value), steps: parseInt($("steps").value, 10),
    seed: Math.max(0, parseInt($("seed").value || "0", 10)), mode: $("mode").value,
  };
}

// ------------------------------------------------------------------ UI helpers
function setStatus(text, cls) { const el = $("status"); el.textContent = text; el.className = `status ${cls}`; }
function showMessage(text) { $("message").textContent = text || ""; }

function updateStats() {
  const now = performance.now();
  state.recent = state.recent.filter((t) => now - t < 2000);
  state.stats.fps = state.recent.length > 1 ? (state.recent.length - 1) / ((now - state.recent[0]) / 1000) : 0;
  $("fps").textContent = state.stats.fps.toFixed(1);
  $("latency").textContent = state.stats.latencyMs == null ? "–" : state.stats.latencyMs.toFixed(0);
  $("server-ms").textContent = state.stats.serverMs == null ? "–" : state.stats.serverMs.toFixed(1);
  $("received").textContent = state.stats.received;
  $("sent").textContent = state.stats.sent;
  $("skipped").textContent = state.stats.skipped;
}

// ------------------------------------------------------------------ connection
async function start() {
  showMessage("");
  try {
    if ($("source").value === "webcam") {
      try { state.source = await CameraSource.open($("camera")); }
      catch (err) { showMessage(`camera unavailable (${err.name}); using the test pattern`); $("source").value = "pattern"; }
    }
    if (!state.source) state.source = new PatternSource();
  } catch (err) { showMessage(String(err)); return; }

  const proto = location.protocol === "https:" ? "wss" : "ws";
  const key = $("key").value.trim();
  if (key) sessionStorage.setItem("ditstream-key", key);
  const subprotocols = key ? ["ditstream", `ditstream.bearer.${key}`] : ["ditstream"];
  const ws = new WebSocket(`${proto}://${location.host}/v1/stream`, subprotocols);
  ws.binaryType = "arraybuffer";
  state.ws = ws; state.running = true; state.seq = 0; state.lastAnswered = -1;
  $("start").textContent = "Stop"; $("start").classList.add("stop");
  setStatus("connecting…", "idle");

  ws.onmessage = (ev) => (typeof ev.data === "string" ? onControl(JSON.parse(ev.data)) : onFrame(ev.data));
  ws.onclose = (ev) => {
    setStatus(`closed (${ev.code}${ev.reason ? " " + ev.reason : ""})`, ev.code === 1000 ? "idle" : "error");
    stop(false);
  };
  ws.onerror = () => setStatus("connection error", "error");
}

function stop(closeSocket = true) {
  state.running = false;
  clearInterval(state.timer); state.timer = null;
  if (state.source) { state.source.stop(); state.source = null; }
  if (closeSocket && state.ws) state.ws.close(1000);
  $("start").textContent = "Start"; $("start").classList.remove("stop");
}

function onControl(msg) {
  if (msg.type === "ready") {
    state.config = msg.config; state.limits = msg.limits;
    $("model").textContent = `${msg.model.model} · ${msg.model.backend} · ${msg.model.device} · session ${msg.session}`;
    setStatus("live", "live");
    resizeCanvases(msg.config.width, msg.config.height);
    sendConfig(currentSettings());
    state.timer = setInterval(pump, 1000 / SEND_FPS);
  } else if (msg.type === "config") {
    state.config = msg.applied;
    resizeCanvases(msg.applied.width, msg.applied.height);
  } else if (msg.type === "error") {
    state.stats.errors.push(msg);
    showMessage(`${msg.code}: ${msg.message}`);
  }
}

async function onFrame(buf) {
  const { header, image } = unpackFrame(buf);
  state.lastAnswered = Math.max(state.lastAnswered, header.seq);
  const now = performance.now();
  state.recent.push(now);
  state.stats.received += 1;
  if (header.skipped) state.stats.skipped += 1;
  if (header.ts) state.stats.latencyMs = now - header.ts;
  state.stats.serverMs = header.timings ? header.timings.server_ms : null;
  const bitmap = await createImageBitmap(image);
  const out = $("output");
  if (out.width !== bitmap.width || out.height !== bitmap.height) { out.width = bitmap.width; out.height = bitmap.height; }
  out.getContext("2d").drawImage(bitmap, 0, 0);
  bitmap.close();
  $("output-info").textContent = `#${header.seq} ${header.width}×${header.height}${header.skipped ? " (skipped)" : ""}`;
  updateStats();
}

function resizeCanvases(w, h) {
  for (const id of ["input", "output"]) { const c = $(id); if (c.width !== w || c.height !== h) { c.width = w; c.height = h; } }
  $("input-info").textContent = `${w}×${h}`;
}

function pump() {
  const ws = state.ws;
  if (!state.running || !ws || ws.readyState !== WebSocket.OPEN || !state.config) return;
  const canvas = $("input"), ctx = canvas.getContext("2d");
  state.source.draw(ctx, canvas.width, canvas.height, performance.now());
  if (state.config.mode === "txt2img" || state.encoding) return;  // txt2img: the server paces itself
  if (state.seq - 1 - state.lastAnswered >= MAX_IN_FLIGHT) return;  // back-pressure: wait for answers
  state.encoding = true;
  canvas.toBlob(async (blob) => {
    try {
      if (!blob || ws.readyState !== WebSocket.OPEN) return;
      const seq = state.seq++;
      ws.send(packFrame({ seq, ts: performance.now() }, await blob.arrayBuffer()));
      state.stats.sent += 1;
    } finally { state.encoding = false; }
  }, "image/jpeg", 0.85);
}

// ------------------------------------------------------------------ wiring
function debounce(fn, ms) { let t; return (...a) => { clearTimeout(t); t = setTimeout(() => fn(...a), ms); }; }

$("start").addEventListener("click", () => (state.running ? stop() : start()));
$("prompt").addEventListener("input", debounce(() => sendConfig({ prompt: $("prompt").value }), 120));
$("strength").addEventListener("input", () => {
  $("strength-value").textContent = parseFloat($("strength").value).toFixed(2);
  sendConfig({ strength: parseFloat($("strength").value) });
});
$("steps").addEventListener("change", () => sendConfig({ steps: parseInt($("steps").value, 10) }));
$("seed").addEventListener("change", () => sendConfig({ seed: Math.max(0, parseInt($("seed").value || "0", 10)) }));
$("mode").addEventListener("change", () => sendConfig({ mode: $("mode").value }));
$("key").value = sessionStorage.getItem("ditstream-key") || "";
if (new URLSearchParams(location.search).get("source") === "pattern") $("source").value = "pattern";
setInterval(updateStats, 500);
