"""docker-compose.yaml: valid for a real compose tool, and shaped the way the README says.

No Docker engine runs here, so the file is validated with Debian's ``docker-compose``
(``config -q`` parses, interpolates and schema-checks without an engine; ``make tools``
installs it), then the resolved configuration it prints is checked structurally.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
MAKE_ENV = ROOT / "scripts" / "make_env.sh"
SECRETS = ("POSTGRES_PASSWORD", "AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET")
AIRFLOW_SERVICES = ("api-server", "scheduler", "dag-processor", "triggerer")
ALL_SERVICES = {"postgres", "airflow-init", "gcs", "localcloud", *AIRFLOW_SERVICES}


def _compose() -> str:
    exe = shutil.which("docker-compose")
    if not exe:
        pytest.fail("docker-compose is not installed: run `make tools` or `apt-get install docker-compose` "
                    "(no Docker engine is needed; `docker-compose config -q` validates the file offline)")
    return exe


def _run_compose(*args: str, compose_file: Path = COMPOSE_FILE, env_file: Path | None = None) -> subprocess.CompletedProcess:
    # A clean environment: values must come from the file's defaults or the env file given, not from
    # whatever POSTGRES_* / AIRFLOW_* the developer's shell holds or a developer's own .env.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW", "POSTGRES", "DUAL_DEPLOY", "COMPOSE_", "DOCKER_"))}
    with tempfile.NamedTemporaryFile("w", suffix=".env") as empty:  # no .env at all
        return subprocess.run([_compose(), "-f", str(compose_file), "--env-file", str(env_file or empty.name), *args],
                              cwd=compose_file.parent, env=env, capture_output=True, text=True, timeout=120)


def _make_env(path: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(MAKE_ENV), str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc


def _read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


@pytest.fixture(scope="module")
def generated_env(tmp_path_factory) -> Path:
    """A .env written by scripts/make_env.sh, as `make env` writes it."""
    path = tmp_path_factory.mktemp("compose") / ".env"
    _make_env(path)
    return path


@pytest.fixture(scope="module")
def resolved(generated_env) -> dict:
    """The configuration as compose resolves it (anchors merged, variables interpolated)."""
    proc = _run_compose("config", env_file=generated_env)
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stdout}\n{proc.stderr}"
    return yaml.safe_load(proc.stdout)


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _mounts(service: dict) -> dict[str, str]:
    """container path -> host path (or volume name)."""
    out = {}
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            out[v["target"]] = str(v.get("source"))
        else:
            parts = v.split(":")
            out[parts[1]] = parts[0]
    return out


def _published(service: dict) -> set[int]:
    ports = set()
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            ports.add(int(p["published"]))
        else:
            ports.add(int(str(p).rsplit(":", 1)[0].rsplit(":", 1)[-1].split("/")[0]))
    return ports


def _command(service: dict) -> str:
    cmd = service.get("command") or ""
    return " ".join(cmd) if isinstance(cmd, list) else str(cmd)


# ---------------------------------------------------------------- validation by the compose tool


def test_compose_file_is_valid(generated_env):
    proc = _run_compose("config", "-q", env_file=generated_env)
    assert proc.returncode == 0, f"docker-compose config -q rejected {COMPOSE_FILE.name}:\n{proc.stderr}"


@pytest.mark.parametrize("env_file", ["none", "example"])
def test_compose_refuses_to_start_without_generated_secrets(env_file):
    """No default JWT secret, no empty Fernet key: without .env (or with the template copied as is)
    compose stops and says how to make the secrets."""
    proc = _run_compose("config", "-q", env_file=None if env_file == "none" else ENV_EXAMPLE)
    assert proc.returncode != 0
    assert "scripts/make_env.sh" in proc.stderr and any(key in proc.stderr for key in SECRETS), proc.stderr


def test_make_env_generates_the_secrets_once_and_keeps_what_is_set(tmp_path):
    from cryptography.fernet import Fernet

    env_file = tmp_path / ".env"
    first = _make_env(env_file)
    assert "generated POSTGRES_PASSWORD AIRFLOW__CORE__FERNET_KEY AIRFLOW__API_AUTH__JWT_SECRET" in first.stdout
    values = _read_env(env_file)
    assert set(_env_example()) <= set(values)
    Fernet(values["AIRFLOW__CORE__FERNET_KEY"].encode())  # a valid key
    assert len(values["AIRFLOW__API_AUTH__JWT_SECRET"]) >= 32 and len(values["POSTGRES_PASSWORD"]) >= 32
    assert re.fullmatch(r"[A-Za-z0-9_-]+", values["POSTGRES_PASSWORD"])  # safe inside the database URL
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"

    assert "nothing changed" in _make_env(env_file).stdout and _read_env(env_file) == values
    # A value the user set is kept; an empty or change-me one is generated; another file gets other secrets.
    text = env_file.read_text()
    text = text.replace(f"POSTGRES_PASSWORD={values['POSTGRES_PASSWORD']}", "POSTGRES_PASSWORD=mine")
    text = text.replace(f"AIRFLOW__API_AUTH__JWT_SECRET={values['AIRFLOW__API_AUTH__JWT_SECRET']}",
                        "AIRFLOW__API_AUTH__JWT_SECRET=change-me-to-a-long-random-string")
    env_file.write_text(text.replace(f"AIRFLOW__CORE__FERNET_KEY={values['AIRFLOW__CORE__FERNET_KEY']}\n", ""))
    assert "generated AIRFLOW__CORE__FERNET_KEY AIRFLOW__API_AUTH__JWT_SECRET" in _make_env(env_file).stdout
    again = _read_env(env_file)
    assert again["POSTGRES_PASSWORD"] == "mine"
    assert again["AIRFLOW__API_AUTH__JWT_SECRET"] not in ("", values["AIRFLOW__API_AUTH__JWT_SECRET"])
    assert not again["AIRFLOW__API_AUTH__JWT_SECRET"].startswith("change-me")
    Fernet(again["AIRFLOW__CORE__FERNET_KEY"].encode())
    other = tmp_path / "other.env"
    _make_env(other)
    assert _read_env(other)["AIRFLOW__CORE__FERNET_KEY"] != values["AIRFLOW__CORE__FERNET_KEY"]


def test_secrets_reach_every_component(resolved, generated_env):
    values = _read_env(generated_env)
    for name in ("airflow-init", *AIRFLOW_SERVICES):
        env = _env(resolved["services"][name])
        assert env["AIRFLOW__CORE__FERNET_KEY"] == values["AIRFLOW__CORE__FERNET_KEY"], name
        assert env["AIRFLOW__API_AUTH__JWT_SECRET"] == values["AIRFLOW__API_AUTH__JWT_SECRET"], name
        assert f":{values['POSTGRES_PASSWORD']}@postgres/" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"], name
    assert _env(resolved["services"]["postgres"])["POSTGRES_PASSWORD"] == values["POSTGRES_PASSWORD"]


def test_every_published_port_is_bound_to_localhost(resolved):
    """The GCS emulator and the local Vertex AI server have no authentication: never on all interfaces."""
    published = []
    for name, service in resolved["services"].items():
        for p in service.get("ports") or []:
            host_ip = p.get("host_ip") if isinstance(p, dict) else (str(p).split(":")[0] if str(p).count(":") == 2 else "")
            published.append((name, str(p)))
            assert host_ip == "127.0.0.1", f"{name} publishes {p} on all interfaces"
    assert {n for n, _ in published} >= {"gcs", "localcloud", "api-server"}, published


def test_the_validator_rejects_a_broken_file(tmp_path, generated_env):
    """The check above is not vacuous: the same tool rejects a dependency on an undefined service."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    raw["services"]["triggerer"]["depends_on"] = {"no-such-service": {"condition": "service_started"}}
    broken = tmp_path / "docker-compose.yaml"
    broken.write_text(yaml.safe_dump(raw))
    proc = _run_compose("config", "-q", compose_file=broken, env_file=generated_env)
    assert proc.returncode != 0 and "no-such-service" in proc.stderr, proc.stderr


# ---------------------------------------------------------------- structure


def test_services(resolved):
    assert ALL_SERVICES <= set(resolved["services"]), sorted(resolved["services"])


def test_airflow_services_run_their_component(resolved):
    services = resolved["services"]
    for name in AIRFLOW_SERVICES:
        assert name in _command(services[name]).split(), (name, _command(services[name]))
    assert "airflow db migrate" in _command(services["airflow-init"])


def test_local_executor_on_postgres_with_shared_settings(resolved):
    services = resolved["services"]
    envs = {name: _env(services[name]) for name in ("airflow-init", *AIRFLOW_SERVICES)}
    for name, env in envs.items():
        assert env.get("AIRFLOW__CORE__EXECUTOR") == "LocalExecutor", name
        conn = env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "")
        assert conn.startswith("postgresql") and "@postgres" in conn, (name, conn)
        assert env.get("STORAGE_EMULATOR_HOST", "").startswith("http://gcs:"), name
        assert env.get("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT"), name
    # Every component must agree on what signs task tokens and where the Execution API is.
    for key in ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CORE__FERNET_KEY"):
        assert len({env.get(key) for env in envs.values()}) == 1, key
    exec_url = envs["scheduler"]["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"]
    m = re.fullmatch(r"http://api-server:(\d+)/execution/?", exec_url)
    assert m, exec_url
    api_cmd = _command(services["api-server"])
    api_port = re.search(r"(?:--port|-p)[ =](\d+)", api_cmd)
    assert int(m.group(1)) == (int(api_port.group(1)) if api_port else 8080), (exec_url, api_cmd)


def test_project_folders_are_mounted(resolved):
    for name in ("airflow-init", *AIRFLOW_SERVICES):
        mounts = _mounts(resolved["services"][name])
        for folder in ("dags", "plugins", "include"):
            target = f"/opt/airflow/{folder}"
            assert target in mounts, (name, folder, mounts)
            assert Path(mounts[target]).resolve() == (ROOT / folder).resolve(), (name, mounts[target])


def test_the_local_vertex_ai_server_is_a_service_the_airflow_services_reach(resolved):
    services = resolved["services"]
    local = services["localcloud"]
    cmd = " ".join(local["entrypoint"])
    assert "-m localcloud" in cmd and "--storage-emulator-host http://gcs:9023" in cmd, cmd
    grpc = int(re.search(r"--grpc-port (\d+)", cmd).group(1))
    rest = int(re.search(r"--http-port (\d+)", cmd).group(1))
    assert _published(local) == {rest}, local.get("ports")  # REST for users; gRPC stays inside
    assert 9023 in _published(services["gcs"])
    for name in ("airflow-init", *AIRFLOW_SERVICES):
        env = _env(services[name])
        # The same switch make run uses: the provider's Vertex AI clients go to the local server.
        assert env.get("VERTEX_AI_EMULATOR_HOST") == f"localcloud:{grpc}", name
        assert env.get("FIREBASE_REMOTE_CONFIG_EMULATOR_HOST") == f"localcloud:{rest}", name
        assert "localcloud" in (services[name].get("depends_on") or {}), name
    mounts = _mounts(local)
    assert Path(mounts["/opt/airflow/emulators"]).resolve() == (ROOT / "emulators").resolve()


def test_airflow_services_wait_for_init_and_the_database(resolved):
    services = resolved["services"]
    for name in AIRFLOW_SERVICES:
        deps = services[name].get("depends_on") or {}
        assert isinstance(deps, dict), (name, deps)
        assert deps.get("airflow-init", {}).get("condition") == "service_completed_successfully", (name, deps)
        assert deps.get("postgres", {}).get("condition") == "service_healthy", (name, deps)
    init_deps = services["airflow-init"].get("depends_on") or {}
    assert init_deps.get("postgres", {}).get("condition") == "service_healthy", init_deps
    assert services["postgres"].get("healthcheck"), "service_healthy needs a healthcheck on postgres"
    assert str(services["airflow-init"].get("restart", "no")) == "no"


# ---------------------------------------------------------------- .env.example

_SECRET_KEY = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|FERNET|API_KEY|CREDENTIAL|PRIVATE)", re.I)
_PLACEHOLDER = re.compile(r"^$|change-?me|example|placeholder|your[-_]|<.*>", re.I)
_SECRET_VALUE_PATTERNS = {
    "Fernet key": re.compile(r"^[A-Za-z0-9_-]{43}=$"),
    "Google API key": re.compile(r"AIza[0-9A-Za-z_-]{35}"),
    "OAuth access token": re.compile(r"ya29\.[0-9A-Za-z_-]+"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----|\"private_key\""),
    "AWS access key": re.compile(r"AKIA[0-9A-Z]{16}"),
}


def _env_example() -> dict[str, str]:
    assert ENV_EXAMPLE.exists(), ".env.example is missing: docker-compose.yaml tells users to copy it to .env"
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f".env.example: not KEY=VALUE: {line!r}"
        out[key.strip()] = value.strip().strip("'\"")
    return out


def test_env_example_holds_no_real_secret():
    values = _env_example()
    for key, value in values.items():
        for what, pattern in _SECRET_VALUE_PATTERNS.items():
            assert not pattern.search(value), f".env.example {key} looks like a real {what}"
        if _SECRET_KEY.search(key):
            assert _PLACEHOLDER.search(value), f".env.example {key} must be empty or a placeholder, got {value!r}"


def test_env_example_covers_the_variables_compose_reads():
    """Every ${VAR} the compose file interpolates without a default is in .env.example."""
    text = COMPOSE_FILE.read_text()
    required = {m.group(1) for m in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?\?[^}]*)?\}", text)}
    referenced = {m.group(1) for m in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?][^}]*)?\}", text)}
    values = _env_example()
    assert required <= set(values), f"set in .env.example: {sorted(required - set(values))}"
    unknown = set(values) - referenced
    assert not unknown, f".env.example sets variables docker-compose.yaml never reads: {sorted(unknown)}"
