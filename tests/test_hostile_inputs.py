"""The hostile-input corpus (tests/support/corpus.py) through the command line.

Every case runs ``gpen-stream restore ... --model identity --json-progress -q`` in its own folder
and must end as the case says (a clear error, or a correct output with the right frame count).
On top of that, every run must:

- not hang (a timeout per case) and not crash (no negative exit code, no traceback);
- print its failure as a gpen-stream error line, not drown it in FFmpeg's log;
- leave nothing behind: no ``.part`` or other hidden file beside the output, nothing in its
  temporary folder (each run gets its own ``TMPDIR``, so a ``gpen-stream-*`` folder it creates
  is seen), no process that it started still running;
- leave its input (and every other file the case protects) byte-identical.

Speed: a fresh interpreter spends ~5 s importing torch before it even looks at the input, which
for 60 cases is most of the test budget. So by default the cases run in processes forked from
one interpreter that has imported ``streamer.cli`` (and with it torch, PyAV, OpenCV) and done
nothing else: each child sets its working directory and environment, points fds 0-2 at
/dev/null and files, calls ``streamer.cli.main(argv)`` and exits with its return value the way
``python -m streamer`` does: uncaught exceptions printed, non-daemon threads joined, atexit
handlers run (logging flushed), stdio flushed; then ``os._exit``, skipping only the unloading of
modules, which for torch's CUDA build costs ~1.4 s a process on a slow machine (the fresh
variant below exits the whole way). Children are separate
processes, so exit codes, signals, stray workers and files are observed as for the real
command. ``test_hostile_input_fresh`` (marked slow) runs the whole corpus through
``python -m streamer`` subprocesses instead. Runs go two at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.corpus import CASES, CASES_BY_NAME, Built, Case, Outcome, Sources, counted_frames, frame_times

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "streamer"]
PARALLEL = 2
MARKER = "GPENTEST_RUN_TOKEN"  # in every run's environment: finds the processes it started
MAX_FFMPEG_LINES = 10  # more FFmpeg log lines than this on stderr drown the one clear message


# ---------------------------------------------------------------------- the pre-imported interpreter

ZYGOTE = r'''
import atexit, json, os, sys, threading, traceback
sys.path.insert(0, sys.argv[1])
import streamer.cli  # noqa: the expensive imports, once
import streamer.pipeline  # noqa
import streamer.jobs.restore, workers.build, av, zmq, redis  # noqa: what a restore imports on its way (no threads yet)
from streamer.cli import main

ctl_in = os.fdopen(os.dup(0), "r")
ctl_out = os.fdopen(os.dup(1), "w")
null = os.open(os.devnull, os.O_RDWR)
os.dup2(null, 0)
os.dup2(null, 1)


def child(req):
    os.setsid()
    ctl_in.close()
    ctl_out.close()
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    import tempfile
    tempfile.tempdir = None
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.argv = [sys.argv[0], *req["argv"]]
    try:
        code = main(req["argv"])
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        traceback.print_exc()
        code = 1
    if isinstance(code, str):  # as sys.exit("message") does
        print(code, file=sys.stderr)
        code = 1
    threading._shutdown()  # what interpreter exit does, in its order, short of unloading modules
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


while True:
    line = ctl_in.readline()
    if not line:
        break
    req = json.loads(line)
    if req["cmd"] == "run":
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(req)  # never returns: the child exits like `python -m streamer` does
        reply = {"pid": pid}
    else:  # poll
        done, status = os.waitpid(req["pid"], os.WNOHANG)
        reply = {"rc": os.waitstatus_to_exitcode(status) if done else None}
    ctl_out.write(json.dumps(reply) + "\n")
    ctl_out.flush()
'''


class Zygote:
    """One interpreter with streamer.cli imported; ``run`` forks a child per command."""

    def __init__(self):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(ROOT)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.lock = threading.Lock()

    def _ask(self, req: dict) -> dict:
        with self.lock:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the pre-imported interpreter died: {self.proc.stderr.read()[-2000:]}")
        return json.loads(line)

    def run(self, argv: list[str], cwd: Path, env: dict, timeout_s: float, out: Path, err: Path) -> tuple[int, bool]:
        """(exit code, timed out)."""
        pid = self._ask({"cmd": "run", "argv": argv, "cwd": str(cwd), "env": env, "stdout": str(out),
                         "stderr": str(err)})["pid"]
        deadline = time.monotonic() + timeout_s
        timed_out = False
        while (rc := self._ask({"cmd": "poll", "pid": pid})["rc"]) is None:
            if not timed_out and time.monotonic() > deadline:
                timed_out = True
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.05)
        return rc, timed_out

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------- running a case


@dataclass(repr=False)
class Run:
    case: Case
    built: Built | None = None
    folder: Path | None = None
    build_error: str | None = None
    rc: int | None = None
    stdout: str = ""
    stderr: str = ""
    elapsed_s: float = 0.0
    timed_out: bool = False
    before: set[str] = field(default_factory=set)
    after: set[str] = field(default_factory=set)
    tmp_left: list[str] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)
    hashes_before: dict[str, str | None] = field(default_factory=dict)
    hashes_after: dict[str, str | None] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Run({self.case.name}, rc={self.rc})"


def _listing(folder: Path) -> set[str]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(folder):
        rel = Path(dirpath).relative_to(folder)
        for name in dirnames + filenames:
            found.add(str(rel / name))
    return found


def _digest(path: Path) -> str | None:
    if path.is_fifo():
        return "fifo"
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def processes_with(token: str) -> list[tuple[int, str]]:
    """Live processes started with ``MARKER=token`` in their environment (a run's children)."""
    needle = f"{MARKER}={token}\0".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes() + b"\0":
                continue
            if "\nState:\tZ" in (entry / "status").read_text():
                continue  # exited; its parent has not reaped it yet
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            found.append((int(entry.name), cmd))
        except OSError:
            continue
    return found


def wait_for_no_processes(token: str, grace_s: float = 5.0) -> list[str]:
    """The processes still running ``grace_s`` after the run ended (killed, and returned)."""
    deadline = time.monotonic() + grace_s
    while (stray := processes_with(token)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid, _ in stray:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return [f"{pid}: {cmd}" for pid, cmd in stray]


def cli_env(tmp: Path, token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPEN_STREAM_RESTORE_", "GPEN_STREAM_WORKER_"))}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["TMPDIR"] = str(tmp)
    env[MARKER] = token
    return env


def execute(run: Run, tmp: Path, zygote: Zygote | None) -> Run:
    built, folder = run.built, run.folder
    token = uuid.uuid4().hex
    tmp.mkdir(parents=True, exist_ok=True)
    run_tmp = tmp / built.tmp_subdir if built.tmp_subdir else tmp
    run_tmp.mkdir(parents=True, exist_ok=True)
    run.before = _listing(folder)
    run.hashes_before = {p: _digest(folder / p) for p in built.protected}
    argv = ["restore", *built.args, "--model", "identity", "--json-progress", "-q"]
    env = cli_env(run_tmp, token)
    started = time.monotonic()
    if zygote is not None:
        out, err = tmp.parent / f"{run.case.name}.stdout", tmp.parent / f"{run.case.name}.stderr"
        run.rc, run.timed_out = zygote.run(argv, folder, env, built.timeout_s, out, err)
        run.stdout, run.stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
    else:
        proc = subprocess.Popen([*CLI, *argv], cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            run.stdout, run.stderr = proc.communicate(timeout=built.timeout_s)
        except subprocess.TimeoutExpired:
            run.timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            run.stdout, run.stderr = proc.communicate()
        run.rc = proc.returncode
    run.elapsed_s = time.monotonic() - started
    run.stray = wait_for_no_processes(token)
    run.after = _listing(folder)
    run.hashes_after = {p: _digest(folder / p) for p in built.protected}
    run.tmp_left = sorted(_listing(run_tmp))
    return run


def _run_corpus(request, tmp_path_factory, test_name: str, fresh: bool) -> dict[str, Run]:
    wanted = []
    for item in request.session.items:
        if getattr(item, "originalname", None) != test_name:
            continue
        case = item.callspec.params.get("case")
        if isinstance(case, Case) and case not in wanted:
            wanted.append(case)
    root = tmp_path_factory.mktemp("corpus")
    started = time.monotonic()
    runs: dict[str, Run] = {}
    if not wanted:
        return runs
    zygote = None if fresh else Zygote()  # imports while the cases are built
    try:
        sources = Sources(root / "_sources")
        for case in wanted:
            run = runs[case.name] = Run(case, folder=root / case.name)
            run.folder.mkdir()
            try:
                run.built = case.build(run.folder, sources)
            except Exception:
                run.build_error = traceback.format_exc()
        built_at = time.monotonic()
        todo = [r for r in runs.values() if r.built is not None and not r.built.skip]
        with ThreadPoolExecutor(PARALLEL) as pool:
            list(pool.map(lambda r: execute(r, root / "_tmp" / r.case.name, zygote), todo))
        (root / "timings.json").write_text(json.dumps({
            "build_s": round(built_at - started, 1), "run_s": round(time.monotonic() - built_at, 1),
            "runs": {r.case.name: [r.rc, round(r.elapsed_s, 1)] for r in todo}}, indent=1))
    finally:
        if zygote is not None:
            zygote.close()
        for run in runs.values():
            if run.built is not None and run.built.cleanup is not None:
                run.built.cleanup()
    return runs


@pytest.fixture(scope="session")
def corpus_runs(request, tmp_path_factory) -> dict[str, Run]:
    """Every corpus case selected in this session, built and run (forked from one interpreter)."""
    return _run_corpus(request, tmp_path_factory, "test_hostile_input", fresh=False)


@pytest.fixture(scope="session")
def corpus_runs_fresh(request, tmp_path_factory) -> dict[str, Run]:
    """The same, each case in a fresh ``python -m streamer``."""
    return _run_corpus(request, tmp_path_factory, "test_hostile_input_fresh", fresh=True)


# ---------------------------------------------------------------------- checking a run


def _own_errors(stderr: str) -> str:
    """gpen-stream's own error lines (its logger, or argparse's usage error)."""
    return "\n".join(line for line in stderr.splitlines()
                     if re.search(r" ERROR +(gpen-stream|streamer|workers|configs|gpen)[.:]", line)
                     or "gpen-stream restore: error:" in line)


def _summary(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") in ("done", "failed", "cancelled"):
            return event
    return {}


def _new_files(run: Run) -> set[str]:
    return run.after - run.before


def _match(outcome: Outcome, run: Run) -> str | None:
    """None if the run ended as ``outcome`` says, else what differs."""
    built, folder = run.built, run.folder
    rcs = outcome.rc if isinstance(outcome.rc, tuple) else (outcome.rc,)
    if run.rc not in rcs:
        return f"exit code {run.rc}, expected {outcome.rc}"
    if outcome.rc != 0:
        errors = _own_errors(run.stderr)
        if not errors.strip():
            return "no gpen-stream error message on stderr"
        if not re.search(outcome.message, errors, re.IGNORECASE):
            return f"the error does not name the problem (/{outcome.message}/): {errors.strip()[-400:]}"
        if _new_files(run):
            return f"a failed run wrote files: {sorted(_new_files(run))}"
        return None
    out = folder / built.output
    if not out.exists():
        return f"exit 0 but {built.output} does not exist"
    try:
        frames = counted_frames(built.output, cwd=folder)
        times = frame_times(built.output, cwd=folder)
    except AssertionError as exc:
        return f"the output is not readable: {exc}"
    if outcome.frames is not None and frames != outcome.frames:
        return f"the output has {frames} frames, expected {outcome.frames}"
    summary = _summary(run.stdout)
    if summary.get("event") != "done" or summary.get("frames") != frames:
        return f"the summary does not match the output's {frames} frames: {summary}"
    if None in times or any(b <= a for a, b in zip(times, times[1:])):
        return f"output timestamps are missing or not strictly increasing: {times}"
    if outcome.check is not None:
        try:
            outcome.check(out, summary)
        except AssertionError as exc:
            return f"check failed: {exc}"
    return None


def problems_of(run: Run) -> list[str]:
    problems = []
    if run.timed_out:
        problems.append(f"hung: killed after {run.built.timeout_s:.0f} s")
    elif run.rc is not None and run.rc < 0:
        problems.append(f"crashed: killed by signal {-run.rc}")
    if "Traceback" in run.stderr:
        problems.append("a traceback on stderr")
    ffmpeg_lines = sum(1 for line in run.stderr.splitlines() if " libav." in line)
    if ffmpeg_lines > MAX_FFMPEG_LINES:
        problems.append(f"stderr flooded with {ffmpeg_lines} FFmpeg log lines")
    if run.stray:
        problems.append(f"processes left running: {run.stray}")
    if run.tmp_left:
        problems.append(f"left in its temporary folder: {run.tmp_left}")
    hidden = sorted(p for p in _new_files(run) if ".part" in p or Path(p).name.startswith("."))
    if hidden:
        problems.append(f"hidden or partial files left behind: {hidden}")
    changed = [p for p in run.built.protected if run.hashes_before.get(p) != run.hashes_after.get(p)]
    if changed:
        problems.append(f"input files changed or removed: {changed}")
    if run.rc == 0 and "*" not in run.built.allowed_new:
        unexpected = sorted(_new_files(run) - {run.built.output, *run.built.allowed_new})
        if unexpected:
            problems.append(f"unexpected files written: {unexpected}")
    if not run.timed_out:
        mismatches = [_match(o, run) for o in run.built.expect]
        if all(m is not None for m in mismatches):
            wanted = " | or | ".join(o.describe() for o in run.built.expect)
            problems.append(f"expected {wanted}; got: {' / '.join(mismatches)}")
    return problems


def _check(case: Case, runs: dict[str, Run]) -> None:
    run = runs[case.name]
    if run.build_error:
        pytest.fail(f"could not build the case:\n{run.build_error}")
    if run.built.skip:
        pytest.skip(run.built.skip)
    problems = problems_of(run)
    assert not problems, (f"{case.name} ({case.summary}): " + "; ".join(problems)
                          + f"\n--- stderr (last 1500 chars) ---\n{run.stderr[-1500:]}")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input(case: Case, corpus_runs):
    _check(case, corpus_runs)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_fresh(case: Case, corpus_runs_fresh):
    _check(case, corpus_runs_fresh)


def test_the_corpus_is_big_and_varied():
    assert len(CASES) >= 30
    assert len(CASES_BY_NAME) == len(CASES)
    for case in CASES:
        assert case.summary and case.name.isidentifier()
