import av
import numpy as np
import pytest

from streamer.faces.align import AlignmentError, alignment, reference_points, similarity
from streamer.composite import Compositor, crop_mask, crop_footprint, cut_crop
from tests.support.clips import astronaut, psnr
from streamer.io.yuv import YUVLayout, plane


def test_reference_points_are_gpens_template():
    np.testing.assert_allclose(reference_points(512)[0], [202.04, 242.88], atol=0.01)
    np.testing.assert_allclose(reference_points(256),
                               [[101.02, 121.44], [154.72, 121.15], [128.04, 151.98], [105.98, 183.41], [150.45, 183.17]],
                               atol=0.01)


def test_similarity_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -5.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    m = similarity(src, src @ rot.T + shift)
    np.testing.assert_allclose(m[:, :2], rot, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], shift, atol=1e-9)


def test_mirrored_landmarks_still_give_a_rotation_not_a_reflection():
    src = reference_points(256)
    m = similarity(src * [-1, 1], src)
    assert np.linalg.det(m[:, :2]) > 0


def test_degenerate_landmarks_are_refused():
    with pytest.raises(AlignmentError):
        alignment(np.full((5, 2), 10.0), 256)
    with pytest.raises(AlignmentError):
        alignment(np.array([[np.nan, 0]] * 5), 256)


def _frame(image: np.ndarray, pix_fmt: str, colorspace: int = 2, color_range: int = 0) -> av.VideoFrame:
    frame = av.VideoFrame.from_ndarray(image, format="rgb24")
    return frame.reformat(format=pix_fmt, dst_colorspace=colorspace, dst_color_range=color_range)


def _planes(frame, layout):
    return [plane(frame, i, layout.dtype).astype(np.int64).copy() for i in range(3)]


FACE = np.array([[205.0, 101.0], [246.0, 104.0], [224.0, 127.0], [204.0, 141.0], [244.0, 142.0]])


@pytest.mark.parametrize("pix_fmt, colorspace, color_range", [
    ("yuv420p", 2, 0), ("yuv420p", 1, 1), ("yuvj420p", 5, 2), ("yuv422p", 6, 1), ("yuv444p", 2, 0),
    ("yuv420p10le", 9, 1),
])
def test_cutting_and_pasting_back_an_unchanged_face_changes_almost_nothing(pix_fmt, colorspace, color_range):
    layout = YUVLayout(pix_fmt, colorspace, color_range)
    frame = _frame(astronaut(), pix_fmt, colorspace, color_range)
    before = _planes(frame, layout)
    affine = alignment(FACE, 512)
    crop = cut_crop(frame, layout, affine, 512)
    frame.make_writable()
    Compositor(layout, mask_inset=0.05, mask_feather=0.04).paste(frame, [(crop, affine, None)])
    after = _planes(frame, layout)
    box = crop_footprint(affine, 512, frame.width, frame.height, layout)
    scale = 1 << (layout.bits - 8)
    y_err = np.abs(after[0] - before[0])[box.y0:box.y1, box.x0:box.x1].mean() / scale
    assert y_err < 0.8, y_err
    outside = np.ones(before[0].shape, bool)
    outside[box.y0:box.y1, box.x0:box.x1] = False
    assert np.array_equal(after[0][outside], before[0][outside])  # bit-exact outside the face box


def test_crops_look_like_the_face_and_match_swscales_colours():
    layout = YUVLayout("yuv444p", 1, 1)
    image = astronaut()
    frame = _frame(image, "yuv444p", 1, 1)
    affine = alignment(FACE, 256)
    crop = cut_crop(frame, layout, affine, 256)
    import cv2

    direct = cv2.warpAffine(image, affine, (256, 256), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
    assert psnr(crop, direct) > 35


def test_a_restored_face_replaces_the_original_inside_the_mask():
    layout = YUVLayout("yuv444p", 2, 0)
    frame = _frame(astronaut(), "yuv444p")
    affine = alignment(FACE, 256)
    grey = np.full((256, 256, 3), 128, np.uint8)
    frame.make_writable()
    Compositor(layout, mask_inset=0.05, mask_feather=0.04).paste(frame, [(grey, affine, None)])
    rgb = frame.to_ndarray(format="rgb24")
    nose = FACE[2].astype(int)
    assert np.abs(rgb[nose[1] - 3:nose[1] + 3, nose[0] - 3:nose[0] + 3].astype(int) - 128).max() <= 2


def test_faces_cut_by_the_frame_edge_are_pasted_inside_the_frame_only():
    layout = YUVLayout("yuv420p", 2, 0)
    frame = _frame(astronaut()[:, 150:], "yuv420p")  # the face's left half is outside
    landmarks = FACE - [150, 0] - [60, 0]
    affine = alignment(landmarks, 256)
    crop = cut_crop(frame, layout, affine, 256)
    assert crop is not None and crop.shape == (256, 256, 3)
    frame.make_writable()
    assert Compositor(layout, mask_inset=0.05, mask_feather=0.04).paste(frame, [(crop, affine, None)]) == 1


def test_a_face_entirely_outside_the_frame_is_skipped():
    layout = YUVLayout("yuv420p", 2, 0)
    frame = _frame(astronaut(), "yuv420p")
    affine = alignment(FACE + 5000, 256)
    assert cut_crop(frame, layout, affine, 256) is None
    assert Compositor(layout, mask_inset=0.05, mask_feather=0.04).paste(frame, [(np.zeros((256, 256, 3)), affine, None)]) == 0


def test_overlapping_faces_put_the_larger_one_on_top():
    layout = YUVLayout("yuv444p", 2, 0)
    frame = _frame(astronaut(), "yuv444p")
    big, small = alignment(FACE, 256), alignment((FACE - FACE.mean(0)) * 0.6 + FACE.mean(0), 256)
    white, black = np.full((256, 256, 3), 235, np.uint8), np.full((256, 256, 3), 20, np.uint8)
    frame.make_writable()
    Compositor(layout, mask_inset=0.05, mask_feather=0.04).paste(frame, [(white, big, None), (black, small, None)])
    nose = FACE[2].astype(int)
    assert frame.to_ndarray(format="rgb24")[nose[1], nose[0]].mean() > 200


def test_the_mask_is_one_inside_and_zero_on_the_crop_border():
    mask = crop_mask(256, 0.05, 0.04)
    assert mask[128, 128] == pytest.approx(1.0, abs=1e-3)
    assert mask[0].max() == 0 and mask[:, -1].max() == 0 and 0 < mask[30, 128] < 1
