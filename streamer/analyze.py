"""Per frame, on the decoder's side: faces (detector or faces file) -> tracks -> smoothed
landmarks -> aligned crops, ready to be dispatched to workers."""

from __future__ import annotations

import json
import logging
import time

import numpy as np

from configs import JobOptions
from streamer.composite import cut_crop
from streamer.dispatch import CropTask, FrameTask
from streamer.faces.align import AlignmentError, alignment
from streamer.faces.detect import REGION_THRESHOLD
from streamer.faces.face import Face, display_transform, transform_face
from streamer.faces.faces_file import face_record
from streamer.faces.track import FaceTracker, SceneCutDetector
from streamer.io.probe import VideoInfo, luma
from streamer.io.source import DecodedFrame
from streamer.io.yuv import YUVLayout

log = logging.getLogger(__name__)


class Analyzer:
    """Per frame: faces (detector or faces file) -> tracks -> smoothed landmarks -> crops."""

    def __init__(self, info: VideoInfo, settings: JobOptions, size: int, layout: YUVLayout, *,
                 faces_by_frame: dict[int, list[Face]] | None, detector, parser=None, dump_to=None):
        self.info, self.settings, self.size, self.layout = info, settings, size, layout
        self.faces_by_frame, self.detector, self.parser, self.dump_to = faces_by_frame, detector, parser, dump_to
        self.use_flow = detector is not None
        self.tracker = FaceTracker(iou_min=settings.track_iou, max_missing=settings.track_max_missing,
                                   fill_gaps=self.use_flow, smooth=settings.temporal != "off",
                                   min_cutoff=settings.smooth_min_cutoff, beta=settings.smooth_beta,
                                   detect_every=settings.detect_every)
        self.cuts = SceneCutDetector(settings.scene_cut_threshold)
        self.to_display = display_transform(info.width, info.height, info.rotation_steps)
        self.to_coded = np.linalg.inv(self.to_display)
        self.detect_s = 0.0

    def _region_search(self, frame):
        """Between full-frame detections: the detector on the region around one tracked face
        (``streamer.faces.track.RegionSearch``); the frame is converted to RGB once, if needed."""
        rgb = None

        def search(face: Face, margin: float) -> list[Face]:
            nonlocal rgb
            started = time.perf_counter()
            if rgb is None:
                rgb = frame.to_ndarray(format="rgb24")
            found = self.detector.detect_region(rgb, face.box, self.info.rotation_steps, margin=margin,
                                                threshold=min(REGION_THRESHOLD, self.settings.detect_threshold))
            self.detect_s += time.perf_counter() - started
            return found
        return search

    def _keep_largest(self, detections: list[Face]) -> list[Face]:
        """Only faces that could be restored are tracked: big enough, and the largest few (a
        few more than ``max_faces``, so a face that shrinks below another keeps its track).
        Tracking every weak detection of a busy picture costs more than detecting it."""
        keep = [d for d in detections if d.size >= self.settings.min_face]
        cap = 2 * self.settings.max_faces + 2
        return sorted(keep, key=lambda f: f.size, reverse=True)[:cap] if len(keep) > cap else keep

    def __call__(self, item: DecodedFrame) -> FrameTask:
        if item.frame.format.name != self.layout.pix_fmt:  # once, for analysis and for the encoder
            item.frame = item.frame.reformat(format=self.layout.pix_fmt, dst_colorspace=self.layout.colorspace,
                                             dst_color_range=self.layout.color_range)
        frame = item.frame
        gray = luma(frame)
        cut = self.cuts(gray)
        if cut or item.new_session:  # a new shot, or a live source that reconnected: no track goes on
            log.debug("%s at frame %d", "scene cut" if cut else "new session", item.index)
            self.tracker.reset()
        if self.faces_by_frame is not None:
            detections = [transform_face(f, self.to_coded) for f in self.faces_by_frame.get(item.index, [])]
        elif self.tracker.detection_due:
            started = time.perf_counter()
            rgb = frame.to_ndarray(format="rgb24")
            detections = self.detector.detect(rgb, self.info.rotation_steps, threshold=self.settings.detect_threshold,
                                              max_side=self.settings.detect_max_side)
            self.detect_s += time.perf_counter() - started
            detections = self._keep_largest(detections)
        else:
            detections = None
        search = self._region_search(frame) if detections is None and self.detector is not None else None
        faces = self.tracker.update(item.time_s, detections, gray if self.use_flow else None, search)
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
