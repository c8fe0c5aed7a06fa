"""API keys, each owned by a tenant and stored only as a hash, and signed, expiring video links.

A key reads `rvk_<key_id>_<secret>`: the key id finds the row without a scan, the secret is 256
random bits, and the row keeps only the SHA-256 of the whole key (a fast hash is enough for a
random secret of that size; there is nothing to guess from a dictionary). Revoking a key takes
effect on the next request: every request looks its key up, nothing caches a valid one.

The table shares `SQLModel.metadata` with the job store: `make_engine` creates it in a new store,
migration 0006 in an older one.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, bindparam
from sqlalchemy import select as sa_select
from sqlmodel import Field, Session, SQLModel, col, select

from backend.settings import Settings

KEY_PREFIX = "rvk"
DEFAULT_TENANT = "default"
_KEY = re.compile(rf"^{KEY_PREFIX}_([0-9a-f]{{16}})_([A-Za-z0-9_-]{{43}})$")
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    # SQLite hands datetimes back without their zone; they were written in UTC.
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"

    key_id: str = Field(primary_key=True, max_length=16)
    tenant: str = Field(index=True, max_length=64)
    key_hash: str = Field(max_length=64)
    label: str | None = Field(default=None, max_length=200)
    created_at: datetime = Field(default_factory=_now)
    revoked_at: datetime | None = None


@dataclass(frozen=True)
class NewKey:
    key_id: str
    tenant: str
    key: str  # shown once; only its hash is stored


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    tenant: str
    label: str | None
    created_at: str
    revoked_at: str | None


def valid_tenant(tenant: str) -> bool:
    return bool(_TENANT.match(tenant))


def key_id_of(key: str) -> str | None:
    """The key id of a well-formed key; None for anything else."""
    match = _KEY.match(key)
    return match.group(1) if match else None


_KEYS = ApiKey.__table__  # type: ignore[attr-defined]
_LIVE_KEYS = sa_select(_KEYS.c.key_id, _KEYS.c.tenant, _KEYS.c.key_hash).where(
    _KEYS.c.key_id.in_(bindparam("key_ids", expanding=True)), _KEYS.c.revoked_at.is_(None)
)


class KeyStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, tenant: str, label: str | None = None) -> NewKey:
        if not valid_tenant(tenant):
            raise ValueError(
                "A tenant name is 1 to 64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        key_id = secrets.token_hex(8)
        key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
        with Session(self.engine) as session:
            session.add(ApiKey(key_id=key_id, tenant=tenant, key_hash=_digest(key), label=label))
            session.commit()
        return NewKey(key_id=key_id, tenant=tenant, key=key)

    def list(self) -> list[KeyInfo]:
        with Session(self.engine) as session:
            rows = session.exec(select(ApiKey).order_by(col(ApiKey.created_at))).all()
            return [
                KeyInfo(
                    key_id=row.key_id,
                    tenant=row.tenant,
                    label=row.label,
                    created_at=_iso(row.created_at) or "",
                    revoked_at=_iso(row.revoked_at),
                )
                for row in rows
            ]

    def revoke(self, key_id: str) -> bool:
        """Revokes the key; False when no key has that id."""
        with Session(self.engine) as session:
            row = session.get(ApiKey, key_id, with_for_update=True)
            if row is None:
                return False
            if row.revoked_at is None:
                row.revoked_at = _now()
                session.add(row)
                session.commit()
            return True

    def tenant_of(self, key: str) -> str | None:
        """The tenant of a valid, unrevoked key; None otherwise."""
        return self.tenants_of([key]).get(key)

    def tenants_of(self, keys: Collection[str]) -> dict[str, str]:
        """The tenants of those `keys` that are valid and unrevoked, read in one query."""
        by_id = {key_id: key for key in keys if (key_id := key_id_of(key))}
        if not by_id:
            return {}
        # A Core select: every request's path, so no ORM session or instances.
        with self.engine.connect() as conn:
            rows = conn.execute(_LIVE_KEYS, {"key_ids": list(by_id)}).all()
        found: dict[str, str] = {}
        for key_id, tenant, key_hash in rows:
            key = by_id[key_id]
            if hmac.compare_digest(_digest(key), key_hash):
                found[key] = tenant
        return found


# -- signed video links: a <video> tag cannot send an Authorization header --


def video_signature(secret: bytes, job_id: int, expires: int) -> str:
    return hmac.new(secret, f"{job_id}.{expires}".encode(), hashlib.sha256).hexdigest()


def signed_video_path(
    secret: bytes, job_id: int, ttl: int, now: float | None = None, resource: str = "data"
) -> str:
    """A signed, expiring link to one of a job's files: the video (`data`), or its poster,
    preview or a thumbnail (the signature covers the job, so it opens any of them)."""
    expires = int(now if now is not None else time.time()) + ttl
    signature = video_signature(secret, job_id, expires)
    return f"/api/videos/{job_id}/{resource}?expires={expires}&signature={signature}"


def signature_valid(
    secret: bytes, job_id: int, expires: int, signature: str, now: float | None = None
) -> bool:
    if expires < (now if now is not None else time.time()):
        return False
    return hmac.compare_digest(video_signature(secret, job_id, expires), signature.lower())


def url_signing_key(settings: Settings) -> bytes:
    """URL_SIGNING_SECRET, or the key in DATA_DIR/url-signing.key, made once (mode 0600) by
    the first process that needs it so that API processes sharing a data dir agree."""
    if settings.url_signing_secret:
        return settings.url_signing_secret.encode()
    path = settings.url_signing_key_file
    if not path.exists():
        _write_private(path, secrets.token_hex(32), replace=False)
    try:
        return bytes.fromhex(path.read_text().strip())
    except ValueError:
        raise SystemExit(
            f"{path.name} in DATA_DIR does not hold a hex key; delete it to make a new one "
            "(signed links given out so far stop working)"
        ) from None


def _write_private(path: Path, text: str, *, replace: bool) -> None:
    """Writes a file only its owner can read, whole or not at all; replace=False leaves a
    file another process wrote first in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text + "\n")
        if replace:
            os.replace(temp, path)
        else:
            try:
                os.link(temp, path)
            except FileExistsError:
                pass
    finally:
        temp.unlink(missing_ok=True)


def dev_api_key(settings: Settings, keys: KeyStore) -> str:
    """The local key of `render-video dev` and `demo`: the one kept in DATA_DIR/dev-api-key
    while the store still accepts it, otherwise a new one for the default tenant."""
    path = settings.dev_api_key_file
    try:
        kept = path.read_text().strip()
    except FileNotFoundError:
        kept = ""
    if kept and keys.tenant_of(kept) is not None:
        return kept
    key = keys.create(DEFAULT_TENANT, label="render-video dev").key
    _write_private(path, key, replace=True)
    return key
