import pytest

from configs import EngineSettings, JobOptions, SettingsError, WorkerSettings, job_options, load_settings


def test_defaults_come_from_the_yaml_file():
    s = load_settings(JobOptions)
    assert s.model == "GPEN-BFR-512" and s.detector == "retinaface_resnet50" and s.temporal == "auto"
    assert load_settings(WorkerSettings).device == "auto" and load_settings(EngineSettings).workers == 0


def test_file_then_environment_then_overrides_take_precedence(tmp_path, monkeypatch):
    cfg = tmp_path / "gpen.yaml"
    cfg.write_text("restore:\n  crf: 22\n  preset: slow\nworker:\n  batch: 6\n")
    assert load_settings(JobOptions, config_file=cfg).crf == 22
    monkeypatch.setenv("GPEN_STREAM_RESTORE_CRF", "24")
    assert load_settings(JobOptions, config_file=cfg).crf == 24
    s = load_settings(JobOptions, config_file=cfg, overrides={"crf": 30, "preset": None})
    assert s.crf == 30 and s.preset == "slow"  # None means "not given on the command line"
    assert load_settings(WorkerSettings, config_file=cfg).batch == 6


def test_unknown_keys_and_bad_values_are_rejected_with_their_name(tmp_path):
    with pytest.raises(SettingsError, match="restore.bogus"):
        load_settings(JobOptions, overrides={"bogus": 1})
    with pytest.raises(SettingsError, match="restore.batch|restore.detect_every"):
        load_settings(JobOptions, overrides={"detect_every": 0})
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("restore:\n  temporal: sometimes\n")
    with pytest.raises(SettingsError, match="restore.temporal"):
        load_settings(JobOptions, config_file=cfg)
    cfg.write_text("decoder:\n  x: 1\n")
    with pytest.raises(SettingsError, match="unknown section"):
        load_settings(JobOptions, config_file=cfg)


@pytest.mark.parametrize("key, section", [("workers", "engine"), ("connect", "engine"), ("device", "worker"),
                                          ("detector_weights", "engine"), ("models", "worker")])
def test_a_job_cannot_set_a_process_setting(key, section):
    with pytest.raises(SettingsError, match=rf"'{key}' is a process setting \({section}\.{key}\)"):
        job_options({key: "x"})


def test_job_options_take_job_settings_and_name_unknown_ones():
    assert job_options({"crf": 12, "temporal": "off"}).crf == 12
    with pytest.raises(SettingsError, match="unknown option 'sharpness'"):
        job_options({"sharpness": 2})
    with pytest.raises(SettingsError, match="crf"):
        job_options({"crf": 99})
