// ditstream browser client: speaks the /v1/stream protocol of docs/protocol.md.
// Frames out: [u32 BE header length][JSON {seq, ts}][JPEG]; frames in: the same, plus timings.
// Flow control: at most MAX_IN_FLIGHT unanswered frames (outputs come back in order, and a frame
// the server dropped is older than the next answered one, so in-flight = lastSent - lastAnswered).
// Defaults (prompt, size, steps, strength) come from the server's `ready` message: the model's own.
// Glass-to-glass: an output answering one of our frames is timed against our own send time (kept
// by seq); a txt2img output (server-made, `ts` = server wall clock) against `ts` mapped onto our
// clock with the offset measured by ping/pong.
"use strict";

const MAX_IN_FLIGHT = 2;
const SEND_FPS = 30;
const $ = (id) => document.getElementById(id);

// Clock offset: a burst of pings right after connecting (the first may wait behind the config), then
// one every PING_EVERY_MS; the round trip with the smallest delay bounds the error by half of it.
const PING_BURST = 8, PING_BURST_MS = 250, PING_EVERY_MS = 5000;
const wallNow = () => performance.timeOrigin + performance.now();  // ms since epoch, monotonic

// Reconnecting (docs/protocol.md, "Reconnecting"), as clients/stream_client.py does: a live stream
// closed with 1012 (service restart: a server stopped on purpose) or 1013 (try again later) opens a
// new one at the same URL (behind a load balancer: whichever server it reaches now) with the same
// settings, its seqs going on. Up to RECONNECT_TRIES tries, the n-th after min(2 s, 0.1 s × 2ⁿ) ×
// a random 0.5–1 (a fleet's pages do not all come back at once); a try that cannot connect (1006)
// or is refused with 1013 counts as one. Not on the first open: a full server there is an answer.
const RECONNECT_CODES = new Set([1012, 1013]);
const RECONNECT_TRIES = 8;
const reconnectDelayMs = (n) => Math.min(2000, 100 * 2 ** n) * (0.5 + Math.random() / 2);

function freshStats() {
  // latencyKind: "sent" (an answer to our frame, timed from our send) or "server" (txt2img, from the server's tick)
  return { sent: 0, received: 0, skipped: 0, dropped: 0, fps: 0, latencyMs: null, latencyKind: null, serverMs: null,
           errors: [] };
}

const state = {
  ws: null, rtc: null, rtcStats: null, running: false, seq: 0, lastAnswered: -1, config: null, limits: null, model: null,
  source: null, timer: null, pinger: null, encoding: false,
  stats: freshStats(),
  recent: [],  // output arrival times (ms) for the fps readout
  sentAt: new Map(),  // seq -> performance.now() at send, for frames not answered yet
  clockOffsetMs: null, bestRttMs: Infinity, pings: 0, pongs: 0,  // server wall clock − ours (ping/pong)
  edited: new Set(),  // controls the user changed: the model's defaults do not overwrite them
  retry: null, retryTimer: null,  // {tries, code} while reconnecting
  reconnects: 0, closeCodes: [],  // streams resumed since Start, and the close codes that asked for it
};
window.ditstream = state;  // for tests and the curious

// ------------------------------------------------------------------ sources
class PatternSource {
  // A red circle moving on white (the demo model's palette: something it was trained on), on the
  // same path as the Python client's pattern (clients/stream_client.py pattern_position).
  draw(ctx, w, h, t) {
    const r = 0.22 * Math.min(w, h);
    const x = w / 2 + Math.cos(t / 700) * (w / 2 - r) * 0.9, y = h / 2 + Math.sin(t / 450) * (h / 2 - r) * 0.9;
    ctx.fillStyle = "rgb(245,245,245)"; ctx.fillRect(0, 0, w, h);
    ctx.fillStyle = "rgb(220,40,40)"; ctx.beginPath(); ctx.arc(x, y, r, 0, 2 * Math.PI); ctx.fill();
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

function sendControl(msg) {
  if (state.rtc) { state.rtc.send(msg); return; }
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(msg));
}
function sendConfig(changes) { sendControl({ type: "config", ...changes }); }
function ping() {
  if (!state.running) return;
  sendControl({ type: "ping", ts: wallNow() });
  state.pings += 1;
  state.pinger = setTimeout(ping, state.pings < PING_BURST ? PING_BURST_MS : PING_EVERY_MS);
}

function currentSettings() {
  const out = {
    prompt: promptValue(), strength: parseFloat($("strength").value), steps: parseInt($("steps").value, 10),
    seed: Math.max(0, parseInt($("seed").value || "0", 10)), mode: $("mode").value,
    transition_frames: transitionFrames(), feedback: parseFloat($("feedback").value),
    temporal: parseFloat($("temporal").value), motion_adaptive: $("motion-adaptive").checked,
  };
  const loras = loraScales();
  if (loras) out.loras = loras;
  return out;
}

// The prompt as sent: the first prompt, or a blend with the second (`prompt: [{text, weight}, ...]`).
function promptValue() {
  const first = $("prompt").value, second = $("prompt2").value.trim(), b = parseFloat($("blend").value);
  if (!second || !(b > 0)) return first;
  if (b >= 1) return [{ text: second, weight: 1 }];
  return [{ text: first, weight: 1 - b }, { text: second, weight: b }];
}
function transitionFrames() { return Math.min(1000, Math.max(0, parseInt($("transition").value || "0", 10))); }

// One slider per LoRA adapter the model card lists (`/v1/models` or `ready`); null when there are none.
function loraScales() {
  const inputs = document.querySelectorAll("#loras input");
  if (!inputs.length) return null;
  return Object.fromEntries(Array.from(inputs, (el) => [el.dataset.lora, parseFloat(el.value)]));
}
function showLoras(loras) {
  const box = $("loras");
  if (!Array.isArray(loras) || box.dataset.names === loras.map((l) => l.name).join(",")) return;
  box.dataset.names = loras.map((l) => l.name).join(",");
  box.replaceChildren(...loras.map((l) => {
    const label = document.createElement("label"), out = document.createElement("output");
    const input = document.createElement("input");
    Object.assign(input, { type: "range", min: "0", max: "1.5", step: "0.05", value: String(l.default_scale ?? 0),
                           id: `lora-${l.name}` });
    input.dataset.lora = l.name;
    out.textContent = parseFloat(input.value).toFixed(2);
    input.addEventListener("input", () => {
      out.textContent = parseFloat(input.value).toFixed(2);
      sendConfig({ loras: loraScales() });
    });
    label.title = "LoRA adapter scale (0 = the base model)";
    label.append(`LoRA ${l.name} `, out, input);
    return label;
  }));
}

// The model's defaults (from `ready` or GET /v1/models) fill every control the user did not change.
function applyDefaults(d) {
  if (!d) return;
  if (!state.edited.has("prompt") && typeof d.prompt === "string") $("prompt").value = d.prompt;
  if (!state.edited.has("strength") && typeof d.strength === "number") {
    $("strength").value = d.strength; $("strength-value").textContent = d.strength.toFixed(2);
  }
  if (!state.edited.has("steps") && Number.isInteger(d.steps)) $("steps").value = String(d.steps);
  if (d.width && d.height && !state.running) resizeCanvases(d.width, d.height);
}

function showModel(card, session) {
  state.model = card;
  const parts = [card.model, card.backend, card.device, card.native_size && `native ${card.native_size}`,
                 session && `session ${session}`].filter(Boolean);
  $("model").textContent = parts.join(" · ");
}

// Before Start: show the model's defaults at once (needs the key when the server has keys; else
// `ready` brings the same defaults on Start).
async function loadModelCard() {
  const key = $("key").value.trim();
  try {
    const r = await fetch("/v1/models", { headers: key ? { Authorization: `Bearer ${key}` } : {} });
    if (!r.ok) return;
    const card = (await r.json()).data[0];
    if (card && !state.running) { showModel({ ...card, model: card.id }); applyDefaults(card.defaults); }
    if (card) showLoras(card.loras);
  } catch (err) { /* offline or refused: `ready` will do */ }
}

// ------------------------------------------------------------------ UI helpers
function setStatus(text, cls) { const el = $("status"); el.textContent = text; el.className = `status ${cls}`; }
function showMessage(text) { $("message").textContent = text || ""; }

function updateStats() {
  const now = performance.now();
  state.recent = state.recent.filter((t) => now - t < 2000);
  state.stats.fps = state.recent.length > 1 ? (state.recent.length - 1) / ((now - state.recent[0]) / 1000) : 0;
  $("fps").textContent = state.stats.fps.toFixed(1);
  $("dropped").textContent = state.stats.dropped;
  $("latency").textContent = state.stats.latencyMs == null ? "–" : state.stats.latencyMs.toFixed(0);
  $("server-ms").textContent = state.stats.serverMs == null ? "–" : state.stats.serverMs.toFixed(1);
  $("received").textContent = state.stats.received;
  $("sent").textContent = state.stats.sent;
  $("skipped").textContent = state.stats.skipped;
}

// ------------------------------------------------------------------ connection
function resetStats() {
  state.stats = freshStats(); state.recent = []; state.sentAt.clear();
  state.clockOffsetMs = null; state.bestRttMs = Infinity; state.pings = 0; state.pongs = 0;
  $("output-info").textContent = "";
  updateStats();
}

async function start() {
  resetStats();  // first, synchronously: a new stream's counters start from zero
  showMessage("");
  try {
    if ($("source").value === "webcam") {
      try { state.source = await CameraSource.open($("camera")); }
      catch (err) { showMessage(`camera unavailable (${err.name}); using the test pattern`); $("source").value = "pattern"; }
    }
    if (!state.source) state.source = new PatternSource();
  } catch (err) { showMessage(String(err)); return; }

  const key = $("key").value.trim();
  if (key) sessionStorage.setItem("ditstream-key", key);
  state.running = true; state.seq = 0; state.lastAnswered = -1; state.reconnects = 0; state.closeCodes = [];
  $("start").textContent = "Stop"; $("start").classList.add("stop");
  if ($("transport").value === "webrtc") { await startRtc(key); return; }
  openSocket(key);
}

// One WebSocket of the stream: the first, or a reconnect's (state.retry set).
function openSocket(key) {
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const subprotocols = key ? ["ditstream", `ditstream.bearer.${key}`] : ["ditstream"];
  const ws = new WebSocket(`${proto}://${location.host}/v1/stream`, subprotocols);
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  let live = false;  // this socket got `ready`
  if (!state.retry) setStatus("connecting…", "idle");

  // Events of an earlier socket (its close may arrive after a new Start) must not touch this stream.
  ws.onmessage = (ev) => {
    if (state.ws !== ws) return;
    if (typeof ev.data !== "string") { onFrame(ev.data); return; }
    const msg = JSON.parse(ev.data);
    if (msg.type === "ready") live = true;
    onControl(msg);
  };
  ws.onclose = (ev) => {
    if (state.ws !== ws) return;
    const again = state.retry ? ev.code === 1006 || RECONNECT_CODES.has(ev.code) : live && RECONNECT_CODES.has(ev.code);
    if (state.running && again) { reconnect(ev.code, () => openSocket(key)); return; }
    setStatus(`closed (${ev.code}${ev.reason ? " " + ev.reason : ""})`, ev.code === 1000 ? "idle" : "error");
    stop(false);
  };
  ws.onerror = () => { if (state.ws === ws && !state.retry) setStatus("connection error", "error"); };
}

// The stream was closed with a RECONNECT_CODES code, or a reconnect try failed: try (again) after
// the backoff, or give up after RECONNECT_TRIES. Sending waits for the new stream's `ready`.
function reconnect(code, open) {
  if (!state.retry) { state.retry = { tries: 0, code }; state.closeCodes.push(code); }
  clearInterval(state.timer); state.timer = null;
  clearTimeout(state.pinger); state.pinger = null;
  state.config = null;
  if (state.retry.tries >= RECONNECT_TRIES) {
    setStatus(`closed (${state.retry.code}): ${RECONNECT_TRIES} reconnects failed`, "error");
    stop(false);
    return;
  }
  setStatus(`reconnecting… (${state.retry.code})`, "idle");
  state.retryTimer = setTimeout(() => { state.retryTimer = null; if (state.running) open(); },
                                reconnectDelayMs(state.retry.tries++));
}

// A reconnect reached `ready`: frames unanswered on the old stream never will be (counted as
// dropped), and the new server's clock is measured afresh.
function resumed() {
  state.retry = null; state.reconnects += 1;
  state.stats.dropped += state.sentAt.size; state.sentAt.clear();
  state.lastAnswered = state.seq - 1;
  state.clockOffsetMs = null; state.bestRttMs = Infinity; state.pings = 0; state.pongs = 0;
}

// WebRTC (webrtc.js): the input canvas is published, the output video is drawn into the output
// canvas by pump(); "frames received" counts the frames the viewer decoded.
// A server stopping on purpose says `closing` (code 1012) on the control channel: the page then
// publishes again, as a WebSocket page reconnects (a failed try counts as one).
async function startRtc(key) {
  if (!state.retry) setStatus("connecting…", "idle");
  const link = new RtcLink(key, (reason) => {
    if (state.rtc !== link) return;
    clearInterval(state.rtcStats); state.rtcStats = null;
    if (state.running && (link.closingCode || state.retry)) {
      state.rtc = null;
      reconnect(link.closingCode || 1006, () => startRtc(key));
      return;
    }
    setStatus(`closed (${reason})`, "error");
    stop(false);
  });
  state.rtc = link;
  const canvas = $("input");
  state.source.draw(canvas.getContext("2d"), canvas.width, canvas.height, performance.now());
  state.rtcStats = setInterval(async () => {
    const n = await link.newFrames(), now = performance.now();
    if (state.rtc !== link || n <= 0) return;
    state.stats.received += n;
    for (let i = 0; i < n; i++) state.recent.push(now);
  }, 200);
  try {
    await link.connect({ canvas, video: $("output-video"), fps: SEND_FPS,
                         onControl: (msg) => { if (state.rtc === link) onControl(msg); } });
  } catch (err) {
    if (state.rtc !== link) return;
    if (state.retry) { link.close(String(err.message || err)); return; }  // a failed try: onClose tries again
    showMessage(String(err.message || err));
    setStatus("connection error", "error");
    stop();
  }
}

function stop(closeSocket = true) {
  state.running = false;
  clearTimeout(state.retryTimer); state.retryTimer = null; state.retry = null;
  clearInterval(state.timer); state.timer = null;
  clearInterval(state.rtcStats); state.rtcStats = null;
  if (state.rtc) { const link = state.rtc; state.rtc = null; link.close(); }
  clearTimeout(state.pinger); state.pinger = null;
  if (state.source) { state.source.stop(); state.source = null; }
  if (closeSocket && state.ws) state.ws.close(1000);
  $("start").textContent = "Start"; $("start").classList.remove("stop");
}

function onControl(msg) {
  if (msg.type === "ready") {
    if (state.retry) resumed();
    clearInterval(state.timer); clearTimeout(state.pinger);
    state.config = msg.config; state.limits = msg.limits; state.session = msg.session;
    showModel(msg.model, msg.session);
    if (msg.model && msg.model.loras) showLoras(Object.entries(msg.model.loras).map(([name, v]) => ({ name, default_scale: v })));
    applyDefaults(msg.config);  // what this stream starts with: the model's defaults
    setStatus("live", "live");
    resizeCanvases(msg.config.width, msg.config.height);
    sendConfig(currentSettings());
    ping();
    state.timer = setInterval(pump, 1000 / SEND_FPS);
  } else if (msg.type === "pong") {
    // Offset of the server's wall clock from ours, from the round trip with the smallest delay.
    const now = wallNow(), rtt = now - msg.ts;
    state.pongs += 1;
    if (typeof msg.server_time === "number" && rtt >= 0 && rtt <= state.bestRttMs) {
      state.bestRttMs = rtt; state.clockOffsetMs = msg.server_time - (msg.ts + now) / 2;
    }
  } else if (msg.type === "config") {
    state.config = msg.applied;
    resizeCanvases(msg.applied.width, msg.applied.height);
  } else if (msg.type === "error") {
    state.stats.errors.push(msg);
    showMessage(`${msg.code}: ${msg.message}`);
  } else if (msg.type === "closing" && state.rtc) {  // WebRTC: the server stops on purpose
    state.rtc.closingCode = msg.code;
    state.rtc.close(`${msg.code} ${msg.reason || ""}`.trim());
  }
}

async function onFrame(buf) {
  const { header, image } = unpackFrame(buf);
  state.lastAnswered = Math.max(state.lastAnswered, header.seq);
  state.seq = Math.max(state.seq, header.seq + 1);  // server-made (txt2img) seqs: ours stay unique
  const now = performance.now();
  state.recent.push(now);
  state.stats.received += 1;
  if (header.skipped) state.stats.skipped += 1;
  const sentAt = state.sentAt.get(header.seq);
  if (sentAt !== undefined && header.ts === sentAt) {  // answers our frame: our own clock only
    state.stats.latencyMs = now - sentAt; state.stats.latencyKind = "sent";
    // Outputs come in seq order: our frames older than this one were dropped by the server.
    for (const seq of state.sentAt.keys()) {
      if (seq < header.seq) { state.sentAt.delete(seq); state.stats.dropped += 1; }
    }
    state.sentAt.delete(header.seq);
  } else if (typeof header.ts === "number" && state.clockOffsetMs !== null) {
    state.stats.latencyMs = wallNow() - (header.ts - state.clockOffsetMs);  // server-made: tick → shown
    state.stats.latencyKind = "server";
  }
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
  if (state.rtc) { pumpRtc(); return; }
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
      const bytes = await blob.arrayBuffer();
      if (ws.readyState !== WebSocket.OPEN || state.ws !== ws) return;
      const seq = state.seq++, ts = performance.now();
      state.sentAt.set(seq, ts);
      ws.send(packFrame({ seq, ts }, bytes));
      state.stats.sent += 1;
    } finally { state.encoding = false; }
  }, "image/jpeg", 0.85);
}

function pumpRtc() {
  if (!state.running || !state.config) return;
  const canvas = $("input");
  state.source.draw(canvas.getContext("2d"), canvas.width, canvas.height, performance.now());
  if (state.config.mode !== "txt2img") state.stats.sent += 1;  // a frame of the published track
  const video = $("output-video"), out = $("output");
  if (video.readyState < 2 || !video.videoWidth) return;
  if (out.width !== video.videoWidth || out.height !== video.videoHeight) {
    out.width = video.videoWidth; out.height = video.videoHeight;
  }
  out.getContext("2d").drawImage(video, 0, 0);
  $("output-info").textContent = `${video.videoWidth}×${video.videoHeight} (WebRTC)`;
}

// ------------------------------------------------------------------ wiring
function debounce(fn, ms) { let t; return (...a) => { clearTimeout(t); t = setTimeout(() => fn(...a), ms); }; }

$("start").addEventListener("click", () => (state.running ? stop() : start()));
for (const id of ["prompt", "strength", "steps"]) $(id).addEventListener("input", () => state.edited.add(id));
const sendPrompt = debounce(() => sendConfig({ prompt: promptValue() }), 120);
$("prompt").addEventListener("input", sendPrompt);
$("prompt2").addEventListener("input", sendPrompt);
$("blend").addEventListener("input", () => {
  $("blend-value").textContent = parseFloat($("blend").value).toFixed(2);
  sendConfig({ prompt: promptValue() });
});
$("transition").addEventListener("change", () => sendConfig({ transition_frames: transitionFrames() }));
$("feedback").addEventListener("input", () => {
  $("feedback-value").textContent = parseFloat($("feedback").value).toFixed(2);
  sendConfig({ feedback: parseFloat($("feedback").value) });
});
$("temporal").addEventListener("input", () => {
  $("temporal-value").textContent = parseFloat($("temporal").value).toFixed(2);
  sendConfig({ temporal: parseFloat($("temporal").value) });
});
$("motion-adaptive").addEventListener("change", () => sendConfig({ motion_adaptive: $("motion-adaptive").checked }));
$("strength").addEventListener("input", () => {
  $("strength-value").textContent = parseFloat($("strength").value).toFixed(2);
  sendConfig({ strength: parseFloat($("strength").value) });
});
$("steps").addEventListener("change", () => sendConfig({ steps: parseInt($("steps").value, 10) }));
$("seed").addEventListener("change", () => sendConfig({ seed: Math.max(0, parseInt($("seed").value || "0", 10)) }));
$("mode").addEventListener("change", () => sendConfig({ mode: $("mode").value }));
$("key").value = sessionStorage.getItem("ditstream-key") || "";
$("key").addEventListener("change", loadModelCard);
if (new URLSearchParams(location.search).get("source") === "pattern") $("source").value = "pattern";
if (new URLSearchParams(location.search).get("transport") === "webrtc") $("transport").value = "webrtc";
loadModelCard();
setInterval(updateStats, 500);
