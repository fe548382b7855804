import numpy as np

from streamer.faces.face import Face, box_from_landmarks
from streamer.faces.track import FaceTracker, OneEuroFilter, SceneCutDetector, propagate_by_flow
from tests.support.clips import ASTRONAUT_LANDMARKS, astronaut


def _face(offset=(0.0, 0.0), scale=1.0):
    lm = (ASTRONAUT_LANDMARKS - ASTRONAUT_LANDMARKS.mean(0)) * scale + ASTRONAUT_LANDMARKS.mean(0) + offset
    return Face(lm, box_from_landmarks(lm))


def test_a_face_keeps_its_id_while_it_moves_and_a_new_face_gets_a_new_one():
    tracker = FaceTracker(smooth=False)
    ids = [tracker.update(t / 25, [_face((2.0 * t, 0))])[0].track for t in range(10)]
    assert len(set(ids)) == 1
    faces = tracker.update(10 / 25, [_face((20.0, 0)), _face((200.0, 150.0))])
    assert sorted(f.track for f in faces) == [ids[0], ids[0] + 1]


def test_a_track_ends_after_max_missing_frames_and_a_returning_face_gets_a_new_id():
    tracker = FaceTracker(smooth=False, max_missing=2, fill_gaps=False)
    first = tracker.update(0, [_face()])[0].track
    assert tracker.update(0.04, []) == []
    assert tracker.update(0.08, [_face()])[0].track == first  # a one-frame miss keeps the id
    for t in range(3):
        tracker.update(0.12 + t * 0.04, [])
    assert tracker.take_ended() == [first]
    assert tracker.update(0.3, [_face()])[0].track != first


def test_scene_cut_reset_ends_every_track():
    tracker = FaceTracker(smooth=False)
    tid = tracker.update(0, [_face()])[0].track
    tracker.reset()
    assert tracker.take_ended() == [tid]
    assert tracker.update(0.04, [_face()])[0].track != tid


def test_optical_flow_carries_a_face_between_detections():
    image = astronaut()
    gray = image.mean(axis=2).astype(np.uint8)
    shifted = np.roll(gray, (3, 5), axis=(0, 1))
    moved = propagate_by_flow(gray, shifted, _face())
    assert moved is not None and moved.interpolated
    np.testing.assert_allclose(moved.landmarks - _face().landmarks, [[5, 3]] * 5, atol=0.5)


def test_gaps_are_filled_by_flow_when_the_detector_misses():
    image = astronaut()
    gray = image.mean(axis=2).astype(np.uint8)
    tracker = FaceTracker(smooth=False, fill_gaps=True)
    tid = tracker.update(0, [_face()], gray)[0].track
    faces = tracker.update(0.04, [], np.roll(gray, 4, axis=1))  # detector missed the face
    assert len(faces) == 1 and faces[0].track == tid and faces[0].interpolated
    np.testing.assert_allclose(faces[0].landmarks[:, 0] - _face().landmarks[:, 0], 4, atol=0.5)


def test_one_euro_removes_jitter_at_rest_and_follows_fast_motion():
    rng = np.random.default_rng(0)
    f = OneEuroFilter(min_cutoff=0.5, beta=4.0)
    still = [f(np.array([100.0 + rng.normal(0, 1.5)]), t / 25, scale=100)[0] for t in range(100)]
    assert np.std(still[20:]) < 0.4 * 1.5  # jitter at rest cut to under 40%
    g = OneEuroFilter(min_cutoff=0.5, beta=4.0)
    track = [g(np.array([8.0 * t]), t / 25, scale=100)[0] for t in range(50)]
    assert abs(track[-1] - 8.0 * 49) < 10  # moving 2 face sizes a second, it lags by < 10 px


def test_smoothing_reduces_landmark_jitter_in_the_tracker():
    rng = np.random.default_rng(1)
    raw, smooth = FaceTracker(smooth=False), FaceTracker(smooth=True)
    outs = {0: [], 1: []}
    for t in range(60):
        det = _face(rng.normal(0, 1.5, 2))
        outs[0].append(raw.update(t / 25, [det])[0].landmarks)
        outs[1].append(smooth.update(t / 25, [det])[0].landmarks)
    jitter = [np.diff(np.array(o[10:]), axis=0).std() for o in (outs[0], outs[1])]
    assert jitter[1] < jitter[0] / 3


def test_scene_cuts_are_found_and_motion_is_not_a_cut():
    image = astronaut().mean(axis=2).astype(np.uint8)
    cuts = SceneCutDetector(0.35)
    assert not cuts(image)
    assert not cuts(np.roll(image, 6, axis=1))  # a pan
    assert cuts(255 - image)  # a different shot


def test_between_detections_only_faces_the_flow_could_carry_are_shown():
    image = astronaut().mean(axis=2).astype(np.uint8)
    tracker = FaceTracker(smooth=False)
    tracker.update(0, [_face()], image)
    flat = np.full_like(image, 128)  # nothing to track: the face is not shown at a stale place
    assert tracker.update(0.04, None, flat) == []


def test_the_tracker_keeps_its_own_copy_of_the_previous_frame():
    image = astronaut().mean(axis=2).astype(np.uint8)
    tracker = FaceTracker(smooth=False)
    tracker.update(0, [_face()], image)
    image[:] = 0  # the frame's planes are written to later by the compositor
    assert tracker._prev_gray.max() > 0
