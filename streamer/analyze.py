"""Per frame, on the decoder's side: faces (detector or faces file) -> tracks -> smoothed
landmarks -> aligned crops, ready to be dispatched to workers."""

from __future__ import annotations

import json
import logging
import time

import numpy as np

from configs import RestoreSettings
from streamer.composite import cut_crop
from streamer.dispatch import CropTask, FrameTask
from streamer.faces.align import AlignmentError, alignment
from streamer.faces.face import Face, display_transform, transform_face
from streamer.faces.faces_file import face_record
from streamer.faces.track import FaceTracker, SceneCutDetector
from streamer.io.probe import VideoInfo, luma
from streamer.io.source import DecodedFrame
from streamer.io.yuv import YUVLayout

log = logging.getLogger(__name__)


class Analyzer:
    """Per frame: faces (detector or faces file) -> tracks -> smoothed landmarks -> crops."""

    def __init__(self, info: VideoInfo, settings: RestoreSettings, size: int, layout: YUVLayout, *,
                 faces_by_frame: dict[int, list[Face]] | None, detector, parser=None, dump_to=None):
        self.info, self.settings, self.size, self.layout = info, settings, size, layout
        self.faces_by_frame, self.detector, self.parser, self.dump_to = faces_by_frame, detector, parser, dump_to
        self.use_flow = detector is not None
        self.tracker = FaceTracker(iou_min=settings.track_iou, max_missing=settings.track_max_missing,
                                   fill_gaps=self.use_flow, smooth=settings.temporal != "off",
                                   min_cutoff=settings.smooth_min_cutoff, beta=settings.smooth_beta)
        self.cuts = SceneCutDetector(settings.scene_cut_threshold)
        self.to_display = display_transform(info.width, info.height, info.rotation_steps)
        self.to_coded = np.linalg.inv(self.to_display)
        self._last_detect = -10**9
        self.detect_s = 0.0

    def __call__(self, item: DecodedFrame) -> FrameTask:
        if item.frame.format.name != self.layout.pix_fmt:  # once, for analysis and for the encoder
            item.frame = item.frame.reformat(format=self.layout.pix_fmt, dst_colorspace=self.layout.colorspace,
                                             dst_color_range=self.layout.color_range)
        frame = item.frame
        gray = luma(frame)
        if self.cuts(gray):
            log.debug("scene cut at frame %d", item.index)
            self.tracker.reset()
            self._last_detect = -10**9
        rgb = None
        if self.faces_by_frame is not None:
            detections = [transform_face(f, self.to_coded) for f in self.faces_by_frame.get(item.index, [])]
        elif item.index - self._last_detect >= self.settings.detect_every:
            started = time.perf_counter()
            rgb = frame.to_ndarray(format="rgb24")
            detections = self.detector.detect(rgb, self.info.rotation_steps)
            self.detect_s += time.perf_counter() - started
            self._last_detect = item.index
        else:
            detections = None
        faces = self.tracker.update(item.time_s, detections, gray if self.use_flow else None)
        faces = [f for f in faces if f.size >= self.settings.min_face]
        if len(faces) > self.settings.max_faces:
            faces = sorted(faces, key=lambda f: f.size, reverse=True)[:self.settings.max_faces]
        task = FrameTask(item.index, item, ended_tracks=self.tracker.take_ended())
        for face in faces:
            try:
                affine = alignment(face.landmarks, self.size)
            except AlignmentError as exc:
                log.warning("frame %d: skipping a face: %s", item.index, exc)
                continue
            crop = cut_crop(frame, self.layout, affine, self.size)
            if crop is not None:
                task.crops.append(CropTask(item.index, len(task.crops), face.track, affine, crop, item.pts))
        if self.parser is not None and task.crops:
            for crop_task, mask in zip(task.crops, self.parser.masks([c.crop for c in task.crops])):
                crop_task.mask = mask
        if self.dump_to is not None and faces:
            shown = [transform_face(f, self.to_display) for f in faces]
            self.dump_to.write(json.dumps(face_record(item.index, shown)) + "\n")
        return task
