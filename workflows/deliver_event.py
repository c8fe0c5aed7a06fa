"""DeliverJobEvent: one job event (job.completed, ...) to the caller's callback, retried with
backoff for up to a day. Started by RenderVideo as it closes (and left to run on after it), or
by the API when a caller asks for a redelivery."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.callbacks import CallbackActivities
    from workflows.payloads import DeliverEventInput, EventDelivered

DELIVER_WORKFLOW = "DeliverJobEvent"


@workflow.defn(name=DELIVER_WORKFLOW)
class DeliverJobEvent:
    @workflow.run
    async def run(self, input: DeliverEventInput) -> EventDelivered:
        return await workflow.execute_activity_method(
            CallbackActivities.deliver_job_event,
            input,
            # The caller's endpoint has 10 s to answer; an attempt ends well within this.
            start_to_close_timeout=timedelta(seconds=30),
            schedule_to_close_timeout=timedelta(days=1),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=input.retry_initial_seconds),
                backoff_coefficient=2.0,
                maximum_interval=timedelta(hours=1),
                non_retryable_error_types=["CallbackRefused", "JobNotFound"],
            ),
            summary=f"Send {input.event} of job {input.job_id} to its callback",
        )
