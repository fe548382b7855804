"""The weight store against a real HTTP server on 127.0.0.1."""

import hashlib
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gpen import weights as store


@pytest.fixture
def http_files():
    """Serve {path: bytes} on a free loopback port; yields (base_url, files, hits)."""
    files: dict[str, bytes] = {}
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", files, hits
    server.shutdown()


def _file(name: str, payload: bytes, urls: tuple[str, ...], pinned: bool = True) -> store.WeightFile:
    digest = hashlib.sha256(payload).hexdigest() if pinned else None
    return store.WeightFile(name, f"{name}.pth", urls, digest, len(payload) if pinned else None, "gpen", "test licence")


@pytest.fixture(autouse=True)
def _no_mirror(monkeypatch):
    monkeypatch.delenv("GPEN_STREAM_MODEL_MIRROR", raising=False)


def test_download_verifies_and_renames_into_place(tmp_path, http_files):
    base, files, _ = http_files
    payload = os.urandom(3 * 1024 * 1024 + 17)
    files["/m.pth"] = payload
    w = _file("m", payload, (f"{base}/m.pth",))
    umask = os.umask(0o022)
    try:
        path = store.download(w, tmp_path, progress=False)
    finally:
        os.umask(umask)
    assert path == tmp_path / "m.pth" and path.read_bytes() == payload
    assert path.stat().st_mode & 0o777 == 0o644  # a shared cache stays readable
    assert store.verify(w, tmp_path) == (path, "verified")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth", "m.pth.sha256"]  # no temp files left


def test_wrong_bytes_are_rejected_and_nothing_is_left_behind(tmp_path, http_files):
    base, files, _ = http_files
    good = b"real weights" * 1000
    files["/m.pth"] = b"tampered....." * 923 + b"x"
    w = _file("m", good, (f"{base}/m.pth",))
    with pytest.raises(store.WeightsError) as err:
        store.download(w, tmp_path, progress=False)
    assert "m.pth" in str(err.value) and f"{base}/m.pth" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_truncated_download_is_rejected(tmp_path, http_files):
    base, files, _ = http_files
    payload = os.urandom(100_000)
    files["/m.pth"] = payload[:50_000]
    with pytest.raises(store.WeightsError, match="50000 bytes, expected 100000"):
        store.download(_file("m", payload, (f"{base}/m.pth",)), tmp_path, progress=False)


def test_offline_error_names_the_file_the_url_and_where_to_put_it(tmp_path):
    w = _file("m", b"x", ("http://127.0.0.1:9/m.pth",))
    with pytest.raises(store.WeightsError) as err:
        store.download(w, tmp_path, progress=False, timeout=5)
    message = str(err.value)
    assert "m.pth" in message and "http://127.0.0.1:9/m.pth" in message and str(tmp_path / "m.pth") in message
    assert "place it at" in message


def test_next_url_is_tried_when_the_first_fails(tmp_path, http_files):
    base, files, hits = http_files
    payload = b"weights" * 100
    files["/mirror/m.pth"] = payload
    w = _file("m", payload, (f"{base}/gone/m.pth", f"{base}/mirror/m.pth"))
    assert store.download(w, tmp_path, progress=False).read_bytes() == payload
    assert hits == ["/gone/m.pth", "/mirror/m.pth"]


def test_a_corrupted_cached_file_fails_verification(tmp_path, http_files):
    base, files, _ = http_files
    payload = b"abc" * 10_000
    files["/m.pth"] = payload
    w = _file("m", payload, (f"{base}/m.pth",))
    path = store.download(w, tmp_path, progress=False)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(store.WeightsError, match="SHA-256 .* expected"):
        store.verify(w, tmp_path)
    # download() replaces a bad copy
    assert store.download(w, tmp_path, progress=False).read_bytes() == payload


def test_an_error_page_is_not_accepted_as_an_unpinned_file(tmp_path, http_files):
    base, files, _ = http_files
    files["/m.pth"] = b"<html><body>rate limited</body></html>"
    with pytest.raises(store.WeightsError, match="did not send a PyTorch weights file"):
        store.download(_file("m", b"", (f"{base}/m.pth",), pinned=False), tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def _torch_file(obj) -> bytes:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_unpinned_files_are_checked_against_the_digest_recorded_at_download(tmp_path, http_files):
    import torch

    base, files, _ = http_files
    payload = _torch_file({"w": torch.arange(10.0)})
    files["/m.pth"] = payload
    w = _file("m", payload, (f"{base}/m.pth",), pinned=False)
    path = store.download(w, tmp_path, progress=False)
    assert store.verify(w, tmp_path) == (path, "recorded")
    path.write_bytes(payload[::-1])
    with pytest.raises(store.WeightsError):
        store.verify(w, tmp_path)


def test_mirror_variable_replaces_the_publishers_urls(monkeypatch, http_files):
    base, _, _ = http_files
    monkeypatch.setenv("GPEN_STREAM_MODEL_MIRROR", f"{base}/models/")
    assert store.urls_for(store.lookup("GPEN-BFR-256")) == (f"{base}/models/GPEN-BFR-256.pth",)


def test_catalog_has_every_release_and_both_detectors():
    assert {"GPEN-BFR-256", "GPEN-BFR-512", "GPEN-BFR-1024", "GPEN-BFR-2048", "retinaface_resnet50",
            "retinaface_mobile0.25"} <= set(store.CATALOG)
    assert store.CATALOG["retinaface_resnet50"].filename == "detection_Resnet50_Final.pth"
    assert all(w.sha256 is None or len(w.sha256) == 64 for w in store.CATALOG.values())


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "streamer", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_models_list_shows_files_status_and_the_licence():
    result = _cli("models", "list")
    assert result.returncode == 0
    assert "GPEN-BFR-2048" in result.stdout and "detection_mobilenet0.25_Final.pth" in result.stdout
    assert "non-commercial" in result.stdout and "missing" in result.stdout


def test_models_path_prints_where_the_file_belongs():
    result = _cli("models", "path", "GPEN-BFR-512")
    assert result.returncode == 0
    assert Path(result.stdout.strip()) == store.models_dir() / "GPEN-BFR-512.pth"


def test_models_download_offline_fails_with_a_message_not_a_traceback():
    result = _cli("models", "download", "GPEN-BFR-256", env={"GPEN_STREAM_MODEL_MIRROR": "http://127.0.0.1:9"})
    assert result.returncode == 1
    assert "GPEN-BFR-256.pth" in result.stderr and "place it at" in result.stderr
    assert "Traceback" not in result.stderr


def test_models_verify_reports_a_wrong_file_without_a_traceback(tmp_path):
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / "GPEN-BFR-256.pth").write_bytes(b"not the weights")
    result = _cli("models", "verify", "GPEN-BFR-256", env={"GPEN_STREAM_HOME": str(home)})
    assert result.returncode == 1
    assert "truncated or not GPEN-BFR-256.pth" in result.stderr and "Traceback" not in result.stderr


def test_unknown_model_names_are_usage_errors():
    result = _cli("models", "path", "GPEN-BFR-999")
    assert result.returncode == 2 and "unknown model" in result.stderr
