"""One settings model per process kind. Defaults come from ``defaults.yaml`` beside this file
(the only place they are written); a user YAML file, ``GPEN_STREAM_<KIND>_<FIELD>``
environment variables and explicit overrides (command-line flags) take precedence in that
order. Unknown keys are errors, not silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULTS_FILE = Path(__file__).with_name("defaults.yaml")


class SettingsError(ValueError):
    """Settings that do not validate; the message names the key and the problem."""


DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?|mps)$"


class _Settings(BaseSettings):
    pass


class RestoreSettings(_Settings):
    """A file job: decode, find faces, dispatch crops, composite, encode."""

    model_config = SettingsConfigDict(env_prefix="GPEN_STREAM_RESTORE_", extra="forbid")

    model: str
    weights: Path | None
    detector: Literal["retinaface_resnet50", "retinaface_mobile0.25"]
    detector_weights: Path | None
    detect_every: int = Field(ge=1)
    detect_max_side: int = Field(ge=64)
    detect_threshold: float = Field(gt=0, lt=1)
    min_face: int = Field(ge=0)
    max_faces: int = Field(ge=1)
    workers: int = Field(ge=0)
    connect: list[str]
    isolate_workers: bool
    max_frames_in_flight: int = Field(ge=2)
    worker_timeout_s: float = Field(gt=0)
    codec: str | None
    crf: float = Field(ge=0, le=63)
    preset: str
    strength: float = Field(ge=0, le=1)
    color_match: bool
    mask: Literal["feather", "parse"]
    parser_weights: Path | None
    mask_inset: float = Field(ge=0, lt=0.5)
    mask_feather: float = Field(ge=0, lt=0.5)
    corrupt_frames: Literal["skip", "fail"]
    temporal: Literal["off", "landmarks", "full"]
    track_iou: float = Field(ge=0, le=1)
    track_max_missing: int = Field(ge=0)
    smooth_min_cutoff: float = Field(gt=0)
    smooth_beta: float = Field(ge=0)
    scene_cut_threshold: float = Field(gt=0)


class WorkerSettings(_Settings):
    """An inference worker: one per device."""

    model_config = SettingsConfigDict(env_prefix="GPEN_STREAM_WORKER_", extra="forbid")

    endpoint: str | None
    device: str = Field(pattern=DEVICE_PATTERN)
    dtype: Literal["auto", "fp32", "fp16", "bf16"]
    batch: int = Field(ge=1, le=256)
    batch_wait_ms: float = Field(ge=0)
    credits: int = Field(ge=0)
    threads: int = Field(ge=0)
    blend_max: float = Field(ge=0, lt=1)
    blend_sigma: float = Field(gt=0)
    models: dict[str, Path]


_SECTIONS: dict[type[_Settings], str] = {RestoreSettings: "restore", WorkerSettings: "worker"}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(f"cannot read settings file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    unknown = set(data) - set(_SECTIONS.values())
    if unknown:
        raise SettingsError(f"{path}: unknown section(s) {sorted(unknown)}; known: {sorted(_SECTIONS.values())}")
    return data


def load_settings(kind: type[_Settings], *, config_file: str | Path | None = None,
                  overrides: dict[str, Any] | None = None):
    """Defaults < config file < environment < overrides (``None`` values are ignored)."""
    section = _SECTIONS[kind]
    values = dict(_read_yaml(DEFAULTS_FILE).get(section) or {})
    if config_file is not None:
        values.update(_read_yaml(Path(config_file)).get(section) or {})
    explicit = {k: v for k, v in (overrides or {}).items() if v is not None}

    class _Layered(kind):  # env beats files; explicit overrides beat env
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                       file_secret_settings):
            return init_settings, env_settings, _Values(settings_cls, values)

    try:
        return _Layered(**explicit)
    except ValidationError as exc:
        problems = "; ".join(f"{section}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SettingsError(f"invalid settings: {problems}") from None


class _Values(PydanticBaseSettingsSource):
    def __init__(self, settings_cls, values: dict[str, Any]):
        super().__init__(settings_cls)
        self._values = values

    def get_field_value(self, field, field_name):
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)
