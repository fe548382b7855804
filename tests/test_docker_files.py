"""docker/: the images, the compose file and their docs, checked against what they run (commands
and flags, settings and environment variables, ports, routes, paths, pins, file names) without a
Docker daemon. With a compose client on PATH (`docker compose` or `docker-compose`) the compose
file is also validated by it, and with `hadolint` on PATH the Dockerfiles are linted."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
DOCKERFILES = {"worker": DOCKER / "worker.Dockerfile", "app": DOCKER / "app.Dockerfile"}
PACKAGES = ("configs", "gpen", "streamer", "workers")
PASSWORD = "0123456789abcdef"  # stands in for the REDIS_PASSWORD .env.example leaves empty


# ---------------------------------------------------------------------- reading the files


def instructions(path: Path) -> list[tuple[str, str]]:
    """A Dockerfile's (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        keyword, _, args = (current + stripped).partition(" ")
        out.append((keyword.upper(), args.strip()))
        current = ""
    assert not current, f"{path.name}: ends inside a continuation line"
    return out


def args_of(path: Path, keyword: str) -> list[str]:
    return [args for kw, args in instructions(path) if kw == keyword]


def build_args(path: Path) -> dict[str, str]:
    """ARG defaults; an ARG declared in several stages must have one default."""
    found: dict[str, str] = {}
    for args in args_of(path, "ARG"):
        name, sep, value = args.partition("=")
        if sep:
            assert found.setdefault(name, value) == value, f"{path.name}: ARG {name} has two defaults"
    return found


def env_of(path: Path) -> dict[str, str]:
    env = {}
    for args in args_of(path, "ENV"):
        for item in shlex.split(args):
            name, sep, value = item.partition("=")
            assert sep, f"{path.name}: write ENV as NAME=value ({item!r})"
            env[name] = value
    return env


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", name), f".env.example: not NAME=value: {line!r}"
            values[name] = value
    return values


_VAR = re.compile(r"\$(?:\$|\{(\w+)(?:(:[-?])([^}]*))?\})")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation, for what compose.yaml uses: ${X}, ${X:-default},
    ${X:?message} (an error when X is unset or empty) and $$."""

    def sub(m: re.Match) -> str:
        name, op, arg = m.groups()
        if name is None:
            return "$"
        value = env.get(name, "")
        if op == ":?" and not value:
            raise LookupError(f"{name}: {arg}")
        return value or (arg if op == ":-" else "")

    return _VAR.sub(sub, text)


def compose_env() -> dict[str, str]:
    return {**env_example(), "REDIS_PASSWORD": PASSWORD}


def compose() -> dict:
    return yaml.safe_load(interpolate(COMPOSE.read_text(), compose_env()))


def our_services() -> dict[str, dict]:
    """The services built from this repository, by the Dockerfile they are built from."""
    return {name: s for name, s in compose()["services"].items() if "build" in s}


def image_of(service: dict) -> str:
    return Path(service["build"]["dockerfile"]).name.removesuffix(".Dockerfile")


def volumes(service: dict) -> dict[str, tuple[str, str]]:
    """target -> (source, mode)"""
    out = {}
    for spec in service.get("volumes", []):
        source, target, *mode = spec.split(":")
        out[target] = (source, mode[0] if mode else "rw")
    return out


def parse_command(argv: list[str]):
    from streamer.cli import build_parser

    return build_parser().parse_args(argv)


# .dockerignore, as Docker reads it: the last pattern matching a path or one of its parents wins


def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignored(path: str) -> bool:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            rules.append((negated, _pattern_regex(line.lstrip("!").strip("/"))))
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for negated, regex in rules:
        if any(regex.match(c) for c in candidates):
            excluded = not negated
    return excluded


# ---------------------------------------------------------------------- compose.yaml


def test_compose_has_the_services_and_builds_from_this_repository():
    services = compose()["services"]
    assert {"redis", "worker", "serve"} <= set(services)
    assert services["redis"]["image"].startswith("redis:7")
    ours = our_services()
    assert {image_of(s) for s in ours.values()} == set(DOCKERFILES)
    for name, service in ours.items():
        assert (DOCKER / service["build"]["context"]).resolve() == ROOT, name
        assert (ROOT / service["build"]["dockerfile"]).is_file(), name
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_every_compose_variable_is_in_env_example_with_its_default():
    text = COMPOSE.read_text()
    assert not re.search(r"(?<!\$)\$(?![{$])", text), "write variables as ${NAME}"
    used = {m.group(1) for m in _VAR.finditer(text) if m.group(1)}
    example = env_example()
    assert used - set(example) == set(), "used in compose.yaml, missing from .env.example"
    assert {n for n in example if not n.startswith("COMPOSE_")} - used == set(), "in .env.example, unused"
    for m in _VAR.finditer(text):
        name, op, default = m.groups()
        if op == ":-":
            assert example[name] == default, f"{name}: .env.example says {example[name]!r}, compose.yaml {default!r}"
    assert example["REDIS_PASSWORD"] == "", "no usable password in an example file"
    with pytest.raises(LookupError, match="REDIS_PASSWORD"):
        interpolate(text, example)  # a .env copied unchanged stops compose with a message


def test_redis_has_a_password_an_append_only_file_and_a_health_check():
    services = compose()["services"]
    redis = services["redis"]
    command = redis["command"]
    assert command[command.index("--requirepass") + 1] == PASSWORD
    assert command[command.index("--appendonly") + 1] == "yes"
    assert "/data" in volumes(redis)
    test = " ".join(redis["healthcheck"]["test"])
    assert "redis-cli" in test and "ping" in test
    assert redis["environment"]["REDISCLI_AUTH"] == PASSWORD  # what redis-cli authenticates with
    for port in redis.get("ports", []):
        assert str(port).startswith("127.0.0.1:"), "Redis is published on this host only"
    # the Redis URLs our services get reach that Redis, with that password
    urls = [v for s in our_services().values() for k, v in s.get("environment", {}).items() if k.endswith("_REDIS")]
    assert len(urls) == 2
    for url in urls:
        parts = urlsplit(url)
        assert (parts.scheme, parts.hostname, parts.port, parts.password) == ("redis", "redis", 6379, PASSWORD)


def test_service_commands_are_valid_gpen_stream_commands():
    from gpen.weights import CATALOG
    from workers.security import is_local

    by_image = {image_of(s): s for s in our_services().values()}
    worker, serve = by_image["worker"], by_image["app"]
    w, s = parse_command(worker["command"]), parse_command(serve["command"])
    assert (w.command, s.command) == ("worker", "serve")

    # the worker: a model that exists, on the GPU the service reserves, reachable and secured
    assert w.model and all(m in CATALOG for m in w.model)
    assert w.device == "cuda:0"  # the one GPU the reservation makes visible
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]
    assert not is_local(w.endpoint), "decoders in other containers must reach the worker"
    assert w.keys is not None or w.insecure, "a non-loopback worker refuses to start without keys or --insecure"
    assert w.prefix == compose_env()["GPEN_PREFIX"]

    # serve: the registered workers, their keys, the default model they serve, mounted folders
    assert s.farm
    assert s.model in w.model, "jobs that name no model would wait for a worker that never comes"
    assert (s.keys is None) == (w.keys is None), "both sides use keys, or neither"
    mounts = {"worker": volumes(worker), "serve": volumes(serve)}
    for side, keys in (("worker", w.keys), ("serve", s.keys)):
        if keys is not None:
            assert str(keys) in mounts[side] and mounts[side][str(keys)][1] == "ro", side
    for root in s.input_root:
        assert str(root) in mounts["serve"]
    for root in s.output_root:
        assert mounts["serve"][str(root)][1] == "rw", "outputs are written there"
    assert s.http_port is None, "serve.http_port stays the default, the port the image exposes"


def test_the_image_commands_are_valid_gpen_stream_commands():
    for name, path in DOCKERFILES.items():
        [cmd] = args_of(path, "CMD")
        args = parse_command(json.loads(cmd))
        assert args.command == {"worker": "worker", "app": "serve"}[name]


def test_environment_variables_name_real_settings_and_validate(monkeypatch):
    """pydantic-settings ignores a GPEN_STREAM_* variable that names no setting: a typo would
    be silently ignored, so every name written in docker/ must be a setting or read by the code."""
    from configs import EngineSettings, JobOptions, LiveSettings, ServeSettings, WorkerSettings, load_settings

    kinds = (JobOptions, EngineSettings, WorkerSettings, ServeSettings, LiveSettings)
    known = {kind.model_config["env_prefix"] + field.upper() for kind in kinds for field in kind.model_fields}
    for package in PACKAGES:
        for source in (ROOT / package).rglob("*.py"):
            known |= set(re.findall(r"environ(?:\.get\(|\[)\"(GPEN_STREAM_\w+)\"", source.read_text()))
    assert {"GPEN_STREAM_HOME", "GPEN_STREAM_MODEL_MIRROR"} <= known
    for path in (COMPOSE, ENV_EXAMPLE, DOCKER / "README.md", *DOCKERFILES.values()):
        for name in set(re.findall(r"GPEN_STREAM_[A-Z0-9_]*", path.read_text())):
            if not name.endswith("_"):  # GPEN_STREAM_SERVE_<KEY> and the like
                assert name in known, f"{path.name}: {name} is no setting and nothing reads it"

    # and the values validate, as each container gets them (image ENV, then compose's environment)
    for service in our_services().values():
        for name in [n for n in os.environ if n.startswith("GPEN_STREAM_")]:
            monkeypatch.delenv(name)
        image_env = env_of(DOCKERFILES[image_of(service)])
        for name, value in {**image_env, **service.get("environment", {})}.items():
            monkeypatch.setenv(name, str(value))
        if image_of(service) == "worker":
            load_settings(WorkerSettings)
        else:
            serve = load_settings(ServeSettings)
            assert serve.http_host == "0.0.0.0", "a published port needs serve to listen beyond loopback"


# ---------------------------------------------------------------------- the Dockerfiles


def test_copied_sources_exist_and_reach_the_build_context():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    includes = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.name for p in ROOT.iterdir()
                if (p / "__init__.py").is_file() and any(fnmatch.fnmatch(p.name, i) for i in includes)}
    assert packages == set(PACKAGES)
    for name, path in DOCKERFILES.items():
        copied = []
        for args in args_of(path, "COPY"):
            words = args.split()
            if any(w.startswith("--from") for w in words):
                continue
            copied += [w for w in words[:-1] if not w.startswith("--")]
        assert set(copied) >= {"pyproject.toml", project["project"]["readme"], *PACKAGES}, name
        for source in copied:
            assert (ROOT / source).exists(), f"{name}: COPY {source}: no such path"
            files = [ROOT / source] if (ROOT / source).is_file() else [
                f for f in (ROOT / source).rglob("*") if f.is_file() and "__pycache__" not in f.parts]
            for f in files:
                assert not dockerignored(f.relative_to(ROOT).as_posix()), f"{name}: .dockerignore drops {f}"
    for data in project["tool"]["setuptools"]["package-data"]["configs"]:
        assert list((ROOT / "configs").glob(data)), data  # e.g. configs/defaults.yaml, read at run time


def test_dockerignore_keeps_bulk_and_secrets_out():
    for path in (".venv/bin/python", ".git/HEAD", "tests/test_cli.py", "bench/RESULTS.md", "clip.mp4",
                 "streamer/__pycache__/cli.cpython-311.pyc", "streamer/sample.mkv", "gpen_stream.egg-info/PKG-INFO",
                 "docker/.env", "docker/keys/worker.key_secret", "docker/media/in/a.mp4", ".pytest_cache/v"):
        assert dockerignored(path), path
    for path in ("pyproject.toml", "README.md", "configs/defaults.yaml", "streamer/serve/http.py"):
        assert not dockerignored(path), path


def test_entrypoint_is_the_console_script():
    import streamer.cli

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name, path in DOCKERFILES.items():
        [entrypoint] = args_of(path, "ENTRYPOINT")
        [script] = json.loads(entrypoint)
        assert scripts.get(script) == "streamer.cli:run", name
    assert callable(streamer.cli.run)


def test_app_exposes_the_serve_port_and_checks_the_health_route():
    from configs.settings import DEFAULTS_FILE

    port = yaml.safe_load(DEFAULTS_FILE.read_text())["serve"]["http_port"]
    app = DOCKERFILES["app"]
    assert str(port) in " ".join(args_of(app, "EXPOSE")).split()
    [serve] = [s for s in our_services().values() if image_of(s) == "app"]
    assert [str(p).rsplit(":", 1)[1] for p in serve["ports"]] == [str(port)], "publish the port serve listens on"

    routes = re.findall(r'path == "(/[^"]*)"', (ROOT / "streamer/serve/http.py").read_text())
    assert "/healthz" in routes
    [healthcheck] = args_of(app, "HEALTHCHECK")
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3:])
    assert command[:2] == ["python", "-c"], "slim images have no curl"
    code = command[2]
    url = re.search(r"http://127\.0\.0\.1:[^/]*(/\w+)", code)
    assert url and url.group(1) in routes and url.group(1) != "/metrics"
    assert re.search(rf"GPEN_STREAM_SERVE_HTTP_PORT', '{port}'", code), "the default port is serve.http_port's"


def test_worker_exposes_the_port_it_binds():
    [worker] = [s for s in our_services().values() if image_of(s) == "worker"]
    endpoint = parse_command(worker["command"]).endpoint
    assert args_of(DOCKERFILES["worker"], "EXPOSE") == [str(urlsplit(endpoint.replace("tcp", "http", 1)).port)]
    [cmd] = args_of(DOCKERFILES["worker"], "CMD")
    assert parse_command(json.loads(cmd)).endpoint == endpoint


def test_torch_pins_match_ci():
    pins = dict(re.findall(r"\b(torch|torchvision)==([\w.+]+)", (ROOT / ".ci/run").read_text()))
    assert set(pins) == {"torch", "torchvision"}
    for name, path in DOCKERFILES.items():
        args = build_args(path)
        assert (args["TORCH_VERSION"], args["TORCHVISION_VERSION"]) == (pins["torch"], pins["torchvision"]), name
        text = path.read_text()
        assert "torch==${TORCH_VERSION}" in text and "torchvision==${TORCHVISION_VERSION}" in text, name
    assert build_args(DOCKERFILES["worker"])["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/cu")
    assert build_args(DOCKERFILES["app"])["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"


def test_images_run_unprivileged_with_the_weight_store_in_the_volume(monkeypatch):
    from gpen import weights

    targets = set()
    for name, path in DOCKERFILES.items():
        home = env_of(path)["GPEN_STREAM_HOME"]
        assert json.loads(args_of(path, "VOLUME")[-1]) == [home], name
        [user] = args_of(path, "USER")
        assert user == "${UID}:${GID}" and build_args(path)["UID"] != "0", name
        monkeypatch.setenv("GPEN_STREAM_HOME", home)
        assert weights.models_dir() == Path(home) / "models"
        targets.add(home)
    for name, service in our_services().items():
        assert volumes(service).keys() & targets, f"{name}: the weights volume is not mounted"


# ---------------------------------------------------------------------- docs


def test_docs_name_the_weight_files_and_the_compose_commands():
    from configs.settings import DEFAULTS_FILE
    from gpen.weights import CATALOG

    docs = (DOCKER / "README.md").read_text()
    for w in CATALOG.values():
        assert f"`{w.filename}`" in docs, w.filename
    defaults = yaml.safe_load(DEFAULTS_FILE.read_text())["restore"]
    assert defaults["model"] in docs and defaults["detector"] in docs
    assert "docker compose -f docker/compose.yaml build" in docs
    readme = (ROOT / "README.md").read_text()
    assert "DOCKER_SECTION" not in readme
    section = readme.split("\n## Docker\n", 1)[1].split("\n## ", 1)[0]
    assert "docker/README.md" in section and "docker compose -f docker/compose.yaml" in section


# ---------------------------------------------------------------------- external tools, when present


def _compose_client() -> list[str] | None:
    if shutil.which("docker"):
        try:
            if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60).returncode == 0:
                return ["docker", "compose"]
        except subprocess.TimeoutExpired:
            pass
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_compose_client_accepts_the_file(tmp_path):
    client = _compose_client()
    if client is None:
        pytest.skip("no compose client on PATH (docker compose, docker-compose): the checks above still ran")
    env = {k: v for k, v in os.environ.items() if k not in env_example() and not k.startswith("COMPOSE_")}

    def config(values: dict[str, str]) -> subprocess.CompletedProcess:
        env_file = tmp_path / "env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        return subprocess.run([*client, "--env-file", str(env_file), "-f", str(COMPOSE), "config", "-q"],
                              capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)

    done = config(compose_env())
    assert done.returncode == 0, done.stderr
    refused = config(env_example())  # REDIS_PASSWORD left empty
    assert refused.returncode != 0 and "REDIS_PASSWORD" in refused.stderr


def test_hadolint_accepts_the_dockerfiles():
    if not shutil.which("hadolint"):
        pytest.skip("hadolint is not on PATH")
    for path in DOCKERFILES.values():
        done = subprocess.run(["hadolint", str(path)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
