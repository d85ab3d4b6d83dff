// The page's "outputs" panel (docs/protocol.md, "Outputs"): restream the live session to an RTMP server
// (or record it, file:NAME.mp4) from the server itself, and watch each output's state. Shown only when
// the server allows outputs (GET /v1/outputs: the operator's --outputs); the session is the one app.js
// is streaming (window.ditstream.session, from `ready`, whatever the transport).
"use strict";

(() => {
  const POLL_MS = 1000;
  const $ = (id) => document.getElementById(id);
  const panel = $("outputs"), list = $("outputs-list"), note = $("outputs-message");
  let polling = null;

  function headers(json) {
    const key = $("key").value.trim(), h = json ? { "Content-Type": "application/json" } : {};
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }
  const session = () => (window.ditstream && window.ditstream.running ? window.ditstream.session : null);
  const base = (s) => `/v1/sessions/${encodeURIComponent(s)}/outputs`;

  async function errorText(r) {
    try { return `${r.status} ${(await r.json()).error.message}`; } catch (_) { return `${r.status}`; }
  }

  // What the server allows: the panel stays hidden unless outputs are on.
  async function probe() {
    try {
      const r = await fetch("/v1/outputs", { headers: headers(false) });
      const info = r.ok ? await r.json() : { enabled: false };
      panel.hidden = !info.enabled;
      if (info.enabled) {
        $("output-url").placeholder = info.kinds.includes("rtmp") ? "rtmp://live.example.com/app/STREAM_KEY"
          : info.kinds.includes("file") ? "file:recording.mp4" : "srt://host:port";
        if (!polling) polling = setInterval(refresh, POLL_MS);
      }
    } catch (_) { panel.hidden = true; }
  }

  function row(o) {
    const li = document.createElement("li"), stop = document.createElement("button");
    li.dataset.state = o.state;
    const kbps = o.state === "live" ? ` · ${(o.bitrate_bps / 1000).toFixed(0)} kbit/s` : "";
    li.textContent = `${o.url} — ${o.state}${o.reason ? ` (${o.reason})` : ""} · ${o.frames_sent} frames${kbps} `;
    stop.type = "button"; stop.className = "stop"; stop.textContent = o.state === "failed" || o.state === "ended" ? "Remove" : "Stop";
    stop.addEventListener("click", () => remove(o.id));
    li.append(stop);
    return li;
  }

  async function refresh() {
    const s = session();
    if (panel.hidden) return;
    if (!s) { list.replaceChildren(); return; }
    try {
      const r = await fetch(base(s), { headers: headers(false) });
      if (!r.ok) { note.textContent = await errorText(r); return; }
      list.replaceChildren(...(await r.json()).outputs.map(row));
    } catch (_) { /* the next poll tries again */ }
  }

  async function add() {
    const s = session(), url = $("output-url").value.trim();
    note.textContent = "";
    if (!s) { note.textContent = "start a stream first: outputs belong to a live session"; return; }
    if (!url) return;
    const r = await fetch(base(s), { method: "POST", headers: headers(true), body: JSON.stringify({ url }) });
    if (r.status !== 201) { note.textContent = await errorText(r); return; }
    $("output-url").value = "";
    refresh();
  }

  async function remove(id) {
    const s = session();
    if (!s) return;
    const r = await fetch(`${base(s)}/${encodeURIComponent(id)}`, { method: "DELETE", headers: headers(false) });
    if (!r.ok) note.textContent = await errorText(r);
    refresh();
  }

  $("output-add").addEventListener("click", add);
  $("output-url").addEventListener("keydown", (ev) => { if (ev.key === "Enter") add(); });
  $("key").addEventListener("change", probe);
  probe();
})();
