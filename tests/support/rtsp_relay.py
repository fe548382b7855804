#!/usr/bin/python3
"""A small RTSP relay for tests, on gst-rtsp-server. It needs Debian's python3-gi, so it runs under
/usr/bin/python3, not the project's venv; tests start it through ``tests.support.streams.RtspRelay``.

Publishers RECORD to ``rtsp://127.0.0.1:PORT/<path>``; readers PLAY ``rtsp://127.0.0.1:PORT/<path>_out``
(gst-rtsp-server cannot RECORD and PLAY one path). Paths: ``cam`` takes H.264, ``av`` takes H.264 then
AAC (gst-rtsp-server maps the publisher's SDP onto the mount's fixed depayloaders, in order).

The two sides meet inside this process: the RECORD pipeline ends in appsinks whose samples, caps
included (so no codec parameters are hard-wired), are pushed into the appsrcs of the PLAY pipeline
while one exists. Behaviour chosen to match MediaMTX, what users run:
- PLAY while nobody publishes: 404 at once (not a DESCRIBE that hangs until a publisher comes);
- publisher leaves: its readers are disconnected (``--on-publisher-stop disconnect``), or, with
  ``stall``, kept connected with no data, like a camera behind a dead network link.

Prints ``READY <port>`` on stdout once it listens, then one line per event (``PUBLISH <path>``,
``UNPUBLISH <path>``, ``PLAY <path>``). Exits on SIGTERM/SIGINT, and when stdin closes, so a parent
that dies without cleaning up does not leave it running.

    /usr/bin/python3 rtsp_relay.py [--port 0] [--threads 16] [--latency-ms 200] [--on-publisher-stop disconnect]
    /usr/bin/python3 rtsp_relay.py --check    # exit status 0 when everything it needs is installed
"""

import argparse
import os
import signal
import sys
import threading

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtsp", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtsp, GstRtspServer  # noqa: E402

MOUNTS = {"cam": ("video",), "av": ("video", "audio")}
DEPAY = {
    # config-interval=-1: SPS/PPS before every keyframe. Publishers with a global header (PyAV's RTSP
    # output) send them only in the SDP, so a PLAY pipeline started mid-stream would never get them.
    "video": "rtph264depay name=depay{i} ! h264parse config-interval=-1"
             " ! video/x-h264,stream-format=byte-stream,alignment=au",
    "audio": "rtpmp4gdepay name=depay{i} ! aacparse",
}
PAY = {
    "video": "h264parse ! rtph264pay name=pay{i} pt=96 config-interval=-1",
    "audio": "aacparse ! rtpmp4gpay name=pay{i} pt=97",
}
# what the pipelines above use, for --check
ELEMENTS = ("rtph264depay", "h264parse", "rtph264pay", "rtpmp4gdepay", "aacparse", "rtpmp4gpay", "appsink", "appsrc")


def say(line):
    print(line, flush=True)


class Mount:
    """One RECORD path and its PLAY path: the publisher's samples, the PLAY pipeline's appsrcs, and the
    clients playing it."""

    def __init__(self, server, name, kinds, on_stop):
        self.server, self.name, self.kinds, self.on_stop = server, name, kinds, on_stop
        self.lock = threading.Lock()
        self.publishing = False
        self.outputs = []  # {kind: appsrc}, one per PLAY pipeline (one per reader)
        self.players = set()

    def push(self, kind, sample):
        with self.lock:
            sources = [out[kind] for out in self.outputs]
        caps = sample.get_caps()
        for src in sources:
            current = src.get_property("caps")
            if current is None or not current.is_equal(caps):
                src.set_property("caps", caps)
            # each PLAY pipeline runs on its own clock base: drop the publisher's times, appsrc stamps on arrival
            buf = sample.get_buffer().copy()
            buf.pts = buf.dts = Gst.CLOCK_TIME_NONE
            src.emit("push-buffer", buf)

    def set_publishing(self, value):
        with self.lock:
            self.publishing = value
            players = set(self.players) if not value and self.on_stop == "disconnect" else set()
        say(f"{'PUBLISH' if value else 'UNPUBLISH'} {self.name}")
        if players:
            self.server.client_filter(
                lambda _s, c: GstRtspServer.RTSPFilterResult.REMOVE if c in players
                else GstRtspServer.RTSPFilterResult.KEEP)


class RecordFactory(GstRtspServer.RTSPMediaFactory):
    def __init__(self, mount, latency_ms):
        super().__init__()
        self.mount = mount
        self.set_transport_mode(GstRtspServer.RTSPTransportMode.RECORD)
        self.set_latency(latency_ms)
        parts = [f"{DEPAY[k].format(i=i)} ! appsink name=out_{k} sync=false emit-signals=true"
                 for i, k in enumerate(mount.kinds)]
        self.set_launch("( " + " ".join(parts) + " )")

    def do_configure(self, media):
        GstRtspServer.RTSPMediaFactory.do_configure(self, media)
        pipeline = media.get_element()
        for kind in self.mount.kinds:
            pipeline.get_by_name(f"out_{kind}").connect("new-sample", self._on_sample, kind)
        media.connect("prepared", lambda _m: self.mount.set_publishing(True))
        media.connect("unprepared", lambda _m: self.mount.set_publishing(False))

    def _on_sample(self, sink, kind):
        self.mount.push(kind, sink.emit("pull-sample"))
        return Gst.FlowReturn.OK


class PlayFactory(GstRtspServer.RTSPMediaFactory):
    def __init__(self, mount):
        super().__init__()
        self.mount = mount
        # a pipeline per reader: readers come and go without touching each other's state
        self.set_shared(False)
        self.set_latency(0)
        parts = [f"appsrc name=in_{k} is-live=true format=time do-timestamp=true ! {PAY[k].format(i=i)}"
                 for i, k in enumerate(mount.kinds)]
        self.set_launch("( " + " ".join(parts) + " )")

    def do_configure(self, media):
        GstRtspServer.RTSPMediaFactory.do_configure(self, media)
        pipeline = media.get_element()
        sources = {k: pipeline.get_by_name(f"in_{k}") for k in self.mount.kinds}
        with self.mount.lock:
            self.mount.outputs.append(sources)

        def gone(_media):
            with self.mount.lock:
                self.mount.outputs = [out for out in self.mount.outputs if out is not sources]
        media.connect("unprepared", gone)


def watch_client(client, recording, playing):
    """Hooks on one client's requests; ``recording``/``playing`` map RECORD/PLAY paths to mounts."""
    def pre_announce(client, ctx):
        mount = recording.get(ctx.uri.abspath)
        if mount is not None:
            with mount.lock:
                if mount.publishing:  # one publisher per path, as MediaMTX by default
                    return GstRtsp.RTSPStatusCode.BAD_REQUEST
        return GstRtsp.RTSPStatusCode.OK

    def pre_describe(client, ctx):
        mount = playing.get(ctx.uri.abspath)
        if mount is not None:
            with mount.lock:
                if not mount.publishing:
                    return GstRtsp.RTSPStatusCode.NOT_FOUND
        return GstRtsp.RTSPStatusCode.OK

    def play(client, ctx):
        mount = playing.get(ctx.uri.abspath)
        if mount is not None:
            with mount.lock:
                mount.players.add(client)
            say(f"PLAY {mount.name}")

    def closed(client):
        for mount in playing.values():
            with mount.lock:
                mount.players.discard(client)

    client.connect("pre-announce-request", pre_announce)
    client.connect("pre-describe-request", pre_describe)
    client.connect("play-request", play)
    client.connect("closed", closed)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0, help="0: a free port, printed on the READY line")
    ap.add_argument("--threads", type=int, default=16,
                    help="client threads: with the default pool a PLAY DESCRIBE waiting for preroll blocks "
                         "the thread that receives the RECORD client's interleaved RTP")
    ap.add_argument("--latency-ms", type=int, default=200, help="jitter buffer on the RECORD side")
    ap.add_argument("--on-publisher-stop", choices=("disconnect", "stall"), default="disconnect")
    ap.add_argument("--check", action="store_true", help="exit 0 if every GStreamer element it uses is installed")
    args = ap.parse_args()

    Gst.init(None)
    missing = [name for name in ELEMENTS if Gst.ElementFactory.find(name) is None]
    if missing:
        sys.exit(f"rtsp_relay: GStreamer elements missing: {' '.join(missing)}")
    if args.check:
        return
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    server.get_thread_pool().set_max_threads(args.threads)
    mount_points = server.get_mount_points()
    recording, playing = {}, {}
    for name, kinds in MOUNTS.items():
        mount = Mount(server, name, kinds, args.on_publisher_stop)
        recording[f"/{name}"], playing[f"/{name}_out"] = mount, mount
        mount_points.add_factory(f"/{name}", RecordFactory(mount, args.latency_ms))
        mount_points.add_factory(f"/{name}_out", PlayFactory(mount))
    server.connect("client-connected", lambda _s, client: watch_client(client, recording, playing))
    if server.attach(None) == 0:
        sys.exit("rtsp_relay: cannot listen")

    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_HIGH, sig, loop.quit)

    def stdin_event(fd, _condition):
        if os.read(fd, 4096):
            return True
        loop.quit()  # EOF: the parent is gone
        return False
    GLib.unix_fd_add_full(GLib.PRIORITY_DEFAULT, sys.stdin.fileno(),
                          GLib.IOCondition.IN | GLib.IOCondition.HUP | GLib.IOCondition.ERR, stdin_event)
    say(f"READY {server.get_bound_port()}")
    loop.run()


if __name__ == "__main__":
    main()
