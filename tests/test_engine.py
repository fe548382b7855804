"""One engine, many jobs: shared detector and workers, jobs at once, loads counted."""

import threading

import numpy as np
import torch

from configs import JobOptions
from streamer.engine import Engine
from streamer.faces.detect import FaceDetector, load_retinaface
from streamer.jobs.restore import restore_file
from tests.support.clips import make_clip, read_frames
from workers import metrics


def _loads(kind: str) -> float:
    return metrics.MODEL_LOADS.labels(kind=kind)._value.get()


def _detector_options(settings, clip, weights) -> JobOptions:
    """The deterministic detector finds "faces" at random places: keep the three best."""
    net = load_retinaface("retinaface_mobile0.25", torch.device("cpu"), weights)
    scores = sorted((f.score for f in FaceDetector(net, threshold=0.01, max_side=320).detect(
        read_frames(clip.path)[0][0])), reverse=True)
    return settings(model="identity", detector="retinaface_mobile0.25", detect_threshold=float(scores[2]) - 1e-6,
                    detect_max_side=320, max_faces=3, min_face=0, temporal="full")


def test_two_jobs_at_once_share_one_worker_and_give_what_each_gives_alone(tmp_path, settings, worker_settings,
                                                                          engine_settings, retinaface_mobile_weights):
    clips = [make_clip(tmp_path / "a.mp4", frames=10, motion="slow"),
             make_clip(tmp_path / "b.mp4", frames=14, motion="fast", seed=1)]
    options = _detector_options(settings, clips[0], retinaface_mobile_weights)
    engine_cfg = engine_settings(detector_weights=retinaface_mobile_weights)
    alone = [restore_file(c.path, tmp_path / f"alone-{i}.mp4", options, worker_settings(), engine_settings=engine_cfg)
             for i, c in enumerate(clips)]

    detectors, restorers = _loads("detector"), _loads("restorer")
    results = [None, None]
    with Engine(engine_cfg, worker_settings()) as engine:
        def job(i):
            results[i] = restore_file(clips[i].path, tmp_path / f"together-{i}.mp4", options, engine=engine)

        threads = [threading.Thread(target=job, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(engine._pools) == 1 and len(engine._pools["identity"].workers) == 1  # one worker for both
    assert (_loads("detector") - detectors, _loads("restorer") - restorers) == (1, 1)  # loaded once, not per job

    for i, clip in enumerate(clips):
        assert results[i] is not None and results[i].faces == alone[i].faces > 0
        frames_alone, pts_alone, tb_alone, _ = read_frames(tmp_path / f"alone-{i}.mp4")
        frames_together, pts_together, tb_together, _ = read_frames(tmp_path / f"together-{i}.mp4")
        assert (pts_together, tb_together) == (pts_alone, tb_alone) and len(frames_together) == clip.frames
        assert all(np.array_equal(a, b) for a, b in zip(frames_alone, frames_together))


def test_an_engine_runs_jobs_one_after_another_without_loading_again(tmp_path, settings, worker_settings,
                                                                     engine_settings):
    clip = make_clip(tmp_path / "in.mp4", frames=4)
    restorers = _loads("restorer")
    with Engine(engine_settings(), worker_settings()) as engine:
        for i in range(3):
            result = restore_file(clip.path, tmp_path / f"out-{i}.mp4", settings(model="identity"), engine=engine,
                                  faces_file=clip.faces_path)
            assert result.frames == 4 and result.faces == 4
    assert _loads("restorer") - restorers == 1
