"""Settings: YAML defaults (configs/defaults.yaml) + pydantic-settings models."""

from configs.settings import RestoreSettings, SettingsError, WorkerSettings, load_settings

__all__ = ["RestoreSettings", "WorkerSettings", "SettingsError", "load_settings"]
