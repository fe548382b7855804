"""Property-based tests (hypothesis) for the two parsers that read untrusted input:

- the wire decoder, ``workers.wire.decode(frames)``: whatever arrives on a socket, it returns a
  validated header (and pixels of exactly the header's shape) or raises ``WireError`` with a
  message; any other exception would take down a worker or a decoder;
- the faces file, ``streamer.faces.faces_file.read_faces_file(path)``: whatever the file holds,
  it returns frame -> faces (five finite landmarks each) or raises ``FacesFileError`` whose
  message names ``file:line``, and that line is the first bad one.

Examples are derandomized (the same on every run) and nothing is stored between runs.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from streamer.faces.faces_file import FacesFileError, read_faces_file
from workers import wire

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---------------------------------------------------------------------- JSON-ish values

scalars = (st.none() | st.booleans() | st.integers(-3, 3000) | st.integers()  # huge ints too
           | st.floats() | st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=5), max_leaves=20)
numbers = st.integers(-10**6, 10**6) | st.floats() | st.integers() | st.sampled_from([1e308, -0.0, 10**400])


# ---------------------------------------------------------------------- the wire decoder


def _valid_headers() -> dict[str, dict]:
    crop = dict(v=1, kind="crop", job="j", frame=3, pts=None, track=1, face=0, model="identity", size=4,
                dtype="uint8", shape=[4, 4, 3], affine=[[1.0, 0.0, 2.0], [0.0, 1.0, 3.0]], deadline=None,
                temporal="full", reset=False)
    result = dict(v=1, kind="result", job="j", frame=3, track=1, face=0, model="identity", size=4, dtype="uint8",
                  shape=[4, 4, 3], worker="w")
    return {
        "hello": dict(v=1, kind="hello", job="j"),
        "credit": dict(v=1, kind="credit", worker="w", credits=4, models=["identity"], device="cpu"),
        "crop": crop,
        "result": result,
        "error": dict(v=1, kind="error", job="j", frame=3, track=1, face=0, reason="x", worker="w"),
        "end_track": dict(v=1, kind="end_track", job="j", track=1),
        "bye": dict(v=1, kind="bye", job="j"),
    }


VALID = _valid_headers()


@st.composite
def near_valid_messages(draw) -> list:
    """A valid header with a few fields changed, dropped or added, and 0-3 pixel frames of
    plausible or arbitrary sizes; sometimes as zmq.Frame objects, as recv_multipart(copy=False)
    returns them."""
    header = dict(VALID[draw(st.sampled_from(sorted(VALID)))])
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["set", "drop", "add"]))
        key = draw(st.sampled_from(sorted(header))) if header else "kind"
        if action == "set":
            header[key] = draw(json_values | numbers)
        elif action == "drop":
            header.pop(key, None)
        else:
            header[draw(st.text(max_size=6))] = draw(json_values)
    raw = json.dumps(header).encode()
    if draw(st.booleans()):
        raw = draw(st.sampled_from([raw[:-1], raw + b"x", raw.replace(b'"', b"'", 1), raw.upper(), raw * 2]))
    size = header.get("size", 4)
    pixel_sizes = st.sampled_from([0, 1, 47, 48, 49]) | st.integers(0, 300)
    if isinstance(size, int) and 0 < size <= 64:
        pixel_sizes = pixel_sizes | st.just(size * size * 3)
    frames: list = [raw] + [bytes(draw(pixel_sizes)) for _ in range(draw(st.integers(0, 3)))]
    if draw(st.booleans()):
        frames = [zmq.Frame(f) for f in frames]
    return frames


def _check_decode(frames: list) -> None:
    try:
        header, pixels = wire.decode(frames)
    except wire.WireError as exc:
        assert str(exc).strip(), "a WireError without a message"
        return
    # accepted: it must be a message of the protocol, with pixels exactly as announced
    assert isinstance(header, (wire.Hello, wire.Credit, wire.Crop, wire.Result, wire.Error, wire.EndTrack, wire.Bye)
                      + tuple(getattr(wire, n) for n in ("Ping",) if hasattr(wire, n)))
    if isinstance(header, wire.WITH_PIXELS):
        assert pixels is not None and pixels.dtype == np.uint8 and pixels.shape == tuple(header.shape)
        assert tuple(header.shape) == (header.size, header.size, 3) and 0 < header.size <= wire.MAX_CROP_SIZE
        assert len(frames) == 2
    else:
        assert pixels is None and len(frames) == 1
    if isinstance(header, wire.Crop):
        assert all(math.isfinite(x) for row in header.affine for x in row)


@SETTINGS
@given(st.lists(st.binary(max_size=300), max_size=4))
@example([])
@example([b""])
@example([b"[" * 100_000])
@example([b'{"v": 1, "kind": "hello", "job": "\xff"}'])
@example([b'{"v": 1e999, "kind": "hello", "job": "j"}'])
def test_wire_decode_never_crashes_on_arbitrary_bytes(frames):
    _check_decode(frames)


@SETTINGS
@given(near_valid_messages())
def test_wire_decode_never_crashes_on_near_valid_messages(frames):
    _check_decode(frames)


@SETTINGS
@given(st.integers(1, 24), st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=6,
                                    max_size=6), st.integers(0, 2**31), st.booleans())
def test_wire_valid_crops_round_trip(size, affine, frame, as_zmq_frames):
    header = wire.Crop(job="j", frame=frame, track=0, face=0, model="identity", size=size, shape=(size, size, 3),
                       affine=(tuple(affine[:3]), tuple(affine[3:])))
    pixels = np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8)
    frames = [bytes(memoryview(f)) for f in wire.encode(header, pixels)]
    if as_zmq_frames:
        frames = [zmq.Frame(f) for f in frames]
    got, got_pixels = wire.decode(frames)
    assert got == header and np.array_equal(got_pixels, pixels)


# ---------------------------------------------------------------------- the faces file

LANDMARKS = [[10.0, 10.0], [20.0, 10.0], [15.0, 15.0], [11.0, 20.0], [19.0, 20.0]]


@st.composite
def faces(draw) -> object:
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    point = st.lists(numbers, min_size=2, max_size=2) | json_values
    landmarks = draw(st.just(LANDMARKS) | st.lists(point, min_size=5, max_size=5) | st.lists(point, max_size=7)
                     | json_values)
    face = {"landmarks": landmarks}
    if draw(st.booleans()):
        face["box"] = draw(st.just([5, 5, 25, 25]) | st.lists(numbers, min_size=4, max_size=4) | json_values)
    if draw(st.booleans()):
        face["score"] = draw(numbers | json_values)
    if draw(st.booleans()):
        face["track"] = draw(st.integers() | json_values)
    return face


@st.composite
def records(draw) -> str:
    """One line: usually a (possibly broken) record, sometimes arbitrary text or blank."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.text(max_size=40).map(lambda s: s.replace("\n", " ").replace("\r", " ")))
    if kind == 1:
        return ""
    record = {"frame": draw(st.integers(0, 50) | st.integers(-5, 10**6) | numbers | json_values),
              "faces": draw(st.lists(faces(), max_size=3) | json_values)}
    if draw(st.integers(0, 4)) == 0:
        record.pop(draw(st.sampled_from(["frame", "faces"])))
    if draw(st.integers(0, 4)) == 0:
        record["note"] = draw(st.text(max_size=10))
    return json.dumps(record, ensure_ascii=draw(st.booleans()))


def _check_faces_file(path, lines: list[str]) -> None:
    path.write_text("\n".join(lines), encoding="utf-8")
    try:
        parsed = read_faces_file(path)
    except FacesFileError as exc:
        message = str(exc)
        found = re.search(re.escape(str(path)) + r":(\d+)\b", message)
        assert found, f"the message does not name {path}:<line>: {message!r}"
        number = int(found.group(1))
        assert 1 <= number <= len(lines), f"line {number} of a {len(lines)}-line file: {message!r}"
        # the named line is the first bad one: everything before it is accepted
        path.write_text("\n".join(lines[:number - 1]), encoding="utf-8")
        try:
            read_faces_file(path)
        except FacesFileError as earlier:
            raise AssertionError(f"named line {number}, but the lines before it fail too: {earlier}") from None
        return
    for frame, found_faces in parsed.items():
        assert isinstance(frame, int) and not isinstance(frame, bool) and frame >= 0, f"frame key {frame!r}"
        for face in found_faces:
            assert face.landmarks.shape == (5, 2) and np.all(np.isfinite(face.landmarks))
            assert np.all(np.isfinite(face.box)) and math.isfinite(face.score)


@pytest.fixture(scope="module")
def faces_path(tmp_path_factory):
    return tmp_path_factory.mktemp("faces") / "faces.jsonl"


@SETTINGS
@given(lines=st.lists(records(), max_size=6))
@example(lines=['{"frame": 0, "faces": [{"landmarks": [[1e999, 1], [1, 1], [1, 1], [1, 1], [1, 1]]}]}'])
@example(lines=['{"frame": 0, "faces": [{"landmarks": [[' + "9" * 400 + ', 1], [1, 1], [1, 1], [1, 1], [1, 1]]}]}'])
@example(lines=['{"frame": 0, "faces": [{"landmarks": ' + json.dumps(LANDMARKS) + ', "score": ' + "9" * 400 + '}]}'])
@example(lines=['{"frame": 0, "faces": [{"landmarks": ' + json.dumps(LANDMARKS) + ', "box": [0, 0, 1e400, 5]}]}'])
@example(lines=["[" * 100_000])
@example(lines=['{"frame": true, "faces": []}'])
@example(lines=['{"frame": 1.0, "faces": []}'])
def test_faces_file_never_crashes_and_names_the_line(faces_path, lines):
    _check_faces_file(faces_path, lines)


@SETTINGS
@given(data=st.binary(max_size=400))
@example(data=b"\xff\xfe{}")
@example(data=b'{"frame": 0, "faces": []}\n\xff\n')
def test_faces_file_arbitrary_bytes_never_crash(faces_path, data):
    faces_path.write_bytes(data)
    try:
        read_faces_file(faces_path)
    except FacesFileError as exc:
        assert re.search(re.escape(str(faces_path)) + r":\d+", str(exc)), f"no file:line in {str(exc)!r}"


@SETTINGS
@given(notes=st.lists(st.text(max_size=12), min_size=1, max_size=4))
@example(notes=["a\u2028b"])
@example(notes=["page\x0cbreak", "next\x85line", "sep\x1cx"])
def test_faces_file_lines_are_split_on_newlines_only(faces_path, notes):
    """JSON Lines separates records with \\n; a JSON string may hold U+2028, U+0085 and the like
    raw, and a valid file must parse with its faces on the right frames."""
    lines = [json.dumps({"frame": i, "faces": [{"landmarks": LANDMARKS}], "note": note}, ensure_ascii=False)
             for i, note in enumerate(notes)]
    faces_path.write_text("\n".join(lines), encoding="utf-8")
    parsed = read_faces_file(faces_path)
    assert sorted(parsed) == list(range(len(notes))) and all(len(f) == 1 for f in parsed.values())


@SETTINGS
@given(frames=st.lists(st.integers(0, 10**6), max_size=8), crlf=st.booleans(), blank=st.booleans())
def test_faces_file_valid_files_parse_completely(faces_path, frames, crlf, blank):
    lines = [json.dumps({"frame": f, "faces": [{"landmarks": LANDMARKS, "score": 0.5, "track": i}]})
             for i, f in enumerate(frames)]
    if blank:
        lines = [x for line in lines for x in (line, "")]
    faces_path.write_text(("\r\n" if crlf else "\n").join(lines), encoding="utf-8")
    parsed = read_faces_file(faces_path)
    assert sorted(parsed) == sorted(set(frames))
    assert sum(len(v) for v in parsed.values()) == len(frames)
