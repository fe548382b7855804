"""A live job: a camera (or a stream, or a file played in real time) in, restored pictures out
to one or more outputs, until cancelled. ``gpen-stream live`` runs one; ``gpen-stream serve``
runs them as jobs (``serve.live_sources``) and for the streams of its config.

The same data path as a file job (``streamer.pipeline``) with the live policy:

- each frame has a deadline, ``live.latency_ms`` after it arrived; faces not back by then go
  out as they came in (never held, never dropped for that reason) and the miss is counted;
- nothing queues up: the source drops its oldest frames when the job falls behind, at most
  about ``latency`` worth of frames are in flight, and the counters say what was dropped;
- outputs keep going while the input reconnects: after ``live.hold_frames`` frame intervals
  without a new frame they repeat the last picture, stamped by the clock;
- a reconnect (or a scene cut) restarts the face tracks and the workers' temporal state.

Cancelling (SIGTERM, a cancel request) is the normal end: recordings and HLS playlists are
closed cleanly, playable to their last frame.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

from configs import JobOptions, LiveSettings
from configs.errors import InputError
from streamer.dispatch import live_policy
from streamer.pipeline import JobResult, Progress

NETWORK_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "srt", "udp", "rtp", "tcp", "http", "https")


class LiveRefused(InputError):
    """A live input that this process may not open (serve.live_sources)."""


@dataclass(frozen=True)
class LiveStream:
    """One live feed as a job: where from, where to."""

    input: str
    outputs: tuple[str, ...]
    realtime: bool = False  # a local file played at its own pace (demos, tests)
    loop: bool = False


def is_stream_url(text: str) -> bool:
    return urlsplit(text).scheme.lower() in NETWORK_SCHEMES


def check_allowed(url: str, allowed: list[str], *, role: str = "input", setting: str = "serve.live_sources") -> None:
    """``allowed`` holds "scheme://host" (host may be *) entries; the URL must match one."""
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    for entry in allowed:
        rule = urlsplit(entry if "://" in entry else f"{entry}://*")
        if rule.scheme.lower() == scheme and (rule.netloc in ("*", "") or (rule.hostname or "").lower() == host):
            return
    shown = f"{scheme}://{host}"
    raise LiveRefused(f"live {role} {shown} is not allowed here ({setting}: "
                      f"{', '.join(allowed) or 'none: refused'})")


def run_live(engine, stream: LiveStream, options: JobOptions, settings: LiveSettings, *,
             cancel: threading.Event, progress: Callable[[Progress], None] | None = None,
             job_id: str | None = None, faces_by_frame=None) -> JobResult:
    """Run until ``cancel`` is set (then ``Cancelled`` is raised, the outputs closed cleanly)."""
    from streamer.io.live_source import LiveSource
    from streamer.io.stream_sink import TeeSink, open_sink

    source = LiveSource(stream.input, transport=settings.rtsp_transport, realtime=stream.realtime, loop=stream.loop,
                        stall_s=settings.stall_s, open_timeout_s=settings.open_timeout_s,
                        backoff_max_s=settings.backoff_max_s, stop=cancel)
    try:
        info = source.open()
        sinks = [open_sink(target, codec=options.codec, crf=options.crf, preset=options.preset,
                           segment_time_s=settings.segment_time_s, hls_time_s=settings.hls_time_s,
                           hls_list_size=settings.hls_list_size, transport=settings.rtsp_transport)
                 for target in stream.outputs]
        sink = sinks[0] if len(sinks) == 1 else TeeSink(sinks)
    except BaseException:
        source.close()
        raise
    fps = float(info.rate) if info.rate else 25.0
    latency_s = settings.latency_ms / 1000
    policy = live_policy(latency_s, hold_s=settings.hold_frames / fps)
    in_flight = max(4, math.ceil(latency_s * fps) + 2)  # more would only queue frames that will be late

    def report(p: Progress) -> None:
        if p.live is not None:  # what the outputs could not take in time counts as dropped too
            p.live["dropped_out"] = sum(s.dropped for s in sinks)
            p.live["output_reconnects"] = sum(s.reconnects for s in sinks)
        if progress is not None:
            progress(p)

    return engine.run(source, sink, options, policy=policy, progress=report, cancel=cancel, job_id=job_id,
                      max_in_flight=in_flight, faces_by_frame=faces_by_frame)
