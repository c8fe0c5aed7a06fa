"""The orchestration baseline: a workflow of seven no-op activities, and its worker.

`python -m bench.bare_chain` runs the worker (TEMPORAL_ADDRESS, TASK_QUEUE from the environment)
with the product worker's options, until SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.common import RetryPolicy
from temporalio.worker import Worker

STEPS = 7
# RenderVideo's QUICK policy, so a retry would behave alike (none happens here).
QUICK = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_attempts=5)


@dataclass
class StepInput:
    job_id: int
    step: int


@dataclass
class StepResult:
    job_id: int
    step: int


@dataclass
class ChainInput:
    job_id: int


@dataclass
class ChainResult:
    job_id: int
    steps: int


@activity.defn
async def step(input: StepInput) -> StepResult:
    return StepResult(job_id=input.job_id, step=input.step)


@workflow.defn
class BareChain:
    @workflow.run
    async def run(self, input: ChainInput) -> ChainResult:
        for i in range(STEPS):
            await workflow.execute_activity(
                step,
                StepInput(job_id=input.job_id, step=i),
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=QUICK,
            )
        return ChainResult(job_id=input.job_id, steps=STEPS)


async def serve() -> None:
    from backend.settings import get_settings
    from worker import worker_options

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    client = await Client.connect(os.environ["TEMPORAL_ADDRESS"])
    async with Worker(
        client,
        task_queue=os.environ["TASK_QUEUE"],
        workflows=[BareChain],
        activities=[step],
        **worker_options(get_settings()),
    ):
        print("worker running", flush=True)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(serve())
