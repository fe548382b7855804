"""Timestamp repair: strictly increasing, as close to the file's own as the file allows."""

import pytest

from streamer.io.timestamps import HOLD_MAX, TimestampRepair


class _Frame:
    def __init__(self):
        self.pts = None


def _repair(stamps, step=10, start=0):
    repair, out = TimestampRepair(step=step, start=start), []
    for pts, dts in stamps:
        out += repair.push(_Frame(), pts, dts)
    out += repair.flush()
    return [f.pts for f in out], repair.fixed


def _increasing(values):
    return all(b > a for a, b in zip(values, values[1:]))


def test_good_timestamps_pass_untouched_whatever_their_spacing():
    vfr = [0, 10, 30, 35, 90, 100]
    assert _repair([(p, p) for p in vfr]) == (vfr, 0)


def test_frames_without_pts_before_frames_with_pts_keep_the_pace():
    # the old fix put them one tick apart: the video's first second played in a few milliseconds
    out, fixed = _repair([(None, None)] * 5 + [(100 + 10 * i, None) for i in range(10)])
    assert fixed == 5 and _increasing(out) and len(out) == 15
    assert out[:5] == [50, 60, 70, 80, 90] and out[5:] == [100 + 10 * i for i in range(10)]


def test_a_repeated_timestamp_is_placed_between_its_neighbours():
    out, fixed = _repair([(0, None), (10, None), (10, None), (20, None), (40, None)])
    assert out == [0, 10, 15, 20, 40] and fixed == 1


def test_pts_stored_in_decode_order_fall_back_to_dts_like_ffmpeg():
    # AVI with B-frames: pts belong to other frames, dts are right
    stamps = [(2, 4), (8, 6), (6, 8), (10, 10), (4, 12), (16, 14), (14, 16), (18, 18), (12, 20), (24, 22)]
    out, _ = _repair(stamps, step=2)
    assert _increasing(out) and out[3:] == [10, 12, 14, 16, 18, 20, 22]


def test_a_clock_that_restarts_is_rebased_after_ours_keeping_its_spacing():
    stamps = [(10 * i, None) for i in range(40)] + [(10 * i, None) for i in range(5)]
    out, _ = _repair(stamps)
    assert _increasing(out) and out[40:] == [400, 410, 420, 430, 440]


@pytest.mark.parametrize("count", [1, HOLD_MAX - 1, HOLD_MAX, 3 * HOLD_MAX])
def test_a_stream_without_any_timestamp_gets_the_nominal_pace(count):
    out, fixed = _repair([(None, None)] * count, step=40, start=1000)
    assert out == [1000 + 40 * i for i in range(count)] and fixed == count


def test_frames_that_lag_behind_a_jump_are_spread_not_stacked():
    out, fixed = _repair([(0, None), (100, None), (50, None), (60, None), (200, None)])
    assert _increasing(out) and out[0:2] == [0, 100] and out[-1] == 200 and fixed == 2


@pytest.mark.parametrize("count", [HOLD_MAX - 1, HOLD_MAX, 3 * HOLD_MAX])
def test_frames_without_pts_at_the_start_go_before_the_first_timestamp_and_the_rest_keep_theirs(count):
    # an MPEG-TS capture that starts mid-stream: its start_time is the first pts it has
    own = [1000 + 10 * i for i in range(30)]
    out, fixed = _repair([(None, None)] * count + [(p, None) for p in own], step=10, start=1000)
    assert out[count:] == own and fixed == count
    assert out[:count] == [1000 - 10 * (count - k) for k in range(count)]


def test_a_timestamp_behind_guessed_frames_shifts_the_clock_once_not_every_later_frame():
    # frames without pts long enough to be guessed, then the file's own clock, behind the guesses
    stamps = [(10 * i, None) for i in range(5)] + [(None, None)] * HOLD_MAX + [(50 + 10 * i, None) for i in range(20)]
    out, fixed = _repair(stamps)
    assert _increasing(out) and fixed == HOLD_MAX
    assert all(b - a == 10 for a, b in zip(out, out[1:]))  # its own spacing, shifted after the guesses
