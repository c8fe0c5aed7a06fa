"""The webhook receiver: signed deliveries routed by the prediction ledger alone, deduplicated
per (webhook id, prediction), and request bodies capped before they are read.

The runs that receive the signals are real RenderVideo runs waiting in review; the ledger rows
that name them are written the way `start_prediction` writes them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import select
import socket
import time
import uuid
from typing import Any

import pytest
from support import Stack
from temporalio.api.enums.v1 import EventType

from local_replicate.testing import RunningServer
from local_replicate.webhooks import sign

URL = "/api/v2/webhooks/replicate"


@pytest.fixture(autouse=True)
def _secret(renderer: RunningServer) -> None:
    # The render server's secret is random per data directory: sign with the one it serves.
    SECRET[:] = [renderer.webhook_secret]


SECRET: list[str] = []


def signed(body: str, msg_id: str | None = None, extra: str = "") -> dict[str, str]:
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    stamp = int(time.time())
    signature = sign(SECRET[0], msg_id, stamp, body)
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": f"{extra} {signature}".strip(),
    }


def completed(prediction_id: str, status: str = "succeeded") -> str:
    return json.dumps({"id": prediction_id, "status": status, "output": "http://a/v.mp4"})


async def waiting_run(stack: Stack) -> tuple[int, str]:
    """A job whose run waits in review, and that run's workflow id."""
    job_id = await stack.create_job(stack.sample_scenes(count=1))
    response = await stack.api.post(f"/api/v2/jobs/{job_id}/review")
    assert response.status_code == 200, response.text
    return job_id, response.json()["workflow_id"]


def owned_prediction(stack: Stack, job_id: int, workflow_id: str) -> str:
    """A prediction the ledger gives to this job's run."""
    prediction_id = f"p{uuid.uuid4().hex[:24]}"
    entry = stack.store.record_intent(job_id, "run-test", "digest", workflow_id=workflow_id)
    assert stack.store.record_prediction(entry, prediction_id, "created")
    return prediction_id


async def finished_signals(stack: Stack, workflow_id: str) -> list[dict[str, Any]]:
    history = await stack.temporal.get_workflow_handle(workflow_id).fetch_history()
    found = []
    for event in history.events:
        if event.event_type != EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            continue
        attributes = event.workflow_execution_signaled_event_attributes
        if attributes.signal_name == "prediction_finished":
            found.append(json.loads(attributes.input.payloads[0].data))
    return found


async def cancel_runs(stack: Stack, *job_ids: int) -> None:
    for job_id in job_ids:
        await stack.api.post(f"/api/v2/jobs/{job_id}/cancel")


async def test_a_delivery_goes_to_the_ledgers_owner_whatever_the_url_says(stack: Stack) -> None:
    job_a, run_a = await waiting_run(stack)
    job_b, run_b = await waiting_run(stack)
    prediction_a = owned_prediction(stack, job_a, run_a)
    prediction_b = owned_prediction(stack, job_b, run_b)
    async with stack.anonymous() as replicate:
        # An old webhook URL names job B, but the signed body names A's prediction.
        body = completed(prediction_a)
        response = await replicate.post(f"{URL}?job_id={job_b}", content=body, headers=signed(body))
        assert response.status_code == 200, response.text
        assert response.json() == {
            "status": "signalled",
            "job_id": job_a,
            "prediction_id": prediction_a,
        }
        # A delivery without any job id is routed the same way.
        body = completed(prediction_b, status="failed")
        response = await replicate.post(URL, content=body, headers=signed(body))
        assert response.status_code == 200, response.text
        assert response.json()["job_id"] == job_b
    signals_a = await finished_signals(stack, run_a)
    signals_b = await finished_signals(stack, run_b)
    assert [s["prediction_id"] for s in signals_a] == [prediction_a]
    assert [(s["prediction_id"], s["status"]) for s in signals_b] == [(prediction_b, "failed")]
    # The run asks the provider for the outcome: the signal carries no output or error.
    assert not signals_a[0].get("output_url") and not signals_b[0].get("error")
    await cancel_runs(stack, job_a, job_b)


async def test_one_good_signature_among_several_is_enough(stack: Stack) -> None:
    job_id, run = await waiting_run(stack)
    prediction_id = owned_prediction(stack, job_id, run)
    body = completed(prediction_id)
    wrong = "v1," + base64.b64encode(b"x" * 32).decode()
    # A rotated-out secret's signature, one that is not base64, another scheme's: then ours.
    headers = signed(body, extra=f"{wrong} v1,%%not-base64%% v2,abc")
    async with stack.anonymous() as replicate:
        response = await replicate.post(URL, content=body, headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "signalled"
        # Only bad ones: refused.
        only_bad = {**headers, "webhook-signature": f"{wrong} v1,%%not-base64%%"}
        refused = await replicate.post(URL, content=body, headers=only_bad)
        assert refused.status_code == 401, refused.text
        assert "www-authenticate" not in refused.headers
    assert len(await finished_signals(stack, run)) == 1
    await cancel_runs(stack, job_id)


async def test_events_before_the_final_one_are_acknowledged_without_a_signal(
    stack: Stack,
) -> None:
    job_id, run = await waiting_run(stack)
    prediction_id = owned_prediction(stack, job_id, run)
    async with stack.anonymous() as replicate:
        # `start`, then `output` and `logs` events: a prediction starting and processing.
        for status in ["starting", "processing", "processing"]:
            body = json.dumps({"id": prediction_id, "status": status, "logs": "frame 1"})
            response = await replicate.post(URL, content=body, headers=signed(body))
            assert response.status_code == 200, response.text
            assert response.json() == {"status": "ignored", "prediction_status": status}
    assert await finished_signals(stack, run) == []
    await cancel_runs(stack, job_id)


async def test_a_webhook_id_replayed_with_another_prediction_does_not_burn_the_real_one(
    stack: Stack,
) -> None:
    job_a, run_a = await waiting_run(stack)
    job_b, run_b = await waiting_run(stack)
    prediction_a = owned_prediction(stack, job_a, run_a)
    prediction_b = owned_prediction(stack, job_b, run_b)
    webhook_id = f"msg_{uuid.uuid4().hex}"
    async with stack.anonymous() as replicate:
        # A delivery carrying the webhook id that A's real delivery will have, for B.
        other = completed(prediction_b)
        first = await replicate.post(URL, content=other, headers=signed(other, webhook_id))
        assert first.json()["status"] == "signalled", first.text
        assert not stack.store.seen_webhook(webhook_id, prediction_a)
        # The real delivery still reaches A.
        real = completed(prediction_a)
        response = await replicate.post(URL, content=real, headers=signed(real, webhook_id))
        assert response.json() == {
            "status": "signalled",
            "job_id": job_a,
            "prediction_id": prediction_a,
        }
        # Its retry is recognised.
        again = await replicate.post(URL, content=real, headers=signed(real, webhook_id))
        assert again.json() == {
            "status": "duplicate",
            "webhook_id": webhook_id,
            "prediction_id": prediction_a,
        }
    assert [s["prediction_id"] for s in await finished_signals(stack, run_a)] == [prediction_a]
    assert [s["prediction_id"] for s in await finished_signals(stack, run_b)] == [prediction_b]
    await cancel_runs(stack, job_a, job_b)


async def test_an_unknown_prediction_is_404_so_replicate_retries(stack: Stack) -> None:
    body = completed("p-nobody-knows")
    async with stack.anonymous() as replicate:
        response = await replicate.post(URL, content=body, headers=signed(body))
    assert response.status_code == 404, response.text
    assert response.json() == {"detail": "No job knows prediction p-nobody-knows"}


# -- body caps --


def stream_upload(base_url: str, path: str, megabytes: int) -> tuple[int, dict[str, Any], int]:
    """Uploads a chunked body (no Content-Length) the way a browser or curl does: reading
    while it sends, and stopping once an answer comes. Returns the status, the JSON answer
    and how many bytes were sent."""
    host, port = base_url.removeprefix("http://").split(":")
    chunk = b" " * (1024 * 1024)
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent = 0
    answer = b""
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = [
            f"POST {path} HTTP/1.1",
            f"Host: {host}",
            "Content-Type: application/json",
            "Transfer-Encoding: chunked",
        ]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        # poll, not select: a long test session may hand out descriptors past select's limit.
        answered = select.poll()
        answered.register(sock, select.POLLIN)
        for _ in range(megabytes):
            if answered.poll(0):
                break  # the server answered: stop sending
            try:
                sock.sendall(framed)
            except OSError:  # it stopped reading and closed
                break
            sent += len(chunk)
        while True:
            head_end = answer.find(b"\r\n\r\n")
            if head_end >= 0:
                length = int(re.search(rb"content-length: *(\d+)", answer.lower())[1])
                if len(answer) >= head_end + 4 + length:
                    break
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    head_bytes, _, payload = answer.partition(b"\r\n\r\n")
    return int(head_bytes.split()[1]), json.loads(payload), sent


async def test_a_streamed_200_mb_body_is_refused_once_past_the_cap(stack: Stack) -> None:
    cap = stack.settings.max_request_bytes
    status, body, sent = await asyncio.to_thread(stream_upload, stack.base_url, URL, 200)
    assert status == 413, body
    assert str(cap) in body["detail"]
    # The upload was cut short: the server stopped reading soon after the cap.
    assert sent < 64 * 1024 * 1024, sent


def raw_post(base_url: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """Sends only a request's headers and reads the answer: nothing of the body is sent."""
    host, port = base_url.removeprefix("http://").split(":")
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}"] + [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    head, _, payload = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


async def test_a_declared_length_past_the_cap_is_refused_before_any_body(stack: Stack) -> None:
    key = stack.api.headers["authorization"]
    for path, extra in [(URL, {}), ("/api/v2/jobs", {"Authorization": key})]:
        status, body = await asyncio.to_thread(
            raw_post,
            stack.base_url,
            path,
            {"Content-Type": "application/json", "Content-Length": str(200 * 1024 * 1024), **extra},
        )
        assert status == 413, (path, body)
        assert "too large" in body["detail"]
