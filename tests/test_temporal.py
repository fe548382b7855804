import numpy as np

from streamer.faces.align import alignment
from tests.support.clips import ASTRONAUT_LANDMARKS, astronaut
from workers.temporal import TemporalBlender
import cv2

SIZE = 128


def _crop(offset=(0.0, 0.0)):
    affine = alignment(ASTRONAUT_LANDMARKS + offset, SIZE)
    return affine, cv2.warpAffine(astronaut(), affine, (SIZE, SIZE), flags=cv2.INTER_CUBIC)


def _noisy(img, rng, sigma=8.0):
    return np.clip(img + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


def test_a_still_face_comes_out_much_steadier_than_it_went_in():
    rng = np.random.default_rng(0)
    affine, clean = _crop()
    blender = TemporalBlender(0.85, 0.03)
    outs, ins = [], []
    for t in range(20):
        noisy = _noisy(clean, rng)
        ins.append(noisy)
        outs.append(blender.blend(("p", "j", 1), t, affine, noisy, noisy))
    flicker_in = np.abs(np.diff(np.array(ins[10:], float), axis=0)).mean()
    flicker_out = np.abs(np.diff(np.array(outs[10:], float), axis=0)).mean()
    assert flicker_out < 0.5 * flicker_in
    assert np.abs(outs[-1].astype(float) - clean).mean() < np.abs(ins[-1].astype(float) - clean).mean()


def test_landmark_jitter_is_compensated_so_there_is_no_ghost():
    """The face stands still but the crops jump by a few pixels: the previous output must be
    moved with the crop before blending, or the result is a double image."""
    blender = TemporalBlender(0.85, 0.03)
    a0, c0 = _crop()
    blender.blend(("p", "j", 1), 0, a0, c0, c0)
    a1, c1 = _crop((4.0, -3.0))
    out = blender.blend(("p", "j", 1), 1, a1, c1, c1)
    assert np.abs(out.astype(float) - c1).mean() < 2.0


def test_a_face_that_moved_with_its_crop_is_not_smeared():
    blender = TemporalBlender(0.85, 0.03)
    a0, c0 = _crop()
    blender.blend(("p", "j", 1), 0, a0, c0, c0)
    moved = np.eye(3)
    moved[:2] = cv2.getRotationMatrix2D((256, 256), 0, 1.0)
    moved[:2, 2] += (6, 2)  # the whole picture moved; the landmarks tracked it
    shifted = cv2.warpAffine(astronaut(), moved[:2], (512, 512))
    a1 = alignment(ASTRONAUT_LANDMARKS + (6, 2), SIZE)
    c1 = cv2.warpAffine(shifted, a1, (SIZE, SIZE), flags=cv2.INTER_CUBIC)
    out = blender.blend(("p", "j", 1), 1, a1, c1, c1)
    assert np.abs(out.astype(float) - c1).mean() < 2.0


def test_where_the_input_changed_the_new_face_wins():
    blender = TemporalBlender(0.85, 0.03)
    affine, clean = _crop()
    blender.blend(("p", "j", 1), 0, affine, clean, clean)
    occluded = clean.copy()
    occluded[40:100, 20:80] = (214, 160, 128)  # a hand
    out = blender.blend(("p", "j", 1), 1, affine, occluded, occluded)
    diff = np.abs(out[50:90, 30:70].astype(float) - occluded[50:90, 30:70])
    assert diff.mean() < 1 and diff.max() < 8  # no trace of the face behind the hand


def test_reset_and_frame_gaps_start_afresh():
    rng = np.random.default_rng(2)
    blender = TemporalBlender(0.85, 0.03)
    affine, clean = _crop()
    blender.blend(("p", "j", 1), 0, affine, clean, clean)
    noisy = _noisy(clean, rng)
    assert np.array_equal(blender.blend(("p", "j", 1), 1, affine, noisy, noisy, reset=True), noisy)
    assert np.array_equal(blender.blend(("p", "j", 1), 9, affine, noisy, noisy), noisy)  # 8 frames later


def test_tracks_are_kept_apart_and_dropped_by_prefix_or_by_memory_use():
    affine, clean = _crop()
    one = TemporalBlender(0.85, 0.03)
    one.blend(("x",), 0, affine, clean, clean)
    per_track = one._bytes
    blender = TemporalBlender(0.85, 0.03, max_bytes=3 * per_track)
    for track in range(2):
        blender.blend(("peer", "job-a", track), 0, affine, clean, clean)
    blender.blend(("peer", "job-b", 0), 0, affine, clean, clean)
    blender.drop(("peer", "job-a"))
    assert len(blender) == 1
    for track in range(5):
        blender.blend(("peer", "job-c", track), 0, affine, clean, clean)
    assert len(blender) == 3
