"""GPEN face restoration network in plain PyTorch: loads the official checkpoints strictly."""

from gpen.checkpoint import RELEASED_CONFIGS, CheckpointError, infer_config, load_generator, read_state_dict
from gpen.model import FullGenerator, GPENConfig

__all__ = ["FullGenerator", "GPENConfig", "RELEASED_CONFIGS", "CheckpointError", "infer_config",
           "load_generator", "read_state_dict"]
