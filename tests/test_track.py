import numpy as np

from streamer.faces.face import Face, box_from_landmarks
from streamer.faces.track import (REGION_MARGIN, REGION_RETRY_MARGIN, FaceTracker, OneEuroFilter, SceneCutDetector,
                                  propagate_by_flow)
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
    face = _face().landmarks
    f = OneEuroFilter(min_cutoff=0.5, beta=20.0)
    still = np.array([f(face + rng.normal(0, 1.5, face.shape), t / 25, scale=100) for t in range(100)])
    assert np.diff(still[20:], axis=0).std() < 0.5 * 1.5 * np.sqrt(2)  # frame-to-frame jitter at rest halved
    g = OneEuroFilter(min_cutoff=0.5, beta=20.0)
    moving = [g(face + [8.0 * t, 0], t / 25, scale=100) for t in range(50)]
    lags = [np.abs(moving[t] - face - [8.0 * t, 0]).max() for t in range(50)]
    assert max(lags) < 1.5  # moving 2 face sizes a second (8 px a frame): under 1/5 of a frame's move, from the start


def test_one_euro_speed_is_the_face_centres_so_noise_at_rest_keeps_the_cutoff_low():
    # Independent noise on each point averages out in the centre: the same noise on one
    # coordinate alone (the old per-coordinate speed) would raise the cutoff and pass jitter.
    rng = np.random.default_rng(2)
    face = _face().landmarks
    f = OneEuroFilter(min_cutoff=0.5, beta=20.0)
    still = np.array([f(face + rng.normal(0, 1.5, face.shape), t / 25, scale=100) for t in range(100)])
    lone = OneEuroFilter(min_cutoff=0.5, beta=20.0)
    single = np.array([lone(np.array([[100.0 + rng.normal(0, 1.5), 0.0]]), t / 25, scale=100) for t in range(100)])
    assert np.diff(still[20:], axis=0).std() < 0.8 * np.diff(single[20:, 0, 0]).std()


def test_smoothing_reduces_landmark_jitter_in_the_tracker():
    rng = np.random.default_rng(1)
    raw, smooth = FaceTracker(smooth=False), FaceTracker(smooth=True)
    outs = {0: [], 1: []}
    for t in range(60):  # 1 px of noise per coordinate on a 65 px face: half shared by the points, half their own
        det = _face(rng.normal(0, 1 / np.sqrt(2), 2))
        det.landmarks += rng.normal(0, 1 / np.sqrt(2), (5, 2))
        outs[0].append(raw.update(t / 25, [det])[0].landmarks)
        outs[1].append(smooth.update(t / 25, [det])[0].landmarks)
    jitter = [np.diff(np.array(o[10:]), axis=0).std() for o in (outs[0], outs[1])]
    assert jitter[1] < jitter[0] / 2


def test_scene_cuts_are_found_and_motion_is_not_a_cut():
    image = astronaut().mean(axis=2).astype(np.uint8)
    cuts = SceneCutDetector(0.35)
    assert not cuts(image)
    assert not cuts(np.roll(image, 6, axis=1))  # a pan
    assert cuts(255 - image)  # a different shot


def test_between_detections_only_faces_the_flow_could_carry_are_shown():
    image = astronaut().mean(axis=2).astype(np.uint8)
    tracker = FaceTracker(smooth=False, detect_every=5)
    tracker.update(0, [_face()], image)
    assert not tracker.detection_due
    flat = np.full_like(image, 128)  # nothing to track: the face is not shown at a stale place
    assert tracker.update(0.04, None, flat) == []
    assert tracker.detection_due  # ... and the whole frame is searched at once, not 4 frames later


def test_flow_that_most_of_the_face_region_disagrees_with_is_not_trusted():
    # The face region tears apart (each quadrant moves its own way): a similarity fitted to
    # the largest group of points would move the face confidently, and wrongly.
    gray = astronaut().mean(axis=2).astype(np.uint8)
    face = _face()
    x0, y0, x1, y1 = face.box.astype(int)
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    torn = gray.copy()
    for ys, xs, shift in ((slice(0, cy), slice(0, cx), (-4, -4)), (slice(0, cy), slice(cx, None), (-4, 4)),
                          (slice(cy, None), slice(0, cx), (4, -4)), (slice(cy, None), slice(cx, None), (4, 4))):
        torn[ys, xs] = np.roll(gray, shift, axis=(0, 1))[ys, xs]
    assert propagate_by_flow(gray, torn, face) is None
    assert propagate_by_flow(gray, np.roll(gray, (4, 4), axis=(0, 1)), face) is not None  # a rigid move is


def test_a_full_detection_is_due_every_detect_every_frames_and_after_a_cut():
    tracker = FaceTracker(smooth=False, detect_every=3)
    due = []
    for t in range(7):
        due.append(tracker.detection_due)
        tracker.update(t / 25, [_face()] if due[-1] else None, search=lambda face, margin: [face])
    assert due == [True, False, False, True, False, False, True]
    tracker.reset()
    assert tracker.detection_due


class _Regions:
    """A region search over a fixed list of faces: those whose box centre lies in the region.
    (Regions of real frames, with the production detector geometry, are in test_tracking.py.)"""

    def __init__(self, *faces):
        self.faces, self.margins = list(faces), []

    def __call__(self, face, margin):
        self.margins.append(margin)
        x0, y0, x1, y1 = face.box
        grow = max(x1 - x0, y1 - y0) * margin
        return [f for f in self.faces if x0 - grow <= (f.box[0] + f.box[2]) / 2 <= x1 + grow
                and y0 - grow <= (f.box[1] + f.box[3]) / 2 <= y1 + grow]


def test_between_detections_a_face_is_measured_in_its_region_and_new_faces_wait_for_a_full_detection():
    tracker = FaceTracker(smooth=False, detect_every=5)
    tid = tracker.update(0, [_face()])[0].track
    moved, stranger = _face((6.0, -3.0)), _face((9.0, 4.0), scale=0.5)  # a small face next to it
    faces = tracker.update(0.04, None, search=_Regions(stranger, moved))
    assert [f.track for f in faces] == [tid] and not faces[0].interpolated  # measured, not carried
    np.testing.assert_allclose(faces[0].landmarks, moved.landmarks)  # the face nearest the prediction
    far = _face((300.0, 200.0))
    assert [f.track for f in tracker.update(0.08, None, search=_Regions(moved, far))] == [tid]  # far: not a track yet


def test_a_face_not_in_its_region_is_searched_again_at_once_in_a_wider_one_then_counted_missing():
    tracker = FaceTracker(smooth=False, detect_every=5, max_missing=2)
    tid = tracker.update(0, [_face()])[0].track
    jumped = _face((110.0, 0.0))  # moved more than the region's margin in one frame
    search = _Regions(jumped)
    faces = tracker.update(0.04, None, search=search)
    assert search.margins == [REGION_MARGIN, REGION_RETRY_MARGIN]
    assert [f.track for f in faces] == [tid] and not tracker.detection_due
    np.testing.assert_allclose(faces[0].landmarks, jumped.landmarks)
    assert tracker.update(0.08, None, search=_Regions()) == []  # gone: neither region finds it ...
    assert tracker.detection_due  # ... so the whole frame is searched next, not 5 frames later
    assert tracker.update(0.12, []) == [] and not tracker.detection_due
    assert tracker.take_ended() == []
    tracker.update(0.16, None, search=_Regions())  # a third search in a row without it: the track ends
    assert tracker.take_ended() == [tid]


def test_two_tracks_whose_regions_find_the_same_face_do_not_both_take_it():
    tracker = FaceTracker(smooth=False, detect_every=5, iou_min=0.1)
    first, _ = tracker.update(0, [_face(), _face((30.0, 0.0))])
    between = _face((12.0, 0.0))  # one face left, nearer the first track's place
    faces = tracker.update(0.04, None, search=_Regions(between))
    assert [f.track for f in faces] == [first.track]


def test_the_tracker_keeps_its_own_copy_of_the_previous_frame():
    image = astronaut().mean(axis=2).astype(np.uint8)
    tracker = FaceTracker(smooth=False)
    tracker.update(0, [_face()], image)
    image[:] = 0  # the frame's planes are written to later by the compositor
    assert tracker._prev_gray.max() > 0
