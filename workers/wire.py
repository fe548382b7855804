"""The ZeroMQ wire format between decoders and workers (DESIGN.md section 4). Defined once,
imported by both sides.

Every message is multipart: ``[header JSON (utf-8), pixels?]``. Pixels are a contiguous
uint8 HWC RGB array sent zero-copy (``copy=False``). No pickle anywhere: a header is JSON
validated against the models below, and pixels are raw bytes whose length must match the
header's shape.

Flow (decoder = DEALER, worker = ROUTER):
  decoder -> worker   hello       "I am here"; the worker answers with credit
  worker  -> decoder  credit      how many more crops it will accept, and what it serves
  decoder -> worker   crop        one aligned face crop (+ pixels)
  worker  -> decoder  result      the restored crop (+ pixels); returns one credit
  worker  -> decoder  error       a crop it could not restore (returns one credit)
  worker  -> decoder  forgot      "I do not know you" (it restarted, or forgot a silent decoder):
                                  the answer to a crop or ping from an unknown decoder
  worker  -> decoder  leaving     it is stopping: it finishes the crops it holds; send it no more
  decoder -> worker   leaving     the answer: heard (nothing more comes from this decoder)
  decoder -> worker   end_track   forget a track's temporal state
  decoder -> worker   ping        "still here" (once a second); a worker forgets a decoder
                                  that went silent, with its temporal state
  decoder -> worker   bye         this decoder is done; forget its state

A worker restores crops only for decoders that said hello (and so were granted credits). A
crop or ping from a decoder it does not know gets ``forgot``: nothing the decoder sent it
before is held there any more, so the decoder re-sends every crop it had not had answered and
says hello again. A hello always opens a fresh session: the credit that answers it is the
whole window, and nothing of an earlier session is answered after it. A worker that stops
says ``leaving``: the decoder sends it nothing more, and it restores what it holds or was sent
before the decoder heard (at most the credits it granted), then exits.

A deadline travels as the time left when the crop was sent, not as a time of day: the two
machines' clocks need not agree.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

PROTOCOL_VERSION = 2  # 2: forgot, leaving, time_left_s, sessions
MAX_CROP_SIZE = 2048
MAX_MESSAGE_BYTES = MAX_CROP_SIZE * MAX_CROP_SIZE * 3 + 65536  # larger message parts are refused unread
TEMPORAL_MODES = ("off", "landmarks", "full")
HEARTBEAT_S = 1.0  # workers send credit(0), decoders send ping, this often
PEER_TIMEOUT_S = 30.0  # a worker forgets a decoder it has not heard from for this long


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    v: Literal[2] = PROTOCOL_VERSION


class Hello(_Message):
    kind: Literal["hello"] = "hello"
    job: str


class Credit(_Message):
    kind: Literal["credit"] = "credit"
    worker: str
    credits: int = Field(ge=0)
    models: tuple[str, ...] = ()
    device: str = ""


class Crop(_Message):
    """One aligned face: ``affine`` maps frame pixels to crop pixels (2x3)."""

    kind: Literal["crop"] = "crop"
    job: str
    frame: int = Field(ge=0)  # decode-order index
    pts: int | None = None
    track: int = Field(ge=0)
    face: int = Field(ge=0)  # index of this face within its frame
    model: str
    size: int = Field(gt=0, le=MAX_CROP_SIZE)
    dtype: Literal["uint8"] = "uint8"
    shape: tuple[int, int, int]
    affine: tuple[tuple[float, float, float], tuple[float, float, float]]
    time_left_s: float | None = None  # live jobs: the result is useless this long after the crop was sent
    temporal: Literal["off", "landmarks", "full"] = "full"
    reset: bool = False  # start this track's temporal state afresh (scene cut, new worker)

    @field_validator("affine")
    @classmethod
    def _finite(cls, value):
        if not all(math.isfinite(x) for row in value for x in row):
            raise ValueError("affine has non-finite values")
        return value

    @field_validator("time_left_s")
    @classmethod
    def _finite_time(cls, value):
        if value is not None and not math.isfinite(value):
            raise ValueError("time_left_s is not finite")
        return value


class Result(_Message):
    kind: Literal["result"] = "result"
    job: str
    frame: int
    track: int
    face: int
    model: str
    size: int = Field(gt=0, le=MAX_CROP_SIZE)
    dtype: Literal["uint8"] = "uint8"
    shape: tuple[int, int, int]
    worker: str = ""


class Error(_Message):
    kind: Literal["error"] = "error"
    job: str
    frame: int
    track: int
    face: int
    reason: str
    worker: str = ""


class Forgot(_Message):
    """The worker does not know this decoder (never greeted, restarted, or forgot it after a
    silence): every crop sent to it and not answered is lost; greet it again."""

    kind: Literal["forgot"] = "forgot"
    worker: str


class Leaving(_Message):
    """Worker to decoder: it is stopping; the crops it holds come back, send it no more.
    Decoder to worker, the answer: heard; nothing more comes from this decoder."""

    kind: Literal["leaving"] = "leaving"
    worker: str


class EndTrack(_Message):
    kind: Literal["end_track"] = "end_track"
    job: str
    track: int


class Ping(_Message):
    kind: Literal["ping"] = "ping"
    job: str


class Bye(_Message):
    kind: Literal["bye"] = "bye"
    job: str


Message = Annotated[Union[Hello, Credit, Crop, Result, Error, Forgot, Leaving, EndTrack, Ping, Bye],
                    Field(discriminator="kind")]
_ADAPTER: TypeAdapter = TypeAdapter(Message)
WITH_PIXELS = (Crop, Result)


class WireError(ValueError):
    """A message that does not follow this protocol; receivers drop it and count it."""


def encode(header: BaseModel, pixels: np.ndarray | None = None) -> list:
    """Frames for ``socket.send_multipart(frames, copy=False)``."""
    frames: list = [header.model_dump_json().encode()]
    if isinstance(header, WITH_PIXELS):
        if pixels is None or pixels.dtype != np.uint8 or pixels.shape != tuple(header.shape):
            raise WireError(f"{header.kind} pixels must be uint8 {tuple(header.shape)}")
        frames.append(np.ascontiguousarray(pixels))
    return frames


def decode(frames: list) -> tuple[BaseModel, np.ndarray | None]:
    """Validate a received multipart message. Raises WireError on anything malformed."""
    if not frames:
        raise WireError("empty message")
    try:
        header = _ADAPTER.validate_json(bytes(frames[0]))
    except (ValidationError, ValueError, UnicodeDecodeError) as exc:
        raise WireError(f"bad header: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(header, WITH_PIXELS):
        if len(frames) != 1:
            raise WireError(f"{header.kind} carries no pixels, got {len(frames) - 1} extra frames")
        return header, None
    if len(frames) != 2:
        raise WireError(f"{header.kind} needs exactly one pixel frame, got {len(frames) - 1}")
    h, w, c = header.shape
    if (h, w, c) != (header.size, header.size, 3):
        raise WireError(f"shape {header.shape} does not match size {header.size}")
    buffer = frames[1].buffer if hasattr(frames[1], "buffer") else frames[1]
    if len(memoryview(buffer).cast("B")) != h * w * c:
        raise WireError(f"pixel frame has {len(memoryview(buffer).cast('B'))} bytes, expected {h * w * c}")
    return header, np.frombuffer(buffer, dtype=np.uint8).reshape(h, w, c)
