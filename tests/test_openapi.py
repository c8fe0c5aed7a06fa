"""The OpenAPI document tells the truth: Schemathesis, with every check, against a real stack
(Temporal dev server, worker, render server, the API over HTTP), authenticated with a key."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from support import Stack, api_client, new_key, running_stack
from temporalio.testing import WorkflowEnvironment

from local_replicate.testing import RunningServer

BIN = Path(sys.executable).parent
CONFIG = Path(__file__).with_name("schemathesis.toml")
VIDEO = "/api/videos/{job_id}/data"


async def rendered_job(stack: Stack, key: str) -> int:
    async with api_client(stack.base_url, key) as api:
        created = await api.post("/api/v2/jobs", json={"storyboard": stack.sample_scenes(1)})
        job_id: int = created.json()["job_id"]
        assert (await api.post(f"/api/v2/jobs/{job_id}/approve")).status_code == 200
    assert (await stack.wait_closed(job_id))["status"] == "completed"
    return job_id


async def schemathesis(stack: Stack, key: str, config: Path, *args: str) -> dict[str, Any]:
    """Runs `st run` on the stack's OpenAPI document; its JSON report, with the text one."""
    report = config.with_suffix(".json")
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "schemathesis"),
        "--config-file",
        str(config),
        "run",
        f"{stack.base_url}/openapi.json",
        "--header",
        f"Authorization: Bearer {key}",
        "--checks",
        "all",
        "--report",
        "json",
        "--report-json-path",
        str(report),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=config.parent,
        env={**os.environ, "NO_COLOR": "1"},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=240)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    result: dict[str, Any] = json.loads(report.read_text())
    assert result["failures"] == [] and result["errors"] == [], text
    assert result["complete"] and result["stop_reason"] == "completed", text
    return result


async def test_schemathesis_finds_no_failure_with_every_check(
    temporal_env: WorkflowEnvironment, renderer: RunningServer, tmp_path: Path, jobs_db: str
) -> None:
    async with running_stack(
        temporal_env,
        renderer,
        tmp_path,
        database_url=jobs_db,
        # A stream of a job that renders ends soon (its `end` says so) instead of holding a
        # test case; generated storyboards name images nobody serves, so their renders fail.
        events_max_seconds=1.0,
    ) as stack:
        key = new_key(stack.store, "schemathesis")
        video_job = await rendered_job(stack, key)

        # Every operation, with schema-valid and schema-violating data, and stateful sequences.
        config = tmp_path / "schemathesis.toml"
        config.write_text(CONFIG.read_text())
        result = await schemathesis(stack, key, config)
        # Every operation the document lists was tested.
        documented = sum(
            1
            for path in (await stack.api.get("/openapi.json")).json()["paths"].values()
            for method in path
            if method in ("get", "head", "post", "put", "delete", "patch")
        )
        assert result["operations"]["tested"] == result["operations"]["total"] == documented
        assert result["test_cases"]["generated"] > 500

        # The video's own answers (200, 206, HEAD) too: a finished video of this tenant, with
        # schema-valid requests only (its id is fixed, so it cannot be made invalid).
        pinned = tmp_path / "schemathesis-video.toml"
        pinned.write_text(
            CONFIG.read_text()
            + f'\n[[operations]]\ninclude-path = "{VIDEO}"\n'
            + f'parameters = {{ "path.job_id" = {video_job} }}\n'
        )
        result = await schemathesis(
            stack, key, pinned, "--include-path", VIDEO, "--mode", "positive"
        )
        for method in ("GET", "HEAD"):
            assert result["valid_rates"][f"{method} {VIDEO}"]["fuzzing"]["accepted"] > 0
