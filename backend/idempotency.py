"""Idempotency keys: a POST retried with the same `Idempotency-Key` is answered once.

Stripe's semantics. The first request with a key claims it (one insert, atomic on the
table's primary key) and, once it has an answer that is a decision (2xx, 4xx), stores it; a
retry with the same key and the same request gets that answer again and changes nothing. The
same key with another request is refused, a retry while the first is still being processed is
told to wait, and an answer that decided nothing (5xx) is not kept, so a retry really tries
again. Keys are per tenant and live for 24 hours.

The HTTP side (reading the header, replaying answers) is api/idempotency.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import Session

from backend.database import IdempotencyRecord

log = logging.getLogger(__name__)

# How long a key and its answer are kept: a retry a day later is a new request.
KEY_TTL = timedelta(hours=24)
# A claim still in progress after this long belongs to a request that will never finish (its
# process died): the key may be claimed again. Far longer than any request takes.
CLAIM_LEASE = timedelta(minutes=5)
# Expired rows are removed by a claim, at most this often per process.
CLEANUP_EVERY_SECONDS = 3600.0
MAX_KEY_LENGTH = 255

_TABLE = IdempotencyRecord.__table__  # type: ignore[attr-defined]


def _now() -> datetime:
    return datetime.now(UTC)


def request_fingerprint(method: str, path: str, query: bytes, body: bytes) -> str:
    """sha256 of what makes two requests the same one (NUL cannot occur in the first three)."""
    digest = hashlib.sha256()
    for part in (method.encode(), path.encode(), query, body):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()


class Outcome(StrEnum):
    CLAIMED = "claimed"  # this request is the first: process it, then settle the claim
    REPLAY = "replay"  # answered before: send `answer` again
    CONFLICT = "conflict"  # the key was first used with another request (`first_request`)
    IN_PROGRESS = "in_progress"  # the first request with the key is still being processed


@dataclass(frozen=True)
class StoredAnswer:
    status_code: int
    headers: list[tuple[str, str]]
    body: bytes


@dataclass(frozen=True)
class Claim:
    outcome: Outcome
    # CLAIMED: what settles the claim (complete or release).
    token: str | None = None
    answer: StoredAnswer | None = None
    # CONFLICT: the request line ("POST /api/v2/jobs") the key was first used with.
    first_request: str | None = None


class IdempotencyStore:
    """The `idempotency_keys` table. Blocking calls: the API runs them in a thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._cleaned_at = float("-inf")
        self._cleanup_lock = threading.Lock()

    def claim(
        self,
        tenant: str,
        key: str,
        fingerprint: str,
        request: str,
        *,
        now: datetime | None = None,
    ) -> Claim:
        """Claims `key` for this request, or says why it cannot be processed now."""
        now = now or _now()
        self._clean_up(now)
        token = secrets.token_hex(16)
        # A claimed row may be released between the failed insert and the read (its request
        # got a 5xx): then the insert is tried again.
        for _ in range(5):
            with Session(self.engine) as session:
                session.add(
                    IdempotencyRecord(
                        tenant=tenant,
                        idempotency_key=key,
                        fingerprint=fingerprint,
                        request=request,
                        state="in_progress",
                        token=token,
                        created_at=now,
                    )
                )
                try:
                    session.commit()
                except IntegrityError:
                    session.rollback()
                else:
                    return Claim(Outcome.CLAIMED, token=token)
            if self._take_over(tenant, key, fingerprint, request, token, now):
                return Claim(Outcome.CLAIMED, token=token)
            with self.engine.connect() as conn:
                row = conn.execute(
                    select(_TABLE).where(_TABLE.c.tenant == tenant, _TABLE.c.idempotency_key == key)
                ).first()
            if row is None:
                continue
            if row.fingerprint != fingerprint:
                return Claim(Outcome.CONFLICT, first_request=row.request)
            if row.state != "done":
                return Claim(Outcome.IN_PROGRESS)
            headers = [(name, value) for name, value in json.loads(row.headers or "[]")]
            return Claim(
                Outcome.REPLAY,
                answer=StoredAnswer(row.status_code, headers, bytes(row.body or b"")),
            )
        # Five claims released under our feet in a row: the key is in heavy use right now.
        return Claim(Outcome.IN_PROGRESS)

    def _take_over(
        self, tenant: str, key: str, fingerprint: str, request: str, token: str, now: datetime
    ) -> bool:
        """Claims a row that no longer counts: expired, or a claim whose request died."""
        with self.engine.begin() as conn:
            result = conn.execute(
                update(_TABLE)
                .where(
                    _TABLE.c.tenant == tenant,
                    _TABLE.c.idempotency_key == key,
                    or_(
                        _TABLE.c.created_at < now - KEY_TTL,
                        and_(
                            _TABLE.c.state == "in_progress", _TABLE.c.created_at < now - CLAIM_LEASE
                        ),
                    ),
                )
                .values(
                    fingerprint=fingerprint,
                    request=request,
                    state="in_progress",
                    token=token,
                    status_code=None,
                    headers=None,
                    body=None,
                    created_at=now,
                )
            )
            return result.rowcount == 1

    def complete(
        self,
        tenant: str,
        key: str,
        token: str,
        status_code: int,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> bool:
        """Stores the answer of the claimed request; False if the claim was lost meanwhile."""
        with self.engine.begin() as conn:
            result = conn.execute(
                update(_TABLE)
                .where(
                    _TABLE.c.tenant == tenant,
                    _TABLE.c.idempotency_key == key,
                    _TABLE.c.token == token,
                )
                .values(
                    state="done",
                    status_code=status_code,
                    headers=json.dumps([list(pair) for pair in headers]),
                    body=body,
                )
            )
            return result.rowcount == 1

    def release(self, tenant: str, key: str, token: str) -> None:
        """Forgets the claim: the request had no answer worth keeping, a retry runs anew."""
        with self.engine.begin() as conn:
            conn.execute(
                delete(_TABLE).where(
                    _TABLE.c.tenant == tenant,
                    _TABLE.c.idempotency_key == key,
                    _TABLE.c.token == token,
                )
            )

    def _clean_up(self, now: datetime) -> None:
        # Expired rows are never served (claim takes them over); this only keeps the table
        # small. One claim an hour per process does it, the others do not wait for it.
        moment = time.monotonic()
        if moment - self._cleaned_at < CLEANUP_EVERY_SECONDS:
            return
        if not self._cleanup_lock.acquire(blocking=False):
            return
        try:
            self._cleaned_at = moment
            with self.engine.begin() as conn:
                conn.execute(delete(_TABLE).where(_TABLE.c.created_at < now - KEY_TTL))
        except OperationalError as exc:
            # Not needed for the claim, which goes on (and meets the same store, or not).
            log.warning("Could not remove expired idempotency keys: %s", exc.orig)
        finally:
            self._cleanup_lock.release()
