"""A job as another service submits it: one entry of the ``<prefix>:jobs`` stream.

    XADD gpen:jobs * id <id> input <path> output <path> [model <name>] [options <json>]

- ``id``: the client's idempotency key (letters, digits, ``_ . : -``; at most 128). A second
  entry with an id that exists runs nothing. Without one, the id is made from the entry id.
- ``input``, ``output``: absolute local paths (no URLs), which must resolve, symlinks
  included, inside ``serve.input_roots`` / ``serve.output_roots``. The output's folder must
  exist; the output must not be the input.
- A live job: ``input`` is a stream URL (rtsp://, rtmp://, srt://, udp://) allowed by
  ``serve.live_sources``; ``output`` a stream URL or a path (HLS .m3u8, a recording) under
  the output roots. It runs until cancelled.
- ``model``: ``GPEN-BFR-256|512|1024|2048`` or ``identity`` (default: the daemon's).
- ``options``: a JSON object of per-job settings, the names of the ``restore:`` section
  (``crf``, ``temporal``, ``detect_every``, ...), plus ``faces``: a faces file (as
  ``restore --faces`` takes it) under the input roots. Anything else fails the job with a
  message naming it; process settings (workers, devices, ...) are refused the same way.

Everything here raises ``JobRejected`` (not retryable) with a message meant for the submitter.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from configs import JobOptions, SettingsError, job_options
from configs.errors import InputError
from streamer.jobs.live import LiveRefused, check_allowed, is_stream_url

JOB_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
FIELDS = ("id", "input", "output", "model", "options")
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class JobRejected(InputError):
    """The job as submitted cannot run (bad fields, paths outside the roots, bad options)."""


@dataclass(frozen=True)
class JobSpec:
    id: str
    input: Path | str  # a file: resolved, inside the input roots; a live job: the stream URL
    output: Path | str  # a file: resolved, inside the output roots; a live job: a URL or such a path
    options: JobOptions
    faces: Path | None  # resolved, inside the input roots
    entry: str  # the stream entry it came from
    live: bool = False  # the input is a stream: the job runs until cancelled


def decode_fields(raw: dict) -> dict[str, str]:
    """Stream entry fields as text (redis-py gives bytes unless decode_responses is set)."""
    fields = {}
    for key, value in raw.items():
        try:
            key = key.decode() if isinstance(key, bytes) else str(key)
            fields[key] = value.decode() if isinstance(value, bytes) else str(value)
        except UnicodeDecodeError:
            raise JobRejected(f"field {key!r} is not UTF-8 text") from None
    return fields


def job_id_of(fields: dict[str, str], entry: str) -> str:
    """The job's id: the client's, if it is a valid one; else made from the entry id."""
    given = fields.get("id")
    if given is None or given == "":
        return f"entry-{entry}"
    if not JOB_ID.match(given):
        raise JobRejected(f"id {given[:80]!r} is not a valid job id (1-128 of A-Z a-z 0-9 _ . : -)")
    return given


def parse_job(fields: dict[str, str], entry: str, *, input_roots: list[Path], output_roots: list[Path],
              defaults: JobOptions, live_sources: list[str] = (), live_outputs: list[str] = ()) -> JobSpec:
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise JobRejected(f"unknown field(s) {', '.join(unknown)}; a job has {', '.join(FIELDS)}")
    job_id = job_id_of(fields, entry)
    for required in ("input", "output"):
        if not fields.get(required):
            raise JobRejected(f"missing field '{required}' (XADD <prefix>:jobs * id ID input PATH output PATH ...)")
    requested = _options(fields.get("options"))
    faces_field = requested.pop("faces", None)
    if "model" in fields:
        requested["model"] = fields["model"]
    try:
        options = job_options(requested, base=defaults)
    except SettingsError as exc:
        raise JobRejected(str(exc)) from None
    if _stream_url(fields["input"], "input"):  # a live job: the stream, and a stream or a file to write
        try:
            check_allowed(fields["input"], list(live_sources))
        except (LiveRefused, ValueError) as exc:
            raise JobRejected(str(exc)) from None
        target = fields["output"]
        if _stream_url(target, "output"):  # where the daemon may send pictures, as where it may read them
            try:
                check_allowed(target, list(live_outputs), role="output", setting="serve.live_outputs")
            except (LiveRefused, ValueError) as exc:
                raise JobRejected(str(exc)) from None
            output = target
        else:
            output = resolve_under(target, output_roots, "output", must_exist=False)
        if faces_field is not None:
            raise JobRejected("option 'faces' is for file jobs; a live job finds faces itself")
        return JobSpec(job_id, fields["input"], output, options, None, entry, live=True)
    source = resolve_under(fields["input"], input_roots, "input", must_exist=True)
    output = resolve_under(fields["output"], output_roots, "output", must_exist=False)
    if output == source:
        raise JobRejected("output must not be the input file")
    faces = None
    if faces_field is not None:
        if not isinstance(faces_field, str):
            raise JobRejected("option 'faces' must be a path (a faces file, as restore --faces takes it)")
        faces = resolve_under(faces_field, input_roots, "faces file", must_exist=True)
    return JobSpec(job_id, source, output, options, faces, entry)


def _stream_url(text: str, role: str) -> bool:
    """Whether ``text`` is a stream URL; a URL that cannot even be parsed (``rtsp://[::1``) is
    refused here (it is not quoted back: it may hold a password)."""
    try:
        return is_stream_url(text)
    except ValueError as exc:
        raise JobRejected(f"{role} is not a valid URL ({exc})") from None


def _options(text: str | None) -> dict:
    if text is None or text.strip() == "":
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise JobRejected(f"options is not valid JSON ({exc.msg} at character {exc.pos})") from None
    except (ValueError, RecursionError) as exc:  # nested too deep, numbers too long, ...
        raise JobRejected(f"options is not usable JSON ({type(exc).__name__}: {str(exc)[:100]})") from None
    if not isinstance(value, dict):
        raise JobRejected(f"options must be a JSON object, got {type(value).__name__}")
    return value


def resolve_under(text: str, roots: list[Path], role: str, *, must_exist: bool) -> Path:
    """``text`` as an absolute path with every symlink and ``..`` resolved, refused unless it
    lies inside one of ``roots`` (resolved the same way)."""
    if URL.match(text) and not text.startswith("/"):
        raise JobRejected(f"{role} {text!r} is not a local path: file jobs take absolute paths only (no URLs)")
    path = Path(text)
    if not path.is_absolute():
        raise JobRejected(f"{role} {text!r} must be an absolute path")
    if "\x00" in text:
        raise JobRejected(f"{role} contains a NUL character")
    if not roots:
        raise JobRejected(f"no {role.split()[0]} folders are configured (serve.{_root_setting(role)}): "
                          "this daemon accepts no jobs")
    try:
        resolved = path.resolve(strict=True) if must_exist else path.parent.resolve(strict=True) / path.name
        if not must_exist and resolved.is_symlink():
            resolved = resolved.resolve()  # writing through a link writes where it points
    except FileNotFoundError:
        what = "does not exist" if must_exist else "is in a folder that does not exist"
        raise JobRejected(f"{role} {text} {what}") from None
    except (OSError, RuntimeError) as exc:  # loops, permissions
        raise JobRejected(f"{role} {text} cannot be resolved: {exc}") from None
    allowed = [root.resolve() for root in roots]
    if not any(resolved == root or resolved.is_relative_to(root) for root in allowed):
        raise JobRejected(f"{role} {text} resolves to {resolved}, outside the allowed folders "
                          f"(serve.{_root_setting(role)}: {', '.join(map(str, allowed))})")
    return resolved


def _root_setting(role: str) -> str:
    return "output_roots" if role == "output" else "input_roots"
