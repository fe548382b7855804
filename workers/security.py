"""Who may talk to a worker: ZeroMQ CURVE (encryption and authentication by key pairs).

``gpen-stream keys DIR`` writes two key pairs in ZeroMQ's certificate format:

    DIR/worker.key, DIR/worker.key_secret     the workers' pair (servers)
    DIR/decoder.key, DIR/decoder.key_secret   the decoders' pair (clients)

A worker given ``worker.keys_dir`` serves CURVE with the worker pair and accepts only clients
whose public key is in that folder (ZeroMQ's ZAP handler checks it); a decoder given
``engine.keys_dir`` connects with the decoder pair and the worker's public key. Copy the
folder to every machine of the farm (decoders do not need worker.key_secret, workers do not
need decoder.key_secret). Without keys, a worker binds only loopback, ``ipc://`` and
``inproc://`` endpoints, unless told ``--insecure``.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from configs.errors import InputError

WORKER, DECODER = "worker", "decoder"


class KeysError(InputError):
    """Missing or unreadable key files, or a refusal to serve an open network without keys."""


def write_keys(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in (WORKER, DECODER):
        public, secret = zmq.auth.create_certificates(str(folder), name)
        Path(secret).chmod(0o600)
        written += [Path(public), Path(secret)]
    return written


def _load(folder: Path, name: str, *, secret: bool) -> tuple[bytes, bytes | None]:
    path = folder / (f"{name}.key_secret" if secret else f"{name}.key")
    try:
        return zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeysError(f"cannot read the {name} key {path}: {exc}; write keys with: gpen-stream keys {folder}") from None


class ServerKeys:
    """A worker's side: CURVE server on its socket, a ZAP handler admitting known decoders."""

    def __init__(self, folder: str | Path, context: zmq.Context):
        self.folder = Path(folder)
        self.public, self.secret = _load(self.folder, WORKER, secret=True)
        _load(self.folder, DECODER, secret=False)  # fail early if no decoder may connect
        self.auth = ThreadAuthenticator(context)
        self.auth.start()
        self.auth.configure_curve(domain="*", location=str(self.folder))

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def stop(self) -> None:
        self.auth.stop()


class ClientKeys:
    """A decoder's side: the decoder pair, and the workers' public key."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.public, self.secret = _load(self.folder, DECODER, secret=True)
        self.server, _ = _load(self.folder, WORKER, secret=False)

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server


def is_local(endpoint: str) -> bool:
    """True for endpoints no other machine can reach: inproc, ipc, tcp on a loopback address."""
    scheme = endpoint.split("://", 1)[0]
    if scheme in ("inproc", "ipc"):
        return True
    host = urlsplit(endpoint.replace("tcp://", "http://", 1)).hostname or ""
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def advertised(endpoint: str) -> str:
    """What other machines should connect to for a bound endpoint: the wildcard address
    replaced by this host's name."""
    for wildcard in ("0.0.0.0", "*", "[::]"):
        if f"//{wildcard}:" in endpoint:
            return endpoint.replace(f"//{wildcard}:", f"//{socket.getfqdn()}:")
    return endpoint
