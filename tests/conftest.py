import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from configs import RestoreSettings, WorkerSettings, load_settings
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


@pytest.fixture
def settings():
    """Restore settings for tests: lossless output so comparisons see only our processing."""
    def make(**overrides):
        return load_settings(RestoreSettings, overrides={"crf": 0, "preset": "ultrafast", **overrides})
    return make


@pytest.fixture
def worker_settings():
    def make(**overrides):
        return load_settings(WorkerSettings, overrides=overrides)
    return make


def region(frame: np.ndarray, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return frame[y0:y1, x0:x1]
