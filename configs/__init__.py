"""Settings (YAML defaults + pydantic-settings models, one per scope) and the few definitions
every process shares: error classes (``configs.errors``) and atomic file writes
(``configs.atomic``)."""

from configs.settings import (EngineSettings, JobOptions, LiveSettings, ServeSettings, SettingsError, WorkerSettings,
                              job_options, load_settings)

__all__ = ["JobOptions", "EngineSettings", "WorkerSettings", "ServeSettings", "LiveSettings", "SettingsError",
           "job_options", "load_settings"]
