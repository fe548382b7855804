"""The live source and live outputs on their own, without a server: a local file played at its
own pace (``--realtime --loop``) opens a new input session at every loop, which is what a
camera reconnect does to the copied streams and the clock."""

import subprocess
import threading

import av
import pytest

from streamer.io.live_source import LiveSource
from streamer.io.probe import packet_offset_s
from streamer.io.stream_sink import open_sink
from tests.support.clips import make_clip

FPS = 25


@pytest.fixture(scope="module")
def clip_with_audio(tmp_path_factory):
    folder = tmp_path_factory.mktemp("live-source")
    return make_clip(folder / "one-second.mp4", frames=FPS, fps=FPS, width=160, height=120, audio=True)


def _play(path, frames: int, on_frame=None):
    """Play ``path`` looped until ``frames`` frames came; returns (source, frames, packets)."""
    source = LiveSource(str(path), realtime=True, loop=True)
    source.open()
    packets, seen = [], []
    try:
        for item in source.frames(packets.append):
            seen.append(item)
            if on_frame is not None:
                on_frame(item, packets)
            if len(seen) >= frames:
                break
    finally:
        source.close()
    return source, seen, [p for p in packets if p is not None]


def test_copied_packets_outlive_the_input_session_they_came_from(clip_with_audio):
    source, frames, packets = _play(clip_with_audio.path, int(2.5 * FPS))
    assert [f.new_session for f in frames].count(True) >= 2  # it looped: the first input was closed
    assert packets and source.copied
    for p in packets:  # each belongs to a stream that stays open for the job, with its own bytes
        assert any(p.stream is s for s in source.copied)
        assert bytes(p)
    assert all(b.pts > a.pts for a, b in zip(frames, frames[1:]))


def test_copied_timestamps_keep_increasing_and_follow_the_pictures_across_sessions(clip_with_audio):
    _, frames, packets = _play(clip_with_audio.path, int(2.5 * FPS))
    dts = [p.dts for p in packets]
    assert dts == sorted(dts) and len(set(dts)) == len(dts)
    # the audio sits on the pictures' clock: it spans what the frames span, not a second apart
    offsets = [packet_offset_s(p) for p in packets]
    assert abs(offsets[0] - frames[0].time_s) < 0.15
    assert frames[-1].time_s - 0.5 < offsets[-1] < frames[-1].time_s + 1.0


def test_a_looped_file_records_its_audio_across_sessions(clip_with_audio, tmp_path):
    """The copied packets reach a recording after the input they came from was closed."""
    rec = tmp_path / "rec.mkv"
    sink = open_sink(str(rec), codec=None, crf=23, preset="ultrafast")
    opened = threading.Event()

    def write(item, packets):
        if not opened.is_set():
            sink.open(source_info[0], source_copied[0])
            opened.set()
        for p in packets:
            if p is not None:
                sink.copy(p)
        packets.clear()
        sink.write(item.frame, item.pts)

    source = LiveSource(str(clip_with_audio.path), realtime=True, loop=True)
    source_info, source_copied = [source.open()], [source.copied]
    packets = []
    try:
        for n, item in enumerate(source.frames(packets.append)):
            write(item, packets)
            if n >= int(2.5 * FPS):
                break
    finally:
        source.close()
    sink.commit()
    with av.open(str(rec)) as container:
        audio = container.streams.audio[0]
        got = [p for p in container.demux(audio) if p.size]
    assert len(got) > 2 * 48000 / 1024  # more than two seconds of AAC frames: both sessions' audio
    assert all(b.dts > a.dts for a, b in zip(got, got[1:]))
    probe = subprocess.run(["ffprobe", "-v", "error", str(rec)], capture_output=True, text=True)
    assert probe.returncode == 0 and not probe.stderr.strip()


def test_an_input_protocol_this_ffmpeg_lacks_fails_at_once_instead_of_being_retried():
    import time

    from configs.errors import InputError

    source = LiveSource("srt://127.0.0.1:9")  # this FFmpeg is built without libsrt
    started = time.monotonic()
    with pytest.raises(InputError, match="Protocol not found"):
        source.open()
    assert time.monotonic() - started < 3 and source.reconnects == 0


def test_an_output_protocol_this_ffmpeg_lacks_fails_the_job_instead_of_being_retried(clip_with_audio):
    import time

    from streamer.io.probe import MediaError

    source = LiveSource(str(clip_with_audio.path), realtime=True)
    info = source.open()
    sink = open_sink("srt://127.0.0.1:9", codec=None, crf=23, preset="ultrafast")
    try:
        sink.open(info, [])
        deadline = time.monotonic() + 5
        with pytest.raises(MediaError, match="cannot publish"):
            for item in source.frames(lambda p: None):
                sink.write(item.frame, item.pts)
                assert time.monotonic() < deadline
    finally:
        source.close()
        sink.abort()
    assert sink.reconnects == 0


def test_a_recording_never_overwrites_an_earlier_one_even_within_the_same_second(tmp_path):
    import time

    rec = tmp_path / "door.mkv"
    taken = {rec: b"first"}
    for when in (time.time(), time.time() + 1):  # this second's name and the next, should the clock turn
        taken[tmp_path / f"door-{time.strftime('%Y%m%d-%H%M%S', time.localtime(when))}.mkv"] = b"second"
    for path, data in taken.items():
        path.write_bytes(data)
    chosen = [open_sink(str(rec), codec=None, crf=23, preset="ultrafast").target for _ in range(2)]
    assert len(set(chosen)) == 2 and not set(map(str, taken)) & set(chosen)
    assert all(path.read_bytes() == data for path, data in taken.items())


def test_a_looped_file_plays_at_its_own_rate_across_loops(clip_with_audio):
    """Each loop's first frame is due one frame after the last one of the loop before (it came
    at once, so a one-second clip played 4% fast)."""
    import time

    arrivals = []
    _play(clip_with_audio.path, 3 * FPS + 1, on_frame=lambda item, _: arrivals.append(time.monotonic()))
    rate = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    assert abs(rate - FPS) < 0.25, rate
