"""The shipped commands as a user runs them: the worker, `render-video dev` and `demo`."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import av
import httpx
from legacy_stores import make_first_release_store
from temporalio.testing import WorkflowEnvironment

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stack_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPLICATE_")}
    env.update(
        DATA_DIR=str(tmp_path / "DATA"),
        API_PORT=str(free_port()),
        LOCAL_RENDER_PORT=str(free_port()),
        TEMPORAL_ADDRESS=f"127.0.0.1:{free_port()}",
        TEMPORAL_UI_PORT=str(free_port()),
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_worker_stops_cleanly_on_sigterm(temporal_env: WorkflowEnvironment, tmp_path: Path) -> None:
    env = dict(os.environ, TEMPORAL_ADDRESS=temporal_env.client.service_client.config.target_host)
    env["DATA_DIR"] = str(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker"],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    for line in proc.stderr:
        if "worker running" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert "worker stopped" in proc.stderr.read()


def test_demo_renders_the_sample_storyboard(tmp_path: Path) -> None:
    env = stack_env(tmp_path)
    result = subprocess.run(
        [str(BIN / "render-video"), "demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    path = Path(re.search(r"^Video: (.+)$", result.stdout, re.M).group(1))
    cost = re.search(r"^Cost: \$(\d+\.\d\d)$", result.stdout, re.M).group(1)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert (stream.codec_context.width, stream.codec_context.height) == (1280, 720)
        assert abs(container.duration / 1_000_000 - 10.0) <= 0.1
    # 5 images x $0.003 + 10 s x $0.10 = $1.015 -> $1.02, the seed's own example.
    assert cost == "1.02"
    # The stack the demo started is gone again.
    assert not port_open(int(env["API_PORT"]))
    assert not port_open(int(env["TEMPORAL_ADDRESS"].rsplit(":", 1)[1]))


def test_dev_runs_the_stack_and_stops_every_child_on_sigterm(tmp_path: Path) -> None:
    env = stack_env(tmp_path)
    # An old DATA dir: the first release's job store, with its jobs. `dev` migrates it itself.
    (tmp_path / "DATA").mkdir()
    make_first_release_store(f"sqlite:///{tmp_path / 'DATA' / 'jobs.db'}")
    ports = [
        int(env["API_PORT"]),
        int(env["LOCAL_RENDER_PORT"]),
        int(env["TEMPORAL_ADDRESS"].rsplit(":", 1)[1]),
        int(env["TEMPORAL_UI_PORT"]),
    ]
    proc = subprocess.Popen(
        [str(BIN / "render-video"), "dev"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        # `dev` prints the API's address once every child is up, then a key for it.
        assert proc.stdout is not None
        ready = False
        key = None
        said = []
        for line in proc.stdout:
            said.append(line)
            ready = ready or line.startswith("API:")
            if line.startswith("API key:"):
                key = line.split()[2]
                break
        assert ready, "render-video dev exited before it was up"
        assert key is not None, "render-video dev printed no API key"
        base = f"http://127.0.0.1:{ports[0]}"
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
        # The key works (an unknown job, not a refused key), and is the one kept for reuse.
        auth = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{base}/api/v2/jobs/999", headers=auth, timeout=5).status_code == 404
        assert httpx.get(f"{base}/api/v2/jobs/999", timeout=5).status_code == 401
        assert any(line.startswith("Migrated the job store at sqlite:///") for line in said)
        old = httpx.get(f"{base}/api/v2/jobs/1", headers=auth, timeout=5)
        assert old.status_code == 200, old.text
        assert (old.json()["status"], old.json()["actual_cost"]) == ("completed", 1.01)
        kept = tmp_path / "DATA" / "dev-api-key"
        assert kept.read_text().strip() == key
        assert kept.stat().st_mode & 0o777 == 0o600
        assert all(port_open(port) for port in ports)
        assert (tmp_path / "DATA" / "temporal.db").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert not any(port_open(port) for port in ports)


def _children_of(data_dir: Path, module: str) -> list[int]:
    """Pids of `python -m {module}` processes started for this test's DATA_DIR."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"-m" in cmdline and module.encode() in cmdline:
            if f"DATA_DIR={data_dir}".encode() in environ:
                found.append(int(proc.name))
    return found


def test_dev_starts_a_killed_worker_again_and_its_renders_complete(tmp_path: Path) -> None:
    env = stack_env(tmp_path)
    base = f"http://127.0.0.1:{env['API_PORT']}"
    proc = subprocess.Popen(
        [str(BIN / "render-video"), "dev"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while not _children_of(Path(env["DATA_DIR"]), "worker") or not port_open(
            int(env["API_PORT"])
        ):
            assert proc.poll() is None, "render-video dev exited early"
            assert time.monotonic() < deadline, "the stack did not come up"
            time.sleep(0.2)
        [worker] = _children_of(Path(env["DATA_DIR"]), "worker")
        os.kill(worker, signal.SIGKILL)

        # `dev` keeps its key for the local stack in DATA_DIR.
        key = (Path(env["DATA_DIR"]) / "dev-api-key").read_text().strip()
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}) as api:
            scenes = [{"image_url": f"{base}/samples/scene-1.jpg", "duration_seconds": 1}]
            job = api.post("/api/v2/jobs", json={"storyboard": scenes}).json()
            api.post(f"/api/v2/jobs/{job['job_id']}/approve").raise_for_status()
            deadline = time.monotonic() + 90
            status = {}
            while time.monotonic() < deadline:
                status = api.get(f"/api/v2/jobs/{job['job_id']}").json()
                if status["status"] not in ("ready", "rendering"):
                    break
                time.sleep(0.2)
            assert status["status"] == "completed", status
        assert proc.poll() is None, "the stack stopped instead of starting the worker again"
        [new_worker] = _children_of(Path(env["DATA_DIR"]), "worker")
        assert new_worker != worker
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert proc.stderr is not None
    assert "worker exited with code -9; starting it again" in proc.stderr.read()
