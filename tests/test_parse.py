"""Face-parsing paste masks (ParseNet through facexlib, deterministic weights)."""

import warnings

import av
import numpy as np
import pytest
import torch

from streamer.faces.align import alignment
from streamer.composite import Compositor, cut_crop
from streamer.faces.parse import FaceParser, ParserUnavailable, mask_from_labels
from streamer.jobs.restore import restore_file
from tests.support.clips import ASTRONAUT_LANDMARKS, astronaut, make_clip, read_frames
from streamer.io.yuv import YUVLayout, plane


@pytest.fixture(scope="module")
def parsenet_weights(tmp_path_factory):
    from facexlib.parsing.parsenet import ParseNet

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = ParseNet(in_size=512, out_size=512, parsing_ch=19)
    path = tmp_path_factory.mktemp("parse") / "parsing_parsenet.pth"
    torch.save(net.state_dict(), path)
    return path


def test_the_mask_keeps_face_hair_and_neck_but_not_background_hat_or_cloth():
    labels = np.zeros((512, 512), np.int64)
    labels[150:350, 150:350] = 1  # skin
    labels[60:140, 150:350] = 13  # hair
    labels[380:480, 150:350] = 18  # cloth
    labels[20:60, 200:300] = 14  # hat
    mask = mask_from_labels(labels, 256)
    assert mask.shape == (256, 256) and mask.dtype == np.float32
    assert mask[125, 125] > 0.99 and mask[50, 125] > 0.9  # skin, hair
    assert mask[215, 125] < 0.01 and mask[20, 125] < 0.05 and mask[125, 30] < 0.01  # cloth, hat, background
    assert mask[0].max() == 0


def test_parsenet_gives_one_mask_per_crop(parsenet_weights):
    parser = FaceParser(torch.device("cpu"), weights=parsenet_weights)
    crops = [np.zeros((256, 256, 3), np.uint8), np.full((256, 256, 3), 200, np.uint8)]
    masks = parser.masks(crops)
    assert len(masks) == 2 and all(m.shape == (256, 256) and 0 <= m.min() and m.max() <= 1 for m in masks)


def test_wrong_or_missing_parser_weights_are_clear_errors(tmp_path):
    junk = tmp_path / "junk.pth"
    torch.save({"conv.weight": torch.zeros(1)}, junk)
    with pytest.raises(ParserUnavailable, match="not a ParseNet checkpoint"):
        FaceParser(torch.device("cpu"), weights=junk)
    with pytest.raises(ParserUnavailable, match="(?s)parsing_parsenet.pth.*place it at"):
        FaceParser(torch.device("cpu"))


def test_a_zero_mask_leaves_the_frame_untouched():
    layout = YUVLayout("yuv420p", 2, 0)
    frame = av.VideoFrame.from_ndarray(astronaut(), format="rgb24").reformat(format="yuv420p")
    before = plane(frame, 0, layout.dtype).copy()
    affine = alignment(ASTRONAUT_LANDMARKS, 256)
    frame.make_writable()
    Compositor(layout, mask_inset=0.05, mask_feather=0.04).paste(
        frame, [(np.zeros((256, 256, 3), np.float32), affine, np.zeros((256, 256), np.float32))])
    assert np.array_equal(plane(frame, 0, layout.dtype), before)
    assert cut_crop(frame, layout, affine, 256).shape == (256, 256, 3)


def test_restore_with_face_parsing_masks(tmp_path, parsenet_weights, settings, worker_settings, engine_settings):
    clip = make_clip(tmp_path / "in.mp4", frames=1)  # one face: ParseNet takes 3-10 s a face on a CPU
    result = restore_file(clip.path, tmp_path / "out.mp4",
                          settings(model="identity", mask="parse"), worker_settings(),
                          engine_settings=engine_settings(parser_weights=parsenet_weights), faces_file=clip.faces_path)
    assert result.faces == 1 and len(read_frames(tmp_path / "out.mp4")[0]) == 1
