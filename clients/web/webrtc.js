// WebRTC transport of the page (docs/protocol.md, "WebRTC"): the input canvas is published over
// WHIP, the session's output is watched over WHEP, and the JSON control messages of the WebSocket
// travel on a data channel named "control". app.js draws the playing video into the output canvas.
"use strict";

// No trickle ICE (the server answers PATCH with 405): offer once every candidate is gathered.
function gathered(pc, timeoutMs = 3000) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === "complete") resolve(); };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, timeoutMs);  // whatever is gathered by then
  });
}

async function negotiate(pc, url, key) {
  await pc.setLocalDescription(await pc.createOffer());
  await gathered(pc);
  const headers = { "Content-Type": "application/sdp" };
  if (key) headers.Authorization = `Bearer ${key}`;
  const r = await fetch(url, { method: "POST", headers, body: pc.localDescription.sdp });
  if (r.status !== 201) {
    let msg = `${r.status}`;
    try { msg += ` ${(await r.json()).error.message}`; } catch (_) { /* not JSON */ }
    throw new Error(`${url}: ${msg}`);
  }
  await pc.setRemoteDescription({ type: "answer", sdp: await r.text() });
  return r.headers.get("Location");
}

// The STUN/TURN servers the server hands out (TURN credentials minted for this page, never the
// secret): none unless the operator configured them (docs/deploy.md, "WebRTC").
async function iceServers(key) {
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  const r = await fetch("/v1/webrtc/ice-servers", { headers });
  if (!r.ok) throw new Error(`/v1/webrtc/ice-servers: ${r.status}`);
  return (await r.json()).ice_servers.map((s) => (
    s.username ? { urls: s.urls, username: s.username, credential: s.credential } : { urls: s.urls }));
}

class RtcLink {
  // new RtcLink(key, onClose): onClose(reason) fires once, when either peer fails or closes.
  constructor(key, onClose) { this.key = key; this.onClose = onClose; this.closed = false; this.decoded = 0; }

  // Publish `canvas` (WHIP), watch the session into `video` (WHEP); `onControl(msg)` gets the
  // control channel's messages (the first: `ready`, possibly before this resolves).
  async connect({ canvas, video, fps, onControl }) {
    const servers = await iceServers(this.key);
    const pub = this.pub = new RTCPeerConnection({ iceServers: servers });
    for (const track of canvas.captureStream(fps).getVideoTracks()) pub.addTrack(track);
    this.channel = pub.createDataChannel("control");
    this.channel.onmessage = (ev) => onControl(JSON.parse(ev.data));
    pub.onconnectionstatechange = () => this.watch(pub);
    this.location = await negotiate(pub, "/v1/whip", this.key);
    if (this.closed) return;
    const view = this.view = new RTCPeerConnection({ iceServers: servers });
    view.addTransceiver("video", { direction: "recvonly" });
    view.ontrack = (ev) => { video.srcObject = new MediaStream([ev.track]); video.play().catch(() => {}); };
    view.onconnectionstatechange = () => this.watch(view);
    await negotiate(view, `/v1/whep/${this.location.split("/").pop()}`, this.key);
  }

  watch(pc) {
    if (["failed", "closed"].includes(pc.connectionState)) this.close(`peer ${pc.connectionState}`);
  }

  send(msg) { if (this.channel && this.channel.readyState === "open") this.channel.send(JSON.stringify(msg)); }

  // Frames decoded by the viewer since the last call (the page's "frames received").
  async newFrames() {
    if (!this.view) return 0;
    let total = this.decoded;
    (await this.view.getStats()).forEach((s) => { if (s.type === "inbound-rtp" && s.kind === "video") total = s.framesDecoded; });
    const n = total - this.decoded; this.decoded = total; return n;
  }

  close(reason = "closed") {
    if (this.closed) return;
    this.closed = true;
    if (this.location) {
      const headers = this.key ? { Authorization: `Bearer ${this.key}` } : {};
      fetch(this.location, { method: "DELETE", headers }).catch(() => {});
    }
    for (const pc of [this.pub, this.view]) if (pc) pc.close();
    this.onClose(reason);
  }
}
window.RtcLink = RtcLink;
