"""Where a job's files live: the videos, scene clips, posters and previews.

Files are named by key, the same relative path in every backend (`videos/12/final.mp4`,
`videos/12/scenes/...`). `LocalStorage` keeps them under DATA_DIR, as one host always did:
activities write beside the target and rename into it. `S3Storage` keeps them in a bucket
through obstore: activities work in a scratch folder of their own (any worker may run the
next step, on another host), pull what they read and push what they make. A push is a
multipart upload that only becomes an object once complete, so a worker killed mid-upload
leaves nothing visible; a rename is a server-side copy and a delete.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from backend.settings import Settings

# Multipart parts: S3's smallest part size, so an upload holds at most a few parts in memory.
PART_BYTES = 8 * 1024 * 1024
# How many parts a push sends at once.
PART_CONCURRENCY = 4
# A scratch folder left by a worker killed mid-activity is removed after this long.
SCRATCH_MAX_AGE = timedelta(days=1)


class StorageError(Exception):
    """The storage could not be read or written; the message names no server paths.
    `code` is the S3 error code when the server gave one (NoSuchBucket, AccessDenied)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    etag: str | None
    modified: datetime | None


def video_key(job_id: int, name: str = "") -> str:
    """`videos/{job}/{name}`: the job's final.mp4, poster, preview and stitched files."""
    return f"videos/{job_id}/{name}" if name else f"videos/{job_id}"


def scene_key(job_id: int, name: str = "") -> str:
    """`videos/{job}/scenes/{name}`: a scene's clip and thumbnail."""
    return f"videos/{job_id}/scenes/{name}" if name else f"videos/{job_id}/scenes"


class Storage:
    """The operations every backend has; `work` is the activity's scratch folder (see
    `scratch`), `key`s are relative paths."""

    remote: bool = False

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Path]:
        """A folder for one activity's working files."""
        raise NotImplementedError

    def staging(self, key: str, work: Path) -> Path:
        """A new, unique path to write the future content of `key` to before `push`."""
        raise NotImplementedError

    async def pull(self, key: str, work: Path) -> Path:
        """A local path holding `key`'s content (it does not exist if the key does not)."""
        raise NotImplementedError

    async def push(self, path: Path, key: str) -> None:
        """Makes `path`'s content the object `key`, all at once; `path` is gone after."""
        raise NotImplementedError

    async def rename(self, source: str, target: str) -> None:
        raise NotImplementedError

    async def delete(self, key: str) -> None:
        """Removes `key`; nothing happens if it is not there."""
        raise NotImplementedError

    async def head(self, key: str) -> StoredObject | None:
        raise NotImplementedError

    async def list(self, prefix: str) -> list[str]:
        """The keys directly under the folder `prefix` (not in its subfolders)."""
        raise NotImplementedError

    async def check(self) -> None:
        """Raises unless the storage can be read and written (readiness)."""
        raise NotImplementedError

    def local_path(self, key: str) -> Path | None:
        """Where `key` is on this host's disk, for a backend that keeps files there."""
        return None

    async def read(
        self, key: str, start: int, end: int, etag: str | None = None, chunk: int = PART_BYTES
    ) -> AsyncIterator[bytes]:
        """Bytes [start, end) of `key`; with `etag`, of that version of it only."""
        raise NotImplementedError
        yield b""  # pragma: no cover - makes this an async generator

    async def presign(self, key: str, expires_in: timedelta) -> str | None:
        """A URL that reads `key` without credentials, where the backend can make one."""
        return None


class LocalStorage(Storage):
    """Files under a folder (DATA_DIR): today's layout, for one host or a shared volume."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / key

    def local_path(self, key: str) -> Path | None:
        return self.path(key)

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Path]:
        # Files are written beside their targets (one rename publishes them); no folder needed.
        yield self.root

    def staging(self, key: str, work: Path) -> Path:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        stem, dot, suffix = target.name.lstrip(".").partition(".")
        return target.with_name(f".{stem}-{uuid.uuid4().hex}{dot}{suffix}")

    async def pull(self, key: str, work: Path) -> Path:
        return self.path(key)

    async def push(self, path: Path, key: str) -> None:
        target = self.path(key)
        if path != target:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)

    async def rename(self, source: str, target: str) -> None:
        os.replace(self.path(source), self.path(target))

    async def delete(self, key: str) -> None:
        path = self.path(key)
        if path.is_symlink() or path.exists():
            path.unlink()

    async def head(self, key: str) -> StoredObject | None:
        path = self.path(key)
        if not path.is_file():
            return None
        stat = path.stat()
        return StoredObject(key, stat.st_size, None, datetime.fromtimestamp(stat.st_mtime))

    async def list(self, prefix: str) -> list[str]:
        folder = self.path(prefix)
        if not folder.is_dir():
            return []
        return [f"{prefix}/{p.name}" for p in folder.iterdir() if p.is_file() or p.is_symlink()]

    async def check(self) -> None:
        folder = self.root / "videos"
        await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise StorageError("the video folder cannot be written")


class S3Storage(Storage):
    """Objects in an S3 bucket (AWS, MinIO, ...) under a prefix, through obstore."""

    remote = True

    def __init__(self, url: str, endpoint: str | None, scratch_root: Path) -> None:
        from obstore.store import S3Store

        parts = urlsplit(url)
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        config: dict[str, object] = {}
        if endpoint:
            # MinIO and moto serve one host for every bucket: path-style addressing.
            config.update(endpoint=endpoint, virtual_hosted_style_request=False)
        self.store = S3Store(
            self.bucket,
            prefix=self.prefix or None,
            config=config,  # type: ignore[arg-type]
            client_options={"allow_http": bool(endpoint and endpoint.startswith("http://"))},
            # Temporal retries the activity (and a readiness probe asks again): a store that
            # is down fails a call in seconds, not after obstore's 3 minutes of retries.
            retry_config={"max_retries": 3, "retry_timeout": timedelta(seconds=20)},
        )
        self.scratch_root = scratch_root

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Path]:
        self.scratch_root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="activity-", dir=self.scratch_root))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def clean_scratch(self) -> None:
        """Removes scratch folders that workers killed mid-activity left behind."""
        if not self.scratch_root.is_dir():
            return
        cutoff = time.time() - SCRATCH_MAX_AGE.total_seconds()
        for folder in self.scratch_root.glob("activity-*"):
            with contextlib.suppress(OSError):
                if folder.stat().st_mtime < cutoff:
                    shutil.rmtree(folder, ignore_errors=True)

    def staging(self, key: str, work: Path) -> Path:
        name = key.rsplit("/", 1)[-1].lstrip(".")
        return work / f".{uuid.uuid4().hex}-{name}"

    async def pull(self, key: str, work: Path) -> Path:
        import obstore

        path = work / key.rsplit("/", 1)[-1]
        if path.exists():
            return path
        partial = path.with_name(f".{path.name}.part")
        try:
            result = await obstore.get_async(self.store, key)
            with partial.open("wb") as out:
                async for chunk in result.stream(min_chunk_size=PART_BYTES):
                    await asyncio.to_thread(out.write, chunk)
            os.replace(partial, path)
        except FileNotFoundError:
            partial.unlink(missing_ok=True)
        except Exception as exc:
            partial.unlink(missing_ok=True)
            raise _storage_error("read", key, exc) from exc
        return path

    async def push(self, path: Path, key: str) -> None:
        import obstore

        try:
            # Multipart: parts of PART_BYTES, and the object appears only when the last is in.
            await obstore.put_async(
                self.store,
                key,
                path,
                chunk_size=PART_BYTES,
                max_concurrency=PART_CONCURRENCY,
            )
        except Exception as exc:
            raise _storage_error("write", key, exc) from exc
        path.unlink(missing_ok=True)

    async def rename(self, source: str, target: str) -> None:
        import obstore

        try:
            await obstore.copy_async(self.store, source, target)
            await obstore.delete_async(self.store, source)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise _storage_error("write", target, exc) from exc

    async def delete(self, key: str) -> None:
        import obstore

        try:
            await obstore.delete_async(self.store, key)
        except FileNotFoundError:
            return
        except Exception as exc:
            raise _storage_error("delete", key, exc) from exc

    async def head(self, key: str) -> StoredObject | None:
        import obstore

        try:
            meta = await obstore.head_async(self.store, key)
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise _storage_error("read", key, exc) from exc
        return StoredObject(key, meta["size"], meta.get("e_tag"), meta.get("last_modified"))

    async def list(self, prefix: str) -> list[str]:
        import obstore

        try:
            listed = await obstore.list_with_delimiter_async(self.store, prefix)
        except Exception as exc:
            raise _storage_error("list", prefix, exc) from exc
        return [meta["path"] for meta in listed["objects"]]

    async def check(self) -> None:
        import obstore

        # A listing reaches the bucket with our credentials; a missing bucket fails here.
        try:
            await obstore.list_with_delimiter_async(self.store, "videos")
        except Exception as exc:
            raise _storage_error("list", "videos", exc) from exc

    async def read(
        self, key: str, start: int, end: int, etag: str | None = None, chunk: int = PART_BYTES
    ) -> AsyncIterator[bytes]:
        import obstore

        # If-Match: a video published again between the HEAD and this read is not spliced
        # into the old one's byte range.
        options: dict[str, object] = {"range": (start, end)}
        if etag:
            options["if_match"] = etag
        result = await obstore.get_async(self.store, key, options=options)  # type: ignore[arg-type]
        async for data in result.stream(min_chunk_size=chunk):
            yield bytes(data)

    async def presign(self, key: str, expires_in: timedelta) -> str | None:
        import obstore

        return await obstore.sign_async(self.store, "GET", key, expires_in)


def _storage_error(action: str, key: str, exc: Exception) -> StorageError:
    # obstore's messages carry the whole request (URLs, the bucket's layout): only the S3
    # error's code and message, or the kind of failure, are for a reader.
    text = str(exc)
    code = re.search(r"<Code>([^<]{1,64})</Code>", text)
    message = re.search(r"<Message>([^<]{1,200})</Message>", text)
    if code:
        reason = f"{code[1]}: {message[1]}" if message else code[1]
    elif "error sending request" in text or "Connect" in text:
        reason = "the storage server cannot be reached"
    elif isinstance(exc, PermissionError):
        reason = "access denied"
    else:
        reason = type(exc).__name__
    name = key.rsplit("/", 1)[-1]
    return StorageError(
        f"Could not {action} {name} in storage ({reason})", code[1] if code else None
    )


def storage_for(settings: Settings) -> Storage:
    if settings.video_storage_url:
        return S3Storage(
            settings.video_storage_url, settings.s3_endpoint_url, settings.data_dir / "scratch"
        )
    return LocalStorage(settings.data_dir)
