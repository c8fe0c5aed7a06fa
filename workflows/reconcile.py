"""ReconcileJobs: the safety net a Temporal Schedule runs every few minutes. Any job whose
status says a run is going while its workflow has closed (or is gone) is set to what the
workflow ended as."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.jobs import JobActivities
    from workflows.payloads import ReconcileInput, ReconcileResult

RECONCILE_WORKFLOW = "ReconcileJobs"


@workflow.defn(name=RECONCILE_WORKFLOW)
class ReconcileJobs:
    @workflow.run
    async def run(self, input: ReconcileInput) -> ReconcileResult:
        return await workflow.execute_activity_method(
            JobActivities.reconcile_jobs,
            input,
            start_to_close_timeout=timedelta(minutes=5),
            heartbeat_timeout=timedelta(seconds=30),
            # The next scheduled pass is the retry.
            retry_policy=RetryPolicy(maximum_attempts=2),
            summary="Repair jobs whose status disagrees with their closed workflow",
        )
