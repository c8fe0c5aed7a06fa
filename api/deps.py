"""FastAPI dependencies: one store and one Temporal client per process, made in the lifespan.

They are `async def` although they never await: FastAPI runs a plain `def` dependency in its
threadpool, a thread hop per dependency per request for what is an attribute read.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from temporalio.client import Client

from api.reads import JobReads, ProgressCache
from api.views import VideoSigner
from backend.database import JobStore
from backend.provider import ProviderClient
from backend.settings import Settings
from backend.storage import Storage


async def get_store(request: Request) -> JobStore:
    return request.app.state.store


async def get_temporal(request: Request) -> Client:
    return request.app.state.temporal


async def get_provider(request: Request) -> ProviderClient:
    return request.app.state.provider


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_reads(request: Request) -> JobReads:
    return request.app.state.reads


async def get_progress(request: Request) -> ProgressCache:
    return request.app.state.progress


async def get_signer(request: Request) -> VideoSigner:
    return request.app.state.signer


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage


StoreDep = Annotated[JobStore, Depends(get_store)]
TemporalDep = Annotated[Client, Depends(get_temporal)]
ProviderDep = Annotated[ProviderClient, Depends(get_provider)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
ReadsDep = Annotated[JobReads, Depends(get_reads)]
ProgressDep = Annotated[ProgressCache, Depends(get_progress)]
SignerDep = Annotated[VideoSigner, Depends(get_signer)]
StorageDep = Annotated[Storage, Depends(get_storage)]
