"""The command line as users run it: a subprocess, its exit code, stdout and stderr."""

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.support.clips import make_clip

CLI = [sys.executable, "-m", "streamer"]


def _run(*args, timeout=300):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_help_explains_the_commands_and_options():
    top = _run("--help")
    assert top.returncode == 0 and "restore" in top.stdout and "non-commercial" in top.stdout
    restore = _run("restore", "--help")
    for option in ("--model", "--faces", "--detect-every", "--temporal", "--json-progress", "--workers", "--crf"):
        assert option in restore.stdout
    assert "RetinaFace landmark order" in restore.stdout


def test_restore_prints_json_progress_and_a_summary(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", frames=30)
    out = tmp_path / "out.mp4"
    result = _run("restore", str(clip.path), "-o", str(out), "--model", "identity", "--faces", str(clip.faces_path),
                  "--json-progress", "--quiet")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[-1]["event"] == "done" and events[-1]["frames"] == 30 and events[-1]["faces"] == 30
    assert all(e["event"] in ("progress", "done") for e in events)
    assert out.exists()


def test_bad_input_exits_non_zero_with_a_message_and_no_traceback(tmp_path):
    result = _run("restore", str(tmp_path / "missing.mp4"), "-o", str(tmp_path / "out.mp4"), "--model", "identity",
                  "--json-progress")
    assert result.returncode == 1
    assert "input not found" in result.stderr and "Traceback" not in result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["event"] == "failed"


def test_invalid_settings_are_usage_errors(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", frames=2)
    result = _run("restore", str(clip.path), "-o", str(tmp_path / "o.mp4"), "--batch", "0")
    assert result.returncode == 2 and "worker.batch" in result.stderr


def test_an_encoder_option_ffmpeg_rejects_is_one_clear_line(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", frames=3)
    result = _run("restore", str(clip.path), "-o", str(tmp_path / "out.mp4"), "--model", "identity", "--faces",
                  str(clip.faces_path), "--preset", "warp-speed", "--quiet")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out.mp4").exists()


# SIGINT here under -m slow: tests/test_signals.py sends it at every phase of a run
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_signals_cancel_and_leave_no_output(tmp_path, sig):
    clip = make_clip(tmp_path / "in.mp4", frames=400)
    out = tmp_path / "out.mp4"
    proc = subprocess.Popen([*CLI, "restore", str(clip.path), "-o", str(out), "--model", "identity", "--faces",
                             str(clip.faces_path), "--json-progress", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # the first progress line: work is under way
    assert json.loads(line)["event"] == "progress"
    proc.send_signal(sig)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert json.loads(rest.splitlines()[-1])["event"] == "cancelled"
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".part" in p]
