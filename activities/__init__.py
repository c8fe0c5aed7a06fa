"""The activities, one class per concern: `jobs` (the job store), `predictions` (the provider,
through the ledger), `media` (the job's files), `callbacks` (telling the caller)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import httpx
from temporalio.client import Client

from activities.callbacks import CallbackActivities, callback_client
from activities.jobs import JobActivities
from activities.media import MediaActivities
from activities.predictions import PredictionActivities
from backend.database import JobStore
from backend.provider import ProviderClient
from backend.settings import Settings
from backend.storage import Storage, storage_for


def all_activities(
    store: JobStore,
    provider: ProviderClient,
    settings: Settings,
    http: httpx.AsyncClient,
    temporal: Client | None = None,
    callbacks: httpx.AsyncClient | None = None,
    storage: Storage | None = None,
    video_threads: Executor | None = None,
) -> list[Callable[..., Any]]:
    """Every activity, for registering on a worker (`callbacks`: the client that calls the
    callers' endpoints, which follows no redirects; `storage`: where the job's files live,
    by default the settings' one; `video_threads`: where PyAV work runs, by default a pool of
    MEDIA_THREADS)."""
    storage = storage or storage_for(settings)
    return [
        *JobActivities(store, settings, temporal, storage).all(),
        *PredictionActivities(store, provider, settings).all(),
        *MediaActivities(store, provider, settings, http, storage, video_threads).all(),
        *CallbackActivities(store, settings, callbacks or callback_client()).all(),
    ]
