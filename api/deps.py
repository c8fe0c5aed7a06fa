"""FastAPI dependencies: one store and one Temporal client per process, made in the lifespan."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from temporalio.client import Client

from backend.database import JobStore
from backend.provider import ProviderClient
from backend.settings import Settings


def get_store(request: Request) -> JobStore:
    return request.app.state.store


def get_temporal(request: Request) -> Client:
    return request.app.state.temporal


def get_provider(request: Request) -> ProviderClient:
    return request.app.state.provider


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


StoreDep = Annotated[JobStore, Depends(get_store)]
TemporalDep = Annotated[Client, Depends(get_temporal)]
ProviderDep = Annotated[ProviderClient, Depends(get_provider)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
