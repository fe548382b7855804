"""Timestamps for every decoded frame: strictly increasing, and as close to the file's own as
the file allows.

Most files need nothing: every frame has a pts and they increase. Damaged or odd files do not:
raw streams and some AVI files carry no pts at all or pts attached to the wrong frames (B-frames
stored in decode order), spliced files restart their clock, VFR files repeat a timestamp. An
encoder refuses a frame whose pts does not increase, and the old fix, one tick after the
previous frame, squeezed a run of such frames into a few milliseconds. Here:

1. Each frame's timestamp is FFmpeg's own "best effort" choice (``guess_correct_pts`` in
   libavcodec, which PyAV does not expose): the frame's pts, unless pts values have gone
   backwards more often than the packets' dts values, then its dts.
2. A frame whose timestamp is missing or not after the previous one is held back (a few
   frames at most). When a good timestamp follows, the held frames are spread evenly between
   the two good ones, so a repeated timestamp costs nothing and the clock does not drift.
3. At the start of a file, frames are held until its first timestamp (``START_HOLD_S`` of
   frames at most: a capture that starts mid-stream), then placed one nominal step apart
   before it: every later frame keeps its own timestamp, so the picture stays with the sound.
4. When no good timestamp comes soon, or the clock jumped back by more than a second (a
   splice, a restart), the held frames get one nominal frame step each after the last good
   frame, and the file's later timestamps are shifted by the same amount, keeping their
   spacing: the video plays at its own pace, shifted, instead of collapsing. A timestamp
   that comes back behind such guessed frames shifts the clock the same way, once (else
   every later frame would be held and guessed in turn).

Every frame that did not keep its own timestamp is counted (``fixed``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

HOLD_MAX = 8  # frames held back while waiting for a good timestamp
START_HOLD_S = 2.0  # the same at the start of a file, where the frames can be placed before the first one
REBASE_AFTER_S = 1.0  # a jump back by more than this is a new clock, not a late frame


class _BestEffort:
    """FFmpeg's guess_correct_pts: trust pts unless it has faulted more often than dts."""

    def __init__(self):
        self.faulty_pts = self.faulty_dts = 0
        self.last_pts = self.last_dts = None

    def __call__(self, pts: int | None, dts: int | None) -> int | None:
        if dts is not None:
            self.faulty_dts += self.last_dts is not None and dts <= self.last_dts
            self.last_dts = dts
        elif pts is not None:
            self.last_dts = pts
        if pts is not None:
            self.faulty_pts += self.last_pts is not None and pts <= self.last_pts
            self.last_pts = pts
        elif dts is not None:
            self.last_pts = dts
        if pts is not None and (self.faulty_pts <= self.faulty_dts or dts is None):
            return pts
        return dts


@dataclass
class TimestampRepair:
    """Feed frames in decode-output order with ``push``; collect them, with ``.pts`` set, from
    the returned lists (and from ``flush()`` at the end).

    ``step``: the nominal frame duration in time-base ticks (>= 1); ``start``: where a file
    whose first frames have no timestamp begins.
    """

    step: int
    start: int = 0
    rebase_after: int = 0  # ticks; 0: REBASE_AFTER_S worth of nominal steps
    fixed: int = 0
    _held: list = field(default_factory=list)
    _last: int | None = None  # the last pts handed out
    _offset: int = 0  # added to the file's timestamps after a rebase
    _guessed: bool = False  # the last frames handed out were extrapolated, not the file's own
    _guess: _BestEffort = field(default_factory=_BestEffort)

    def __post_init__(self):
        self.step = max(1, int(self.step))
        if not self.rebase_after:
            self.rebase_after = self.step * 25

    def push(self, item, pts: int | None, dts: int | None) -> list:
        """``item`` is anything with a writable ``pts`` attribute. Returns the items whose
        timestamps are now settled, in order."""
        out: list = []
        ts = self._guess(pts, dts)
        if ts is not None:
            ts += self._offset
            if self._last is not None and (ts <= self._last - self.rebase_after or (self._guessed and ts <= self._last)):
                # a new clock, or the file's own behind our guesses: keep its spacing, after ours
                out = self._extrapolate()
                self._offset += self._last + self.step - ts
                ts = self._last + self.step
        # a good timestamp leaves at least one tick for each held frame
        if ts is None or (self._last is not None and ts <= self._last + len(self._held)):
            self._held.append(item)
            self.fixed += 1
            return out + (self._extrapolate() if len(self._held) >= self._hold_max() else [])
        out += self._spread_until(ts)
        item.pts = self._last = ts
        self._guessed = False
        out.append(item)
        return out

    def _hold_max(self) -> int:
        if self._last is None:  # nothing handed out yet: wait for the first timestamp, longer
            return max(HOLD_MAX, round(START_HOLD_S / REBASE_AFTER_S * self.rebase_after / self.step))
        return HOLD_MAX

    def flush(self) -> list:
        return self._extrapolate()

    def _spread_until(self, ts: int) -> list:
        """Place the held frames evenly between the last good timestamp and ``ts`` (or, at the
        start of a file, one nominal step apart before ``ts``)."""
        held, self._held = self._held, []
        if not held:
            return []
        lo = self._last if self._last is not None else ts - (len(held) + 1) * self.step
        gap = (ts - lo) / (len(held) + 1)
        for k, item in enumerate(held, 1):
            item.pts = lo + max(k, int(round(gap * k)))
        return held

    def _extrapolate(self) -> list:
        """No good timestamp came: one nominal step each after the last good one."""
        held, self._held = self._held, []
        base = self._last if self._last is not None else self.start - self.step
        for k, item in enumerate(held, 1):
            item.pts = base + k * self.step
        if held:
            self._last = held[-1].pts
            self._guessed = True
        return held
