"""Live outputs that publish to a media server, against real servers on 127.0.0.1: FFmpeg's own
RTSP and RTMP receivers (listen mode, in helper processes), and a TCP listener that accepts
connections and never answers (a hung media server, or one behind a proxy that accepts for it).

What matters: such a server costs its own output (a timeout, then reconnects with backoff),
never the job: the thread feeding the outputs never waits, a recording beside it gets every
frame, and SIGTERM ends ``gpen-stream live`` at once."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from fractions import Fraction

import av
import numpy as np
import pytest

from streamer.io.probe import VideoInfo
from streamer.io.stream_sink import CONNECT_TIMEOUT_S, TeeSink, open_sink
from tests.support.clips import make_clip
from tests.support.streams import RtmpListenReceiver, RtspListenReceiver, stamp_index

FPS = 25
TB = Fraction(1, 90000)
RECEIVERS = {"rtsp": RtspListenReceiver, "rtmp": RtmpListenReceiver}


def _info(width=320, height=240) -> VideoInfo:
    return VideoInfo(name="test", container="test", stream_index=0, width=width, height=height, pix_fmt="yuv420p",
                     bits=8, codec="h264", time_base=TB, rate=Fraction(FPS), frames=0, duration_s=None,
                     stream_end_s=None, container_end_s=None, start_s=0.0, rotation=0, colorspace=1, color_range=1,
                     color_primaries=1, color_trc=1, sample_aspect=None)


def _frame(index: int, width=320, height=240, noise=None) -> av.VideoFrame:
    rgb = np.zeros((height, width, 3), np.uint8) if noise is None else noise.integers(0, 255, (height, width, 3),
                                                                                      dtype=np.uint8)
    return av.VideoFrame.from_ndarray(stamp_index(rgb, index), format="rgb24").reformat(format="yuv420p")


@contextmanager
def _silent_server():
    """A TCP port whose connections are accepted (by the kernel) and never answered."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    try:
        yield srv.getsockname()[1]
    finally:
        srv.close()


def _publishers() -> list[int]:
    """Our publishing processes still running (children of this process)."""
    out = subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", "streamer.io.publisher"], capture_output=True,
                         text=True)
    return [int(pid) for pid in out.stdout.split()]


def _feed(sink, seconds: float, *, start=0, noise=None, size=(320, 240)) -> tuple[int, float]:
    """Frames in real time; returns (frames written, the longest the feeding thread waited on the sink)."""
    worst, n = 0.0, start
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        frame = _frame(n, *size, noise=noise)
        began = time.monotonic()
        sink.write(frame, n * round(1 / (FPS * TB)))
        worst = max(worst, time.monotonic() - began)
        n += 1
        time.sleep(max(0.0, t0 + (n - start) / FPS - time.monotonic()))
    return n - start, worst


@pytest.mark.parametrize("scheme", RECEIVERS)
def test_a_published_output_reaches_a_real_server_in_order(scheme):
    with RECEIVERS[scheme](frames=2 * FPS) as receiver:
        sink = open_sink(receiver.url, codec=None, crf=23, preset="ultrafast")
        sink.open(_info(), [])
        _feed(sink, 2 * FPS / FPS)
        sink.commit()  # the end of the stream: the receiver stops probing and decodes what came
        capture = receiver.wait_frames(2 * FPS, timeout=20)
    indices = [r.index for r in capture.frames[:2 * FPS]]
    assert indices == list(range(2 * FPS)), indices
    assert sink.reconnects == 0 and not _publishers()


@pytest.mark.parametrize("scheme", RECEIVERS)
def test_a_server_that_never_answers_costs_its_output_not_the_recording(tmp_path, scheme):
    rec = tmp_path / "rec.mkv"
    with _silent_server() as port:
        silent = open_sink(f"{scheme}://127.0.0.1:{port}/live/x", codec=None, crf=23, preset="ultrafast")
        sink = TeeSink([open_sink(str(rec), codec=None, crf=23, preset="ultrafast"), silent])
        sink.open(_info(), [])
        frames, worst = _feed(sink, CONNECT_TIMEOUT_S + 3)
        began = time.monotonic()
        sink.commit()
        closed_in = time.monotonic() - began
    assert worst < 0.5, f"the job waited {worst:.1f} s on its outputs"
    assert silent.reconnects >= 1  # it gave up within its timeout and tried again
    assert closed_in < 2 and not _publishers()
    with av.open(str(rec)) as c:
        assert sum(1 for _ in c.decode(video=0)) == frames


def test_a_server_that_stops_reading_is_given_up_and_reconnected():
    # big noisy pictures fill the socket buffers within a second once the server stops reading
    noise = np.random.default_rng(0)
    with RtmpListenReceiver(frames=10_000, timeout=(30.0, 30.0), low_delay=True) as receiver:
        sink = open_sink(receiver.url, codec=None, crf=10, preset="ultrafast")
        sink.open(_info(640, 480), [])
        _feed(sink, 1.5, noise=noise, size=(640, 480))
        receiver.wait_frames(5, timeout=20)
        os.kill(receiver._child.proc.pid, signal.SIGSTOP)  # frozen: it reads nothing more
        try:
            _, worst = _feed(sink, CONNECT_TIMEOUT_S + 6, start=1000, noise=noise, size=(640, 480))
            reconnects = sink.reconnects
        finally:
            os.kill(receiver._child.proc.pid, signal.SIGCONT)
        began = time.monotonic()
        sink.commit()
        closed_in = time.monotonic() - began
    assert reconnects >= 1 and worst < 0.5, (reconnects, worst)
    assert closed_in < 2 and not _publishers()


def test_live_with_a_silent_rtsp_output_records_and_ends_at_once_on_sigterm(tmp_path, retinaface_mobile_weights):
    clip = make_clip(tmp_path / "cam.mp4", frames=FPS, width=160, height=120, fps=FPS, audio=False)
    rec = tmp_path / "rec.mkv"
    env = {**os.environ, "GPEN_STREAM_RESTORE_DETECT_MAX_SIDE": "160", "GPEN_STREAM_RESTORE_MAX_FACES": "1"}
    with _silent_server() as port:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamer", "live", str(clip.path), "--realtime", "--loop", "-o", str(rec), "-o",
             f"rtsp://127.0.0.1:{port}/enhanced", "--model", "identity", "--detector", "retinaface_mobile0.25",
             "--detector-weights", str(retinaface_mobile_weights), "--json-progress", "--preset", "ultrafast"],
            stdout=subprocess.PIPE, stderr=open(tmp_path / "live.log", "wb"), text=True, env=env)
        lines = []
        threading.Thread(target=lambda: lines.extend(json.loads(line) for line in proc.stdout if line.startswith("{")),
                         daemon=True).start()
        try:
            deadline = time.monotonic() + 60
            while not (lines and lines[-1].get("frames_out", 0) >= 5 * FPS and lines[-1].get("output_reconnects")):
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "live.log").read_text()[-2000:]
                time.sleep(0.2)
            size = rec.stat().st_size if rec.exists() else 0
        finally:
            began = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            took = time.monotonic() - began
    log = (tmp_path / "live.log").read_text()
    assert size > 0 and code == 0 and took < 3, (size, code, took, log[-1500:])
    with av.open(str(rec)) as c:
        assert sum(1 for _ in c.decode(video=0)) >= 5 * FPS
