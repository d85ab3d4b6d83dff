"""WHIP POST → first output frame with FFmpeg's WHIP muxer, with and without the repeated ClientHello.

``python scripts/whip_first_frame.py [--runs 5]``: a null-model ``serve`` in process; for each run, a
child process (this script, ``--publish``) opens FFmpeg's WHIP muxer (PyAV's wheel) with a fresh
P-256 certificate and sends H.264 320x240 at 30 fps; the time from just before FFmpeg's POST to the
server's first processed frame (``ditstream_frames_total{outcome="processed"}`` moving) is one sample.
Runs alternate "before" (``webrtc_dtls.repeat_first_flight`` off: aiortc's single ClientHello, which
FFmpeg loses, so the handshake waits for the 1 s retransmit) and "after" (as shipped), in one process,
so both see the same machine. Figures: docs/benchmarks.md, "WHIP: POST to first frame".
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def publish(url: str, cert: str, key: str) -> None:
    """Child: print the wall time just before the POST, then publish 2 s of frames."""
    import av
    import numpy as np

    print(f"t0 {time.time()}", flush=True)
    out = av.open(url, mode="w", format="whip", options={"cert_file": cert, "key_file": key})
    stream = out.add_stream("libx264", rate=30, options={"profile": "baseline", "tune": "zerolatency",
                                                         "preset": "ultrafast"})
    stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
    start = time.monotonic()
    for i in range(60):
        time.sleep(max(0.0, start + i / 30 - time.monotonic()))
        frame = av.VideoFrame.from_ndarray(np.full((240, 320, 3), 100, np.uint8), format="rgb24")
        frame.pts = i
        for packet in stream.encode(frame):
            out.mux(packet)
    out.close()


def p256_pair(tmp: Path) -> tuple[str, str]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=whip", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return str(cert), str(key)


def one_run(srv, cert: str, key: str) -> float:
    processed = srv.app.state.ditstream.metrics.frames.labels("processed")
    base = processed._value.get()
    child = subprocess.Popen([sys.executable, __file__, "--publish", srv.url + "/v1/whip", cert, key],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    t0 = float(child.stdout.readline().split()[1])
    deadline = time.monotonic() + 20
    while processed._value.get() == base:
        if time.monotonic() > deadline:
            child.kill()
            raise RuntimeError("no frame processed within 20 s")
        time.sleep(0.002)
    first = time.time() - t0
    child.wait(30)
    return first


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--publish", nargs=3)
    args = ap.parse_args()
    if args.publish:
        publish(*args.publish)
        return
    from ditstream.engine.null import null_runner
    from ditstream.server.api.app import create_app
    from ditstream.server.live import webrtc_dtls
    from ditstream.server.settings import Settings

    from ditstream.bench.harness import ServerThread

    shipped = webrtc_dtls.repeat_first_flight
    results: dict[str, list[float]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp, ServerThread(create_app(
            Settings(model="null", default_width=64, default_height=64), null_runner())) as srv:
        cert, key = p256_pair(Path(tmp))
        for _ in range(args.runs):
            for label in ("before", "after"):
                webrtc_dtls.repeat_first_flight = shipped if label == "after" else (lambda transport: None)
                results[label].append(one_run(srv, cert, key))
    for label, xs in results.items():
        print(f"{label:6s} POST -> first processed frame: median {statistics.median(xs) * 1e3:.0f} ms, "
              f"min {min(xs) * 1e3:.0f}, max {max(xs) * 1e3:.0f} ({len(xs)} runs)")


if __name__ == "__main__":
    main()
