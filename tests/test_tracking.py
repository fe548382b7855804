"""Tracking between full-frame detections (``--detect-every K``) on generated clips with known
landmarks, the detector answering from the ground truth (tests/support/tracking.py says why
and how). The error of a frame: the mean distance of its five landmarks from the truth, in
eye distances (what GPEN's alignment is given)."""

import numpy as np
import pytest

from streamer.faces import track
from tests.support.clips import TURN_FRAMES, Head, make_tracking_clip
from tests.support.tracking import VISIBLE_MIN, TruthDetector, head_errors, share_in_frame, track_clip

MAX_ERROR = 0.1  # eye distances, in every frame where the face is in view
EVERY = 5


@pytest.fixture(scope="module")
def turning(tmp_path_factory):
    """A head that rests 4 frames, then turns from side to side (40 degrees of yaw either way,
    shifting, tilting and scaling with it) in 8 frames, holding 8 frames in between."""
    return make_tracking_clip(tmp_path_factory.mktemp("turn") / "turn.mp4", [Head("turn", face_px=140, start=4)],
                              frames=40, width=640, height=360)


def test_region_search_keeps_every_frames_landmarks_on_a_turning_head_where_flow_carrying_cannot(turning,
                                                                                                 monkeypatch):
    detector = TruthDetector(turning)
    regions = head_errors(turning, track_clip(turning, detector, detect_every=EVERY).shown)[0]
    assert not regions.missed and regions.values().max() < MAX_ERROR
    assert detector.cost["full"].calls == turning.frames // EVERY  # no extra full detection was needed
    assert detector.cost["region"].calls == turning.frames - turning.frames // EVERY  # one region per face and frame

    # Flow carrying between detections: where it cannot follow the turn, it now says so (the
    # face is not shown, and the whole frame is searched next) ...
    flow_detector = TruthDetector(turning)
    checked = head_errors(turning, track_clip(turning, flow_detector, detect_every=EVERY, regions=False).shown)[0]
    assert checked.missed and flow_detector.cost["full"].calls > turning.frames // EVERY
    # ... where, without that check (as before), it carried lagging landmarks.
    monkeypatch.setattr(track, "FLOW_MIN_AGREEMENT", 0.0)
    monkeypatch.setattr(track, "FLOW_FB_MAX_PX", np.inf)
    carried = head_errors(turning, track_clip(turning, TruthDetector(turning), detect_every=EVERY, regions=False).shown)[0]
    assert not carried.missed and carried.values().max() > MAX_ERROR


def test_smoothing_measured_landmarks_does_not_lag_a_turn_and_halves_the_jitter_at_rest(turning):
    raw = track_clip(turning, TruthDetector(turning), detect_every=EVERY, smooth=False).shown
    smooth = track_clip(turning, TruthDetector(turning), detect_every=EVERY).shown
    start = 4  # the first turn
    turn = range(start, start + TURN_FRAMES + 2)
    raw_errors, smooth_errors = (head_errors(turning, shown)[0].errors for shown in (raw, smooth))
    # Lag would add to the measurement's own error; at the start of a turn it adds under 0.02.
    assert max(smooth_errors[t] for t in turn) < max(raw_errors[t] for t in turn) + 0.02
    hold = range(start + TURN_FRAMES + 2, start + 2 * TURN_FRAMES)  # the head holds still (measurements do not)
    jitter = [np.diff(np.array([shown[t][0].landmarks for t in hold]), axis=0).std() for shown in (raw, smooth)]
    assert jitter[1] < jitter[0] / 2


def test_a_face_entering_is_found_at_the_next_full_detection_and_a_face_leaving_ends_its_track(tmp_path):
    leaving, entering = Head("static", anchor=(0.72, 0.5), face_px=120, leave=20), \
        Head("static", anchor=(0.28, 0.5), face_px=120, enter=12)
    clip = make_tracking_clip(tmp_path / "in_out.mp4", [leaving, entering], frames=36, width=640, height=360)
    tracked = track_clip(clip, TruthDetector(clip), detect_every=EVERY)
    errors = head_errors(clip, tracked.shown)
    in_view = [[share_in_frame(clip, head, t) >= VISIBLE_MIN for t in range(clip.frames)] for head in range(2)]

    def tracks_near(head, t):
        return {f.track for f in tracked.shown[t] if np.abs(f.landmarks - clip.heads[head][t]).max() < 20}

    first_seen = min(t for t in range(clip.frames) if tracks_near(1, t))
    assert first_seen == min(t for t in range(0, clip.frames, EVERY) if in_view[1][t])  # the next full detection
    assert first_seen > in_view[1].index(True)  # ... not before: region searches do not start tracks
    entered = tracks_near(1, first_seen)
    assert all(tracks_near(1, t) == entered for t in range(first_seen, clip.frames))  # one track from then on
    assert all(t < first_seen for t in errors[1].missed)

    (left,) = tracks_near(0, 0)
    gone = in_view[0].index(False)
    assert left in tracked.ended and gone <= tracked.ended[left] <= gone + track.FaceTracker().max_missing + 1
    assert all(left not in {f.track for f in faces} for faces in tracked.shown[tracked.ended[left]:])
