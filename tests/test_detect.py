"""RetinaFace through facexlib, with deterministic weights in the official (module.-prefixed) layout."""

import json
import warnings

import numpy as np
import pytest
import torch

from streamer.faces.detect import REGION_SIDE_PX, DetectorUnavailable, FaceDetector, View, load_retinaface
from streamer.faces.face import Face, display_transform, transform_face
from streamer.jobs.restore import restore_file
from tests.support.clips import Head, astronaut, make_clip, make_tracking_clip, read_frames
from tests.support.tracking import TruthDetector, track_clip


@pytest.fixture(scope="module")
def mobilenet_weights(tmp_path_factory):
    from facexlib.detection.retinaface import RetinaFace

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = RetinaFace(network_name="mobile0.25", half=False, phase="test", device="cpu")
    path = tmp_path_factory.mktemp("det") / "detection_mobilenet0.25_Final.pth"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)  # as trained with DataParallel
    return path


def test_detections_are_faces_in_coded_frame_coordinates_whatever_the_rotation(mobilenet_weights):
    detector = FaceDetector(load_retinaface("retinaface_mobile0.25", torch.device("cpu"), mobilenet_weights),
                            threshold=0.05, max_side=320)
    upright = np.ascontiguousarray(astronaut()[::2, ::2])
    direct = detector.detect(upright)
    assert direct and all(f.landmarks.shape == (5, 2) and f.box.shape == (4,) for f in direct)
    coded = np.ascontiguousarray(np.rot90(upright, -1))  # stored rotated, displayed upright
    rotated = detector.detect(coded, rotation_steps=1)
    to_display = display_transform(coded.shape[1], coded.shape[0], 1)
    shown = [transform_face(f, to_display) for f in rotated]
    assert len(shown) == len(direct)
    np.testing.assert_allclose(np.array([f.landmarks for f in shown]), np.array([f.landmarks for f in direct]), atol=1e-3)


def test_large_frames_are_detected_downscaled_and_mapped_back(mobilenet_weights):
    net = load_retinaface("retinaface_mobile0.25", torch.device("cpu"), mobilenet_weights)
    image = astronaut()
    small = FaceDetector(net, threshold=0.05, max_side=256).detect(image)
    assert small and max(f.box.max() for f in small) > 256  # coordinates are full-size frame pixels


def test_a_region_is_shown_to_the_network_with_the_face_at_a_fixed_size_and_mapped_back(mobilenet_weights):
    net = load_retinaface("retinaface_mobile0.25", torch.device("cpu"), mobilenet_weights)
    detector = FaceDetector(net)
    image = astronaut()
    box = np.array([180.0, 60.0, 270.0, 160.0])  # a 100 px high face box
    faces = detector.detect_region(image, box, margin=0.5, threshold=0.05)  # random weights score low
    assert faces and tuple(net.scale[:2].tolist()) == (REGION_SIDE_PX, REGION_SIDE_PX)  # the 200 px square, scaled
    assert all(60 - 50 - 2 <= f.landmarks[:, 1].min() and f.landmarks[:, 1].max() <= 160 + 50 + 2 for f in faces)

    # Results are frame pixels: content and box moved together move them by as much ...
    frame = np.zeros((600, 640, 3), np.uint8)
    frame[37:549, 53:565] = image
    moved = detector.detect_region(frame, box + [53, 37, 53, 37], margin=0.5, threshold=0.05)
    np.testing.assert_allclose([f.landmarks for f in moved], [f.landmarks + [53, 37] for f in faces], atol=1e-3)
    # ... and a stream stored rotated is searched upright and answered in its own pixels.
    coded = np.ascontiguousarray(np.rot90(image, -1))
    to_display = display_transform(coded.shape[1], coded.shape[0], 1)
    coded_box = transform_face(Face(np.zeros((5, 2)), box), np.linalg.inv(to_display)).box
    rotated = [transform_face(f, to_display)
               for f in detector.detect_region(coded, coded_box, 1, margin=0.5, threshold=0.05)]
    np.testing.assert_allclose([f.landmarks for f in rotated], [f.landmarks for f in faces], atol=1e-3)


def test_a_region_cut_by_the_frame_edge_keeps_the_face_scale_and_one_outside_is_not_searched():
    whole = View.around(np.array([200.0, 200.0, 300.0, 300.0]), 640, 480, 0, margin=0.5)
    corner = View.around(np.array([-20.0, -30.0, 80.0, 70.0]), 640, 480, 0, margin=0.5)
    assert whole.size == (REGION_SIDE_PX, REGION_SIDE_PX) and whole.crop == (150, 150, 350, 350)
    assert corner.crop == (0, 0, 130, 120) and corner.scale == pytest.approx(whole.scale, rel=0.01)
    assert View.around(np.array([700.0, 10.0, 800.0, 110.0]), 640, 480, 0, margin=0.5) is None


def test_the_ground_truth_stand_in_runs_the_real_network_on_the_real_inputs(tmp_path, mobilenet_weights):
    clip = make_tracking_clip(tmp_path / "turn.mp4", [Head("turn", face_px=80, start=2)], frames=6)
    net = load_retinaface("retinaface_mobile0.25", torch.device("cpu"), mobilenet_weights)
    detector = TruthDetector(clip, net)
    shown = track_clip(clip, detector, detect_every=5).shown
    assert all(len(faces) == 1 for faces in shown)  # the answers are the truth's ...
    assert detector.cost["full"].calls == 2 and detector.cost["region"].calls == 4
    assert all(cost.network_s > 0 for cost in detector.cost.values())  # ... the time is the network's
    assert tuple(net.scale[:2].tolist()) == (clip.width, clip.height)  # last: the whole frame, at 320x240


def test_missing_detector_weights_say_which_file_and_where():
    with pytest.raises(DetectorUnavailable, match="(?s)detection_Resnet50_Final.pth.*place it at"):
        load_retinaface("retinaface_resnet50", torch.device("cpu"))


def test_the_wrong_checkpoint_is_refused(tmp_path, mobilenet_weights):
    with pytest.raises(DetectorUnavailable, match="does not match retinaface_resnet50"):
        load_retinaface("retinaface_resnet50", torch.device("cpu"), mobilenet_weights)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"junk" * 10)
    with pytest.raises(DetectorUnavailable, match="not a readable"):
        load_retinaface("retinaface_mobile0.25", torch.device("cpu"), junk)


def test_restore_with_the_detector_and_tracking_between_detections(tmp_path, mobilenet_weights, settings,
                                                                   worker_settings, engine_settings):
    clip = make_clip(tmp_path / "in.mp4", frames=9, motion="slow")
    net = load_retinaface("retinaface_mobile0.25", torch.device("cpu"), mobilenet_weights)
    scores = sorted((f.score for f in FaceDetector(net, threshold=0.01, max_side=320).detect(
        read_frames(clip.path)[0][0])), reverse=True)
    threshold = float(scores[2]) - 1e-6  # random weights: keep the top few "faces"
    dump = tmp_path / "faces.jsonl"
    result = restore_file(clip.path, tmp_path / "out.mp4",
                          settings(model="identity", detector="retinaface_mobile0.25", detect_threshold=threshold,
                                   detect_every=3, detect_max_side=320, max_faces=4, min_face=0),
                          worker_settings(), engine_settings=engine_settings(detector_weights=mobilenet_weights),
                          dump_faces=dump)
    assert result.frames == 9 and result.timings["detect"] > 0 and 0 < result.faces <= 36
    assert len(read_frames(tmp_path / "out.mp4")[0]) == 9
    records = [json.loads(line) for line in dump.read_text().splitlines()]
    assert records and all(len(r["faces"]) <= 4 and all("track" in f for f in r["faces"]) for r in records)
