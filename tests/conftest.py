import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from configs import EngineSettings, JobOptions, WorkerSettings, load_settings
from gpen import RELEASED_CONFIGS, GPENConfig
from gpen.testing import deterministic_state_dict

DATA = Path(__file__).parent / "data"
TINY = GPENConfig(32, channel_multiplier=1, narrow=1 / 16, style_dim=64, n_mlp=2)


@pytest.fixture(autouse=True, scope="session")
def _isolated_home(tmp_path_factory):
    """Never touch the user's weight cache, and never reach the internet for weights: a mirror
    on a closed local port makes every download fail at once with the offline message."""
    home = tmp_path_factory.mktemp("gpen-home")
    old = {k: os.environ.get(k) for k in ("GPEN_STREAM_HOME", "GPEN_STREAM_MODEL_MIRROR")}
    os.environ["GPEN_STREAM_HOME"] = str(home)
    os.environ["GPEN_STREAM_MODEL_MIRROR"] = "http://127.0.0.1:9/models"
    logging.getLogger("streamer").setLevel(logging.INFO)
    yield home
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def gpen256_weights(tmp_path_factory) -> Path:
    """GPEN-BFR-256 in the official layout with deterministic values, saved like a release."""
    path = tmp_path_factory.mktemp("weights") / "GPEN-BFR-256-deterministic.pth"
    torch.save(deterministic_state_dict(RELEASED_CONFIGS["GPEN-BFR-256"]), path)
    return path


@pytest.fixture(scope="session")
def retinaface_mobile_weights(tmp_path_factory) -> Path:
    """RetinaFace MobileNet-0.25 with deterministic (seeded) weights, saved as released
    (DataParallel's "module." prefix). It finds "faces" at random places, repeatably."""
    import warnings

    from facexlib.detection.retinaface import RetinaFace

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = RetinaFace(network_name="mobile0.25", half=False, phase="test", device="cpu")
    path = tmp_path_factory.mktemp("det") / "detection_mobilenet0.25_Final.pth"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)
    return path


@pytest.fixture
def settings():
    """Job options for tests: lossless output so comparisons see only our processing."""
    def make(**overrides):
        return load_settings(JobOptions, overrides={"crf": 0, "preset": "ultrafast", **overrides})
    return make


@pytest.fixture
def engine_settings():
    def make(**overrides):
        return load_settings(EngineSettings, overrides=overrides)
    return make


@pytest.fixture
def worker_settings():
    def make(**overrides):
        return load_settings(WorkerSettings, overrides=overrides)
    return make


def region(frame: np.ndarray, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return frame[y0:y1, x0:x1]


@pytest.fixture
def redis_server(tmp_path):
    """A redis-server of this test's own (append-only on, so a restart keeps its data)."""
    from tests.support.redis_server import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()
