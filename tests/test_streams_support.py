"""The live-stream test infrastructure itself (tests/support/streams.py): real servers and clients on
127.0.0.1. Relay tests skip only when gst-rtsp-server is not installed (.ci/run installs it)."""

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests.support.streams import (
    Publisher,
    RtmpListenReceiver,
    RtspListenReceiver,
    RtspRelay,
    StreamReader,
    UdpReceiver,
    pattern_frame,
    read_frame_indices,
    read_index,
    read_when_available,
    rtsp_relay_unavailable,
    stamp_index,
)

REPO = Path(__file__).resolve().parents[1]
RELAY_MISSING = rtsp_relay_unavailable()
needs_relay = pytest.mark.skipif(RELAY_MISSING is not None, reason=RELAY_MISSING or "")


@pytest.fixture
def relay():
    with RtspRelay() as r:
        yield r


def steady_latency(capture, publisher, skip: int = 15) -> float:
    """Median publish-to-decode latency after the opening burst."""
    return float(np.median(capture.latencies(publisher.sent)[skip:]))


# ---------------------------------------------------------------------------------------------
# The index stamp

@pytest.mark.parametrize("index", [0, 1, 2, 255, 256, 4097, 65535])
def test_index_stamp_reads_back_also_scaled(index):
    rgb = stamp_index(np.random.default_rng(index).integers(0, 256, (240, 320, 3), dtype=np.uint8), index)
    assert read_index(rgb) == index
    assert read_index(rgb.repeat(2, axis=0).repeat(2, axis=1)) == index  # 640x480
    assert read_index(rgb[::2, ::2]) == index  # 160x120


def test_unstamped_picture_reads_none():
    assert read_index(np.full((240, 320, 3), 128, np.uint8)) is None


def test_stamp_survives_h264_and_hls(tmp_path):
    playlist = tmp_path / "index.m3u8"
    assert Publisher(playlist, count=30).start().wait_done(20) == "done"
    capture = read_frame_indices(playlist)
    assert capture.indices == list(range(30)), capture.summary()
    assert capture.end == "eof" and capture.pts_increasing()


def test_publisher_reads_a_file_and_carries_indices_on(tmp_path):
    clip = tmp_path / "clip.mp4"
    frames = [pattern_frame(i) for i in range(10)]
    assert Publisher(clip, frames, loop=False).start().wait_done(20) == "done"
    out = tmp_path / "looped.ts"
    assert Publisher(out, clip, count=25, start_index=100).start().wait_done(20) == "done"  # loops the 10
    assert read_frame_indices(out).indices == list(range(100, 125))


# ---------------------------------------------------------------------------------------------
# RTSP relay

@needs_relay
def test_relay_round_trip_over_tcp(relay):
    nobody = read_frame_indices(relay.play_url, frames=1, timeout=(5, 5))
    assert nobody.end.startswith("HTTPNotFoundError"), nobody.end  # as MediaMTX: 404 until someone publishes
    with Publisher(relay.publish_url) as pub:
        relay.wait_publishing()
        capture = read_frame_indices(relay.play_url, frames=45, low_delay=True)
    assert capture.end == "frames" and capture.streams == ["video:h264"], capture.summary()
    assert capture.in_order() and not capture.missing() and not capture.unreadable, capture.summary()
    assert capture.frames[0].key  # a reader starts at a keyframe
    assert capture.pts_increasing()
    assert steady_latency(capture, pub) < 0.3  # ~40 ms here: one frame interval plus a few ms
    relay.wait_event("UNPUBLISH cam")
    assert [e for _, e in relay.events] == ["READY", "PUBLISH cam", "PLAY cam", "UNPUBLISH cam"]


@needs_relay
@pytest.mark.parametrize("abrupt", [False, True], ids=["teardown", "killed"])
def test_publisher_restart_seen_by_a_reconnecting_reader(relay, abrupt):
    with Publisher(relay.publish_url) as pub:
        relay.wait_publishing()
        reader = StreamReader(relay.play_url, timeout=(10, 5)).start()
        reader.wait_frames(15)
        pub.stop(abrupt=abrupt)
        gone = time.monotonic()
        before = reader.wait_done(10)
        assert before.end == "eof", before.summary()  # the relay drops its readers with the publisher
        assert time.monotonic() - gone < 3.0
        pub.start()
        after, failures = read_when_available(relay.play_url, frames=15, within=15)
    assert after.end == "frames", (after.summary(), failures)
    assert all(f.startswith("HTTPNotFoundError") for f in failures), failures
    assert min(after.indices) > max(before.indices)  # a new session, indices carried on
    assert after.in_order() and not after.missing() and not before.missing()
    assert pub.sessions == 2


@needs_relay
def test_stalled_publisher_keeps_reader_connected():
    with RtspRelay(on_publisher_stop="stall") as relay, Publisher(relay.publish_url) as pub:
        relay.wait_publishing()
        reader = StreamReader(relay.play_url, timeout=(10, 8)).start()
        reader.wait_frames(15)
        pub.stop()
        last_before = pub.next_index - 1
        time.sleep(1.0)
        pub.start()
        capture = reader.wait_frames(last_before + 30, timeout=15)
        reader.stop()
    assert capture.in_order() and not capture.unreadable, capture.summary()
    assert capture.indices[-1] > last_before + 15  # the same connection carries the new session
    assert max(np.diff([f.arrival for f in capture.frames])) > 1.0  # after the gap


@needs_relay
def test_relay_refuses_a_second_publisher(relay):
    with Publisher(relay.publish_url):
        relay.wait_publishing()
        second = Publisher(relay.publish_url, start_index=5000).start()
        assert second.wait_done(15).startswith("error HTTPBadRequestError")  # at its first mux
        capture = read_frame_indices(relay.play_url, frames=10)
    assert capture.indices and max(capture.indices) < 5000, capture.summary()


@needs_relay
def test_audio_passes_the_relay():
    with RtspRelay(audio=True) as relay, Publisher(relay.publish_url, audio=True):
        relay.wait_publishing()
        capture = read_frame_indices(relay.play_url, frames=30)
    assert capture.streams == ["video:h264", "audio:aac"], capture.summary()
    assert capture.audio_frames > 20 and capture.in_order() and not capture.missing()


# ---------------------------------------------------------------------------------------------
# Other transports

def test_udp_mpegts_round_trip():
    with UdpReceiver(timeout=(20, 2)) as rx:
        with Publisher(rx.url, count=45) as pub:
            pub.wait_done(15)
        capture = rx.wait_done(15)
    assert capture.indices == list(range(45)), capture.summary()
    assert capture.end.startswith("ExitError")  # UDP has no end: the read timeout ends it
    assert capture.pts_increasing()


def test_rtsp_listen_receiver_takes_one_publisher():
    with RtspListenReceiver(timeout=(20, 5)) as rx:
        with Publisher(rx.url, count=45) as pub:
            pub.wait_done(15)
        capture = rx.wait_done(15)
    assert capture.indices == list(range(45)), capture.summary()
    assert capture.end == "eof"


def test_rtmp_listen_receiver_takes_one_publisher():
    with RtmpListenReceiver(timeout=(20, 5), low_delay=True) as rx:
        with Publisher(rx.url, count=45) as pub:
            pub.wait_done(15)
        capture = rx.wait_done(15)
    assert capture.indices and capture.in_order() and not capture.missing(), capture.summary()
    assert capture.indices[-1] == 44
    assert capture.end.startswith("OSError")  # the publisher leaving reads as an I/O error, not EOF


# ---------------------------------------------------------------------------------------------
# Cleanup

def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # exited, waiting to be reaped by whoever inherited it


def test_helpers_exit_when_their_parent_is_killed():
    """No orphans: every helper process ends when the test process dies without cleaning up."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from tests.support.streams import Publisher, RtspRelay, UdpReceiver, rtsp_relay_unavailable
        helpers = []
        rx = UdpReceiver(timeout=(60, 60)).start()
        helpers += [rx, Publisher(rx.url).start()]
        if rtsp_relay_unavailable() is None:
            relay = RtspRelay().start()
            helpers += [relay, Publisher(relay.publish_url).start()]
        helpers[1].wait_sent(5)
        print(*[h._child.proc.pid for h in helpers], flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) >= 2 and not any(_gone(p) for p in pids)
    finally:
        parent.send_signal(signal.SIGKILL)  # no atexit, no finally: only the stdin pipes close
        parent.wait()
        parent.stdout.close()
    deadline = time.monotonic() + 10
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(p) for p in pids), [p for p in pids if not _gone(p)]


def test_stop_leaves_no_process():
    rx = UdpReceiver().start()
    pub = Publisher(rx.url).start()
    pub.wait_sent(3)
    pub.stop()
    rx.stop()
    assert pub._child.proc.returncode == 0 and pub.ended == "stopped"  # SIGTERM: a clean end
    assert rx._child.proc.poll() is not None
    if RELAY_MISSING is None:
        relay = RtspRelay().start()
        assert relay.stop() == 0 and relay._child.proc.poll() is not None
