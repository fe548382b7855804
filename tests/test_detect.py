"""RetinaFace through facexlib, with deterministic weights in the official (module.-prefixed) layout."""

import json
import warnings

import numpy as np
import pytest
import torch

from streamer.faces.detect import DetectorUnavailable, FaceDetector, load_retinaface
from streamer.faces.face import display_transform, transform_face
from streamer.pipeline import restore_file
from tests.support.clips import astronaut, make_clip, read_frames


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
                                                                   worker_settings):
    clip = make_clip(tmp_path / "in.mp4", frames=9, motion="slow")
    net = load_retinaface("retinaface_mobile0.25", torch.device("cpu"), mobilenet_weights)
    scores = sorted((f.score for f in FaceDetector(net, threshold=0.01, max_side=320).detect(
        read_frames(clip.path)[0][0])), reverse=True)
    threshold = float(scores[2]) - 1e-6  # random weights: keep the top few "faces"
    dump = tmp_path / "faces.jsonl"
    result = restore_file(clip.path, tmp_path / "out.mp4",
                          settings(model="identity", detector="retinaface_mobile0.25",
                                   detector_weights=mobilenet_weights, detect_threshold=threshold, detect_every=3,
                                   detect_max_side=320, max_faces=4, min_face=0),
                          worker_settings(), dump_faces=dump)
    assert result.frames == 9 and result.timings["detect"] > 0 and 0 < result.faces <= 36
    assert len(read_frames(tmp_path / "out.mp4")[0]) == 9
    records = [json.loads(line) for line in dump.read_text().splitlines()]
    assert records and all(len(r["faces"]) <= 4 and all("track" in f for f in r["faces"]) for r in records)
