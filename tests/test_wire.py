"""The ZeroMQ wire format, over real sockets."""

import json

import numpy as np
import pytest
import zmq

from workers import wire


def _crop(size=8, **kw):
    fields = dict(job="j", frame=3, track=1, face=0, model="identity", size=size, shape=(size, size, 3),
                  affine=((1.0, 0.0, 2.0), (0.0, 1.0, 3.0)))
    return wire.Crop(**(fields | kw))


def test_header_and_pixels_cross_a_real_socket_pair_unchanged():
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://wire-test")
    b.connect("inproc://wire-test")
    pixels = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    a.send_multipart(wire.encode(_crop(), pixels), copy=False)
    header, received = wire.decode(b.recv_multipart(copy=False))
    assert header == _crop() and np.array_equal(received, pixels)
    a.close()
    b.close()


def test_headers_are_plain_json():
    frames = wire.encode(wire.Hello(job="abc"))
    assert json.loads(frames[0]) == {"v": wire.PROTOCOL_VERSION, "kind": "hello", "job": "abc"}


@pytest.mark.parametrize("frames, reason", [
    ([b"not json"], "bad header"),
    ([json.dumps({"v": 1, "kind": "hello", "job": "j"}).encode()], "bad header"),  # an older protocol
    ([json.dumps({"v": 3, "kind": "hello", "job": "j"}).encode()], "bad header"),
    ([json.dumps({"v": 2, "kind": "hello", "job": "j", "extra": 1}).encode()], "bad header"),
    ([json.dumps({"v": 2, "kind": "teleport"}).encode()], "bad header"),
    ([json.dumps({"v": 2, "kind": "forgot"}).encode()], "bad header"),
    ([_crop().model_dump_json().encode()], "exactly one pixel frame"),
    ([_crop().model_dump_json().encode(), b"\x00" * 10], "expected 192"),
    ([_crop(size=8, shape=(8, 9, 3)).model_dump_json().encode(), b"\x00" * 216], "does not match size"),
    ([wire.Hello(job="j").model_dump_json().encode(), b"x"], "carries no pixels"),
])
def test_malformed_messages_are_rejected(frames, reason):
    with pytest.raises(wire.WireError, match=reason):
        wire.decode(frames)


def test_non_finite_affines_are_rejected():
    with pytest.raises(ValueError):
        _crop(affine=((float("nan"), 0.0, 0.0), (0.0, 1.0, 0.0)))


def test_a_deadline_travels_as_finite_time_left():
    header = json.loads(_crop(time_left_s=0.25).model_dump_json())
    assert header["time_left_s"] == 0.25 and "deadline" not in header
    with pytest.raises(ValueError):
        _crop(time_left_s=float("nan"))


def test_pickle_is_never_accepted():
    import pickle

    with pytest.raises(wire.WireError):
        wire.decode([pickle.dumps({"kind": "hello", "job": "j"})])
