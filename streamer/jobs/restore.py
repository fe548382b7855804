"""A file job: ``restore_file(in, out, options)`` restores the faces of one video file into
another, atomically. ``gpen-stream restore`` is a thin layer over it; ``gpen-stream serve``
runs the same job for every job it takes, on one long-lived engine.

Before anything slow happens, every path the job will write is checked against every path it
reads and against each other (a ``--dump-faces`` pointed at the input must not replace it),
the output format is checked, and the model's weights are located.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

from configs import EngineSettings, JobOptions, WorkerSettings, load_settings
from configs.atomic import AtomicText
from configs.errors import InputError
from streamer.dispatch import FILE_POLICY
from streamer.engine import Engine
from streamer.faces.faces_file import read_faces_file
from streamer.io.probe import MediaError, probe
from streamer.io.sink import FileSink, check_output
from streamer.io.source import FileSource
from streamer.pipeline import JobResult, Progress


class PathConflict(InputError):
    """A path the job would write is one it reads, or another it writes."""


def check_paths(reads: dict[str, Path], writes: dict[str, Path]) -> None:
    """Refuse a write that would land on something read or written by the same job (the same
    file by another name included: symlinks, ``..``, hard links)."""
    seen: list[tuple[str, Path]] = []
    for role, path in [*reads.items(), *writes.items()]:
        for other_role, other in seen:
            if (role in writes or other_role in writes) and _same_file(path, other):
                raise PathConflict(f"{role} {path} is the same file as {other_role} {other}: gpen-stream would "
                                   f"overwrite it; choose another name for the {role if role in writes else other_role}")
        seen.append((role, path))


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def restore_file(input_path: str | Path, output_path: str | Path, options: JobOptions,
                 worker_settings: WorkerSettings | None = None, *, engine_settings: EngineSettings | None = None,
                 engine: Engine | None = None, faces_file: str | Path | None = None,
                 dump_faces: str | Path | None = None, progress: Callable[[Progress], None] | None = None,
                 cancel: threading.Event | None = None, job_id: str | None = None,
                 extra_reads: dict[str, Path] | None = None, temp_tag: str | None = None) -> JobResult:
    """Restore the faces in ``input_path`` and write ``output_path`` (atomically).

    Runs on ``engine`` if given (its workers and loaded models are reused), else on an
    engine built for this call from ``engine_settings`` and ``worker_settings``. ``cancel``
    (set from any thread) stops the job with ``Cancelled``; nothing is written. ``temp_tag``
    names the temporary output file (default: random).
    """
    input_path, output_path = Path(input_path), Path(output_path)
    own_engine = engine is None
    if own_engine:
        engine = Engine(engine_settings or load_settings(EngineSettings),
                        worker_settings or load_settings(WorkerSettings))
    try:
        reads = {"input": input_path, **(extra_reads or {})}
        if faces_file is not None:
            reads["faces file"] = Path(faces_file)
        reads.update({f"{name} weights": path for name, path in engine.worker_settings.models.items()})
        writes = {"output": output_path}
        if dump_faces is not None:
            writes["--dump-faces file"] = Path(dump_faces)
        check_paths(reads, writes)
        info = probe(input_path)
        check_output(output_path)
        if dump_faces is not None and not Path(dump_faces).parent.is_dir():
            raise MediaError(f"folder of --dump-faces does not exist: {Path(dump_faces).parent}")
        engine.check_model(options.model)  # weights fetched and verified before any work starts
        faces_by_frame = read_faces_file(faces_file) if faces_file is not None else None
        source = FileSource(input_path, strict=options.corrupt_frames == "fail", info=info)
        try:
            sink = FileSink(output_path, codec=options.codec, crf=options.crf, preset=options.preset, temp_tag=temp_tag)
            dump = AtomicText(Path(dump_faces)) if dump_faces is not None else None
        except BaseException:
            source.close()
            raise
        return engine.run(source, sink, options, policy=FILE_POLICY, faces_by_frame=faces_by_frame, dump=dump,
                          progress=progress, cancel=cancel, job_id=job_id)
    finally:
        if own_engine:
            engine.close()
