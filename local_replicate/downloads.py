"""Whole-file output downloads that know whether the client got to the end, optionally paced."""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Callable
from typing import BinaryIO

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

CHUNK = 64 * 1024
# a paced transfer sends at least this many chunks a second, so it looks steady to the client
CHUNKS_PER_SECOND = 20


class OutputDownload(Response):
    """Streams an open file with a 200, spreading it evenly over `delay` seconds (0: at once).

    `on_end(completed)` is called once: True when the last byte was handed to the server, False
    when the client disconnected first (or the transfer was cancelled). The transfer stops as soon
    as the server reports the disconnect, even in the middle of a pause.
    """

    def __init__(self, file: BinaryIO, delay: float, on_end: Callable[[bool], None]) -> None:
        self.file = file
        self.size = os.fstat(file.fileno()).st_size
        ticks = max(1, math.ceil(delay * CHUNKS_PER_SECOND))
        self.chunk_size = max(1, min(CHUNK, math.ceil(self.size / ticks)))
        self.chunks = max(1, math.ceil(self.size / self.chunk_size))
        self.interval = delay / self.chunks
        self.on_end = on_end
        super().__init__(
            media_type="video/mp4",
            headers={"content-length": str(self.size), "accept-ranges": "bytes"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.create_task(self._stream(send))
        watch = asyncio.create_task(until_disconnect(receive))
        completed = False
        try:
            # the server also reports a disconnect once the response is complete, so a finished
            # stream decides; a disconnect first cancels the stream, even one stuck in a send
            await asyncio.wait({stream, watch}, return_when=asyncio.FIRST_COMPLETED)
            if stream.done():
                completed = stream.result()
        finally:
            for task in (stream, watch):
                task.cancel()
            await asyncio.gather(stream, watch, return_exceptions=True)
            self.file.close()
            self.on_end(completed)

    async def _stream(self, send: Send) -> bool:
        loop = asyncio.get_running_loop()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            started = loop.time()
            for i in range(self.chunks):
                chunk = await asyncio.to_thread(self.file.read, self.chunk_size)
                # paced against the start, so slow reads or sends do not stretch the transfer
                await asyncio.sleep(max(0.0, started + (i + 1) * self.interval - loop.time()))
                more = i < self.chunks - 1
                await send({"type": "http.response.body", "body": chunk, "more_body": more})
        except OSError:  # ASGI 2.4 servers raise on a send to a client that has gone
            return False
        return True


async def until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
