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

from configs.errors import InputError

DEFAULTS_FILE = Path(__file__).with_name("defaults.yaml")


class SettingsError(InputError, ValueError):
    """Settings that do not validate; the message names the key and the problem."""


DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?|mps)$"


class _Settings(BaseSettings):
    pass


class JobOptions(_Settings):
    """What one job may choose (section ``restore:``): the model, how faces are found and
    followed, how they are blended and pasted, how the video is encoded. A job submitted by
    another service sets these and nothing else."""

    model_config = SettingsConfigDict(env_prefix="GPEN_STREAM_RESTORE_", extra="forbid")

    model: str
    detector: Literal["retinaface_resnet50", "retinaface_mobile0.25"]
    detect_every: int = Field(ge=1)
    detect_max_side: int = Field(ge=64)
    detect_threshold: float = Field(gt=0, lt=1)
    min_face: int = Field(ge=0)
    max_faces: int = Field(ge=1)
    codec: str | None
    crf: float = Field(ge=0, le=63)
    preset: str
    strength: float = Field(ge=0, le=1)
    color_match: bool
    mask: Literal["feather", "parse"]
    mask_inset: float = Field(ge=0, lt=0.5)
    mask_feather: float = Field(ge=0, lt=0.5)
    corrupt_frames: Literal["skip", "fail"]
    temporal: Literal["auto", "off", "landmarks", "full"]
    track_iou: float = Field(ge=0, le=1)
    track_max_missing: int = Field(ge=0)
    smooth_min_cutoff: float = Field(gt=0)
    smooth_beta: float = Field(ge=0)
    scene_cut_threshold: float = Field(gt=0)


class EngineSettings(_Settings):
    """The decoder side of a process (section ``engine:``), set by the operator only: where
    workers come from, which devices and files the detector and parser use, how much work
    may be in flight. Built once per process and shared by every job it runs."""

    model_config = SettingsConfigDict(env_prefix="GPEN_STREAM_ENGINE_", extra="forbid")

    workers: int = Field(ge=0)
    connect: list[str]
    isolate_workers: bool
    connect_timeout_s: float = Field(gt=0)
    worker_start_timeout_s: float = Field(gt=0)
    worker_timeout_s: float = Field(gt=0)
    max_frames_in_flight: int = Field(ge=2)
    detector_device: str = Field(pattern=DEVICE_PATTERN)
    detector_weights: Path | None
    parser_weights: Path | None
    redis: str | None  # find workers registered in this Redis (instead of connect / our own)
    prefix: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # their keys' prefix in it
    keys_dir: Path | None  # CURVE keys to reach workers that require them


class WorkerSettings(_Settings):
    """An inference worker (section ``worker:``): one per device."""

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
    cuda_graphs: bool  # on a GPU, the temporal blend's registration as CUDA graphs
    temporal_state_mib: int = Field(ge=1)  # the tracks' blend state at most (workers.temporal.TemporalBlender.max_bytes)
    models: dict[str, Path]
    redis: str | None  # register here (heartbeat, memory lease)
    prefix: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # the keys' prefix in it
    advertise: str | None  # the endpoint decoders should connect to (default: the bound one, wildcard -> host name)
    registry_ttl_s: float = Field(gt=0)
    memory_budget_mib: int = Field(ge=0)
    idle_unload_s: float = Field(gt=0)
    keys_dir: Path | None
    insecure: bool


class LiveSettings(_Settings):
    """Live feeds (section ``live:``): latency bound, reconnects, stream outputs."""

    model_config = SettingsConfigDict(env_prefix="GPEN_STREAM_LIVE_", extra="forbid")

    latency_ms: float = Field(gt=0)
    stall_s: float = Field(gt=0)
    open_timeout_s: float = Field(gt=0)
    backoff_max_s: float = Field(gt=0)
    rtsp_transport: Literal["tcp", "udp"]
    hold_frames: float = Field(gt=0)
    segment_time_s: float | None = Field(default=None, gt=0)
    hls_time_s: float = Field(gt=0)
    hls_list_size: int = Field(ge=1)


class ServeSettings(_Settings):
    """The job daemon (section ``serve:``): where its Redis is, how many jobs it runs at once,
    how jobs are delivered and retried, which folders jobs may read and write."""

    model_config = SettingsConfigDict(env_prefix="GPEN_STREAM_SERVE_", extra="forbid")

    redis: str
    prefix: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    concurrency: int = Field(ge=1, le=64)
    claim_idle_s: float = Field(gt=0)
    max_attempts: int = Field(ge=1)
    keep_finished_s: int = Field(ge=1)
    drain_s: float = Field(ge=0)
    events_maxlen: int = Field(ge=100)
    http_host: str
    http_port: int = Field(ge=0, le=65535)
    input_roots: list[Path]
    output_roots: list[Path]
    live_sources: list[str]
    live_outputs: list[str]
    streams: list[dict[str, Any]]


_SECTIONS: dict[type[_Settings], str] = {JobOptions: "restore", EngineSettings: "engine", WorkerSettings: "worker",
                                         ServeSettings: "serve", LiveSettings: "live"}
PROCESS_SECTIONS = (EngineSettings, WorkerSettings, ServeSettings, LiveSettings)  # what a job may never set


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


def job_options(requested: dict[str, Any], *, base: JobOptions | None = None) -> JobOptions:
    """A job's options: ``base`` (the process's defaults) updated with what the job asked for.
    A key that is a process setting, or no setting at all, is an error that names it."""
    base = base or load_settings(JobOptions)
    for key in requested:
        if key in JobOptions.model_fields:
            continue
        owner = next((kind for kind in PROCESS_SECTIONS if key in kind.model_fields), None)
        if owner is not None:
            raise SettingsError(f"'{key}' is a process setting ({_SECTIONS[owner]}.{key}): only the operator "
                                "sets it, a job cannot")
        raise SettingsError(f"unknown option '{key}'; a job may set: {', '.join(JobOptions.model_fields)}")
    try:
        return JobOptions.model_validate(base.model_dump() | requested)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SettingsError(f"invalid option: {problems}") from None
