"""The weight store: where model files live, how they are fetched and how they are checked.

Files are cached under ``$GPEN_STREAM_HOME/models`` (default ``$XDG_CACHE_HOME/gpen-stream``,
else ``~/.cache/gpen-stream``). A download goes to a temporary file in the same folder, is
hashed while it streams, and is renamed into place only when its size and SHA-256 match.
A verified file gets a ``.sha256`` sidecar keyed by size and mtime, so later runs do not
re-hash hundreds of megabytes.

GPEN's released weights are for non-commercial use only (see yangxy/GPEN).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from configs.atomic import AtomicFile
from configs.errors import GpenStreamError

GPEN_LICENSE = "GPEN weights: non-commercial use only (yangxy/GPEN)"
RETINAFACE_LICENSE = "RetinaFace weights (facexlib): MIT"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class WeightFile:
    name: str
    filename: str
    urls: tuple[str, ...]
    sha256: str | None  # None: no published digest; the first download's digest is recorded
    size: int | None
    kind: str  # "gpen" | "detector" | "parser"
    license: str


_OSS = "https://public-vigen-video.oss-cn-shanghai.aliyuncs.com/robin/models"
_MODELSCOPE = "https://www.modelscope.cn/models/iic/cv_gpen_image-portrait-enhancement-hires/resolve/master"
_FACEXLIB = "https://github.com/xinntao/facexlib/releases/download/v0.1.0"

CATALOG: dict[str, WeightFile] = {w.name: w for w in (
    WeightFile("GPEN-BFR-256", "GPEN-BFR-256.pth", (f"{_OSS}/GPEN-BFR-256.pth",),
               "56ba6ed9d19e1e1c2ec36bc63e1ef9d54ed1bc544b4f8f0769222660d255ddc5", 75573183, "gpen", GPEN_LICENSE),
    WeightFile("GPEN-BFR-512", "GPEN-BFR-512.pth",
               (f"{_OSS}/GPEN-BFR-512.pth",
                "https://github.com/vinthony/video-retalking/releases/download/v0.0.1/GPEN-BFR-512.pth"),
               "f1002c41add95b0decad69604d80455576f7187dd99ca16bd611bcfd44c10b51", 284085738, "gpen", GPEN_LICENSE),
    WeightFile("GPEN-BFR-1024", "GPEN-BFR-1024.pt", (f"{_MODELSCOPE}/pytorch_model.pt",),
               None, None, "gpen", GPEN_LICENSE),
    WeightFile("GPEN-BFR-2048", "GPEN-BFR-2048.pt", (f"{_MODELSCOPE}/pytorch_model-2048.pt",),
               None, None, "gpen", GPEN_LICENSE),
    WeightFile("retinaface_resnet50", "detection_Resnet50_Final.pth", (f"{_FACEXLIB}/detection_Resnet50_Final.pth",),
               "6d1de9c2944f2ccddca5f5e010ea5ae64a39845a86311af6fdf30841b0a5a16d", 109497761, "detector",
               RETINAFACE_LICENSE),
    WeightFile("retinaface_mobile0.25", "detection_mobilenet0.25_Final.pth",
               (f"{_FACEXLIB}/detection_mobilenet0.25_Final.pth",),
               "2979b33ffafda5d74b6948cd7a5b9a7a62f62b949cef24e95fd15d2883a65220", 1789735, "detector",
               RETINAFACE_LICENSE),
    WeightFile("parsenet", "parsing_parsenet.pth",
               ("https://github.com/xinntao/facexlib/releases/download/v0.2.2/parsing_parsenet.pth",),
               None, None, "parser", "ParseNet weights (facexlib): MIT"),
)}


class WeightsError(GpenStreamError):
    """A model file is missing, cannot be fetched, or is not the file it should be (not
    retryable: an operator has to put the file in place)."""


def home_dir() -> Path:
    if env := os.environ.get("GPEN_STREAM_HOME"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "gpen-stream"


def models_dir() -> Path:
    return home_dir() / "models"


def lookup(name: str) -> WeightFile:
    try:
        return CATALOG[name]
    except KeyError:
        raise WeightsError(f"unknown model '{name}'; known: {', '.join(CATALOG)}") from None


def urls_for(w: WeightFile) -> tuple[str, ...]:
    """Where to fetch ``w``: ``$GPEN_STREAM_MODEL_MIRROR/<filename>`` when a mirror is set
    (air-gapped sites, tests), else the publishers' URLs."""
    if mirror := os.environ.get("GPEN_STREAM_MODEL_MIRROR"):
        return (f"{mirror.rstrip('/')}/{w.filename}",)
    return w.urls


def path_of(w: WeightFile, root: Path | None = None) -> Path:
    return (root or models_dir()) / w.filename


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _read_sidecar(path: Path) -> str | None:
    try:
        meta = json.loads(_sidecar(path).read_text())
        st = path.stat()
        if meta["size"] == st.st_size and meta["mtime_ns"] == st.st_mtime_ns:
            return meta["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _write_sidecar(path: Path, digest: str) -> None:
    st = path.stat()
    _sidecar(path).write_text(json.dumps({"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))


def _recorded_digest(path: Path) -> str | None:
    """The digest recorded at download for files without a published one (ignores mtime)."""
    try:
        return json.loads(_sidecar(path).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _offline_message(w: WeightFile, dest: Path, reason: str) -> str:
    digest = f" (SHA-256 {w.sha256})" if w.sha256 else ""
    return (f"model file {w.filename} is missing and could not be downloaded: {reason}.\n"
            f"  Download it from {urls_for(w)[0]}\n"
            f"  and place it at {dest}{digest},\n"
            f"  or set GPEN_STREAM_HOME to a folder whose models/ holds it. {w.license}.")


def verify(w: WeightFile, root: Path | None = None) -> tuple[Path, str]:
    """Check the cached file; returns (path, status) where status is 'verified' (matches the
    published digest) or 'recorded' (matches the digest recorded at download; none is
    published). Raises WeightsError if it is missing or does not match."""
    dest = path_of(w, root)
    if not dest.is_file():
        raise WeightsError(_offline_message(w, dest, "not in the model cache"))
    expected = w.sha256 or _recorded_digest(dest)
    if w.size is not None and dest.stat().st_size != w.size:
        raise WeightsError(f"{dest} has {dest.stat().st_size} bytes, expected {w.size}: the file is truncated "
                           f"or not {w.filename}. Delete it and run: gpen-stream models download {w.name}")
    cached = _read_sidecar(dest)
    digest = cached or sha256_of(dest)
    if expected is not None and digest != expected:
        raise WeightsError(f"{dest} has SHA-256 {digest}, expected {expected}: the file is corrupt or not "
                           f"{w.filename}. Delete it and run: gpen-stream models download {w.name}")
    if cached is None:
        try:
            _write_sidecar(dest, digest)
        except OSError:  # a read-only shared cache: verify again next time
            pass
    return dest, "verified" if w.sha256 else "recorded"


def download(w: WeightFile, root: Path | None = None, *, progress: bool = True, timeout: float = 30.0) -> Path:
    """Fetch ``w`` into the cache (trying each URL in turn) unless a good copy is there."""
    dest = path_of(w, root)
    if dest.is_file():
        try:
            return verify(w, root)[0]
        except WeightsError:
            pass  # a bad copy: fetch it again and replace it atomically
    dest.parent.mkdir(parents=True, exist_ok=True)
    reasons = []
    for url in urls_for(w):
        try:
            _fetch(url, w, dest, progress=progress, timeout=timeout)
            return dest
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException, WeightsError) as exc:
            reasons.append(f"{url}: {getattr(exc, 'reason', None) or exc}")
    raise WeightsError(_offline_message(w, dest, "; ".join(reasons)))


def _fetch(url: str, w: WeightFile, dest: Path, *, progress: bool, timeout: float) -> None:
    from tqdm import tqdm  # imported here: the rest of this module is used by light tools too

    request = urllib.request.Request(url, headers={"User-Agent": "gpen-stream"})
    target = AtomicFile(dest)
    try:
        with target.open("wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or w.size
            h = hashlib.sha256()
            with tqdm(total=total, unit="B", unit_scale=True, desc=w.filename, disable=not progress,
                      leave=False) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
        size, digest = target.tmp.stat().st_size, h.hexdigest()
        if w.size is not None and size != w.size:
            raise WeightsError(f"got {size} bytes, expected {w.size}")
        if w.sha256 is not None and digest != w.sha256:
            raise WeightsError(f"SHA-256 {digest} does not match the expected {w.sha256}")
        if w.sha256 is None:
            _check_loadable(target.tmp, url)  # nothing to compare with: at least refuse an error page
        target.commit()
        _write_sidecar(dest, digest)
    finally:
        target.abort()


def _check_loadable(path: Path, url: str) -> None:
    from gpen.checkpoint import CheckpointError, read_state_dict

    try:
        read_state_dict(path, mmap=True)
    except CheckpointError:
        head = path.read_bytes()[:40]
        raise WeightsError(f"{url} did not send a PyTorch weights file (it starts with {head!r})") from None


def ensure(name: str, *, allow_download: bool = True, progress: bool = True) -> Path:
    """Path of a verified copy of ``name``, downloading it on first use."""
    w = lookup(name)
    dest = path_of(w)
    if dest.is_file() or not allow_download:
        return verify(w)[0]
    return download(w, progress=progress)


def locate(name: str, override: str | Path | None = None, *, allow_download: bool = True) -> Path:
    """The file to load for ``name``: ``override`` (a user's own checkpoint) if given, else the
    verified cached release, fetched on first use."""
    return Path(override) if override is not None else ensure(name, allow_download=allow_download)
