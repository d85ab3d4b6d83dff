"""The page reconnects by itself (issue 29): a server handing over (what ``ditstream serve`` does on
SIGTERM: ``/ready`` 503, live streams closed with 1012 after the grace period) ends the page's
WebSocket; the page opens a new stream at the same URL — which now reaches another server — with
the same settings, and frames keep coming, their seqs going on in order.

Two all-in-one null servers in process, A and B, behind a loopback ``TcpProxy`` standing in for the
load balancer: the page is loaded from the proxy, which forwards to A until A's ``/ready`` turns 503,
then to B. Over WebSocket the load balancer is late: the page's first try still reaches A, which
refuses it (1013, ``overloaded``), and the page tries again. Over WebRTC the server says ``closing``
(1012) on the control channel and the page publishes again. Headless Chromium (``/usr/bin/chromium``) drives the real page; an init script records
what crosses each WebSocket (the seqs of the outputs, the config messages sent, the close codes).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from ditstream.engine.null import null_runner
from ditstream.server.api.app import create_app, hand_over
from ditstream.server.settings import Settings
from proxykit import TcpProxy
from test_browser import ARGS, CHROMIUM, playwright_api

from ditstream.bench.harness import ServerThread

pytestmark = pytest.mark.timeout(120)

GRACE_S = 0.3
#: Each model call takes this long, so that the page (30 frames/s, 2 in flight at most) always has
#: frames in flight when its socket closes: they are never answered, and a page still waiting for
#: them would stall on the new stream.
DELAY_S = 0.1
PROMPT, SEED, STRENGTH = "a green square on a black background", 7, "0.35"

#: Wraps the page's WebSocket: per socket, the seqs sent and answered, the config messages sent on it
#: and how it closed.
RECORDER = """
window.sockets = [];
const Native = window.WebSocket;
window.WebSocket = class extends Native {
  constructor(...args) {
    super(...args);
    const rec = { seqs: [], sent: [], configs: [], close: null };
    window.sockets.push(rec);
    this.addEventListener("message", (ev) => {
      if (typeof ev.data === "string") return;
      const n = new DataView(ev.data).getUint32(0, false);
      rec.seqs.push(JSON.parse(new TextDecoder().decode(new Uint8Array(ev.data, 4, n))).seq);
    });
    this.addEventListener("close", (ev) => { rec.close = ev.code; });
  }
  send(data) {
    const rec = window.sockets.at(-1);
    if (typeof data !== "string") {
      const n = new DataView(data).getUint32(0, false);
      rec.sent.push(JSON.parse(new TextDecoder().decode(new Uint8Array(data, 4, n))).seq);
    } else if (JSON.parse(data).type === "config") rec.configs.push(JSON.parse(data));
    super.send(data);
  }
};
"""


def _server() -> ServerThread:
    settings = Settings(model="null", default_width=64, default_height=64, shutdown_grace_s=GRACE_S)
    return ServerThread(create_app(settings, null_runner(delay_s=DELAY_S)))


@pytest.mark.parametrize("transport", ["ws", "webrtc"])
def test_page_reconnects_on_1012_with_the_same_settings(transport: str):
    if transport == "webrtc":
        pytest.importorskip("aiortc")
    with _server() as a, _server() as b:
        proxy = TcpProxy(a.port)
        try:
            with playwright_api.sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
                try:
                    (_run if transport == "ws" else _run_rtc)(browser.new_page(), a, b, proxy)
                finally:
                    browser.close()
        finally:
            proxy.close()


def _hand_over(a: ServerThread, b: ServerThread, proxy: TcpProxy, late: Callable[[], bool] | None = None) -> None:
    """A hands over (``hand_over``, what ``ditstream serve`` runs on SIGTERM); the load balancer drops
    it once its ``/ready`` says 503 — or, when ``late`` is given, only once ``late()`` is true (a load
    balancer slow to notice); then A exits."""
    loop = a.server.servers[0].get_loop()
    handing = asyncio.run_coroutine_threadsafe(hand_over(a.app.state.ditstream), loop)
    t0 = time.monotonic()
    while httpx.get(a.url + "/ready").status_code == 200:
        assert time.monotonic() - t0 < 5, "A's /ready stayed 200"
        time.sleep(0.01)
    while late is not None and not late():
        assert time.monotonic() - t0 < 10, "the page never tried A again"
        time.sleep(0.01)
    proxy.target = b.port
    handing.result(10)
    # then A exits, as `ditstream serve` does after the hand-over: uvicorn closes its idle keep-alive
    # connections, so the page's next HTTP request (WHIP) opens a new one, which reaches B
    a.server.should_exit = True


def _run(page: Any, a: ServerThread, b: ServerThread, proxy: TcpProxy) -> None:
    console: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.add_init_script(RECORDER)
    page.goto(proxy.url + "/?source=pattern")
    page.fill("#prompt", PROMPT)
    page.fill("#seed", str(SEED))
    page.dispatch_event("#seed", "change")
    page.click("#start")
    page.wait_for_function("window.ditstream.stats.received >= 10", timeout=20_000)
    page.evaluate(f"""() => {{ const s = document.getElementById('strength'); s.value = '{STRENGTH}';
                              s.dispatchEvent(new Event('input')); }}""")  # a live change, not only the opening config
    page.wait_for_function(f"window.ditstream.config && window.ditstream.config.strength === {STRENGTH}")

    # The load balancer is late: the page's first try still reaches A, which refuses new streams (1013)
    _hand_over(a, b, proxy, late=lambda: page.evaluate("window.sockets.length >= 2 && window.sockets[1].close !== null"))
    with contextlib.suppress(playwright_api.TimeoutError):  # judged below, with what the page did
        page.wait_for_function("window.ditstream.reconnects >= 1 && window.sockets.at(-1).seqs.length >= 10",
                               timeout=15_000)

    page_state = page.evaluate("""() => ({reconnects: window.ditstream.reconnects, closeCodes: window.ditstream.closeCodes,
        running: window.ditstream.running, config: window.ditstream.config, errors: window.ditstream.stats.errors,
        status: document.getElementById('status').textContent, sockets: window.sockets})""")
    sockets = page_state["sockets"]
    unanswered = sorted(set(sockets[0]["sent"]) - set(sockets[0]["seqs"]))[-3:]
    print(f"\n  page: sockets (outputs, close) {[(len(s['seqs']), s['close']) for s in sockets]}, reconnects {page_state['reconnects']}, "
          f"close codes {page_state['closeCodes']}, seqs around the hand-over {sockets[0]['seqs'][-3:]} | "
          f"{sockets[-1]['seqs'][:3]}, last unanswered on A {unanswered}")
    assert page_state["reconnects"] == 1 and page_state["closeCodes"] == [1012], (page_state, console)
    assert [s["close"] for s in sockets] == [1012, 1013, None], sockets
    assert len(sockets[-1]["seqs"]) >= 10, f"frames stopped after the reconnect: {page_state}"
    assert page_state["running"] and page_state["status"] == "live", page_state
    assert [e["code"] for e in page_state["errors"]] == ["overloaded"], page_state["errors"]  # A's refusal
    seqs = [q for s in sockets for q in s["seqs"]]
    assert seqs == sorted(set(seqs)), f"outputs repeated or out of order across the reconnect: {seqs}"
    # The same settings: the config the page opened B's stream with is what it last had on A's, and B applied it.
    first, second = sockets[0], sockets[-1]
    assert second["configs"][0] == {**first["configs"][0], **{k: v for c in first["configs"][1:] for k, v in c.items()}}
    applied = page_state["config"]
    assert (applied["prompt"], applied["seed"], applied["strength"]) == (PROMPT, SEED, float(STRENGTH)), applied
    assert len(b.app.state.ditstream.sessions) == 1 and not a.app.state.ditstream.sessions


def _run_rtc(page: Any, a: ServerThread, b: ServerThread, proxy: TcpProxy) -> None:
    """WebRTC: A tells the page ``closing`` (1012) on the control channel; the page publishes again
    (signalling through the proxy, so to B) with the same settings, and frames keep coming."""
    console: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.goto(proxy.url + "/?source=pattern&transport=webrtc")
    page.fill("#prompt", PROMPT)
    page.fill("#seed", str(SEED))
    page.dispatch_event("#seed", "change")
    page.click("#start")
    page.wait_for_function("window.ditstream.stats.received >= 10", timeout=20_000)
    page.evaluate(f"""() => {{ const s = document.getElementById('strength'); s.value = '{STRENGTH}';
                              s.dispatchEvent(new Event('input')); }}""")
    page.wait_for_function(f"window.ditstream.config && window.ditstream.config.strength === {STRENGTH}")
    _hand_over(a, b, proxy)
    with contextlib.suppress(playwright_api.TimeoutError):  # judged below, with what the page did
        page.wait_for_function("window.ditstream.reconnects >= 1 && window.ditstream.config", timeout=15_000)
    before = page.evaluate("window.ditstream.stats.received")
    with contextlib.suppress(playwright_api.TimeoutError):
        page.wait_for_function(f"window.ditstream.stats.received >= {before + 10}", timeout=15_000)
    page_state = page.evaluate("""() => ({reconnects: window.ditstream.reconnects, closeCodes: window.ditstream.closeCodes,
        running: window.ditstream.running, received: window.ditstream.stats.received,
        status: document.getElementById('status').textContent, message: document.getElementById('message').textContent})""")
    print(f"\n  page (WebRTC): {page_state}")
    assert page_state["reconnects"] == 1 and page_state["closeCodes"] == [1012], (page_state, console)
    assert page_state["running"] and page_state["status"] == "live", (page_state, console)
    assert page_state["received"] >= before + 10, f"frames stopped after publishing again: {page_state}"
    sessions = list(b.app.state.ditstream.webrtc.values())
    assert len(sessions) == 1 and not a.app.state.ditstream.webrtc, (sessions, a.app.state.ditstream.webrtc)
    applied = sessions[0].config
    assert (applied.prompt, applied.seed, applied.strength) == (PROMPT, SEED, float(STRENGTH)), applied
