"""`python -m local_replicate`: run the local render server until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from pathlib import Path

import uvicorn

from .config import DEFAULT_WEBHOOK_SECRET, ServerConfig
from .server import create_app
from .store import DataDirError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m local_replicate", description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5055, help="0 picks a free port")
    ap.add_argument(
        "--data-dir",
        type=Path,
        required=True,
        help="where predictions (predictions/*.json) and output MP4s are kept across restarts",
    )
    ap.add_argument("--public-url", help="base URL for absolute URLs (default: from the request)")
    ap.add_argument("--token", help="accept only this bearer token (default: any non-empty)")
    ap.add_argument("--webhook-secret", default=DEFAULT_WEBHOOK_SECRET)
    ap.add_argument("--start-delay", type=float, default=0.5)
    ap.add_argument("--min-processing", type=float, default=0.0)
    ap.add_argument("--retention-seconds", type=float, default=3600.0)
    ap.add_argument(
        "--webhook-retry-delays",
        default="1,2,4,8,16,30",
        help="comma-separated seconds between retries of the completed webhook",
    )
    ap.add_argument("--log-level", default="warning")
    return ap.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    delays = tuple(float(x) for x in args.webhook_retry_delays.split(",") if x.strip())
    config = ServerConfig(
        data_dir=args.data_dir,
        public_url=args.public_url,
        token=args.token,
        webhook_secret=args.webhook_secret,
        start_delay=args.start_delay,
        min_processing=args.min_processing,
        retention_seconds=args.retention_seconds,
        webhook_retry_delays=delays,
    )
    app = create_app(config)  # before binding: an unusable data dir fails here
    # proto IPPROTO_TCP, inherited by accepted sockets, is what makes asyncio set TCP_NODELAY;
    # with proto 0 every response pays a ~40 ms Nagle/delayed-ACK stall
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level))

    async def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.02)
        print(f"local render server on http://{host}:{port}", flush=True)

    announcer = asyncio.create_task(announce())
    try:
        await server.serve(sockets=[sock])
    finally:
        announcer.cancel()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # uvicorn re-raises the stop signal after a graceful shutdown with the handler that was
    # installed before it started; a no-op one makes SIGTERM/SIGINT end with exit status 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        asyncio.run(serve(args))
    except DataDirError as exc:
        print(f"python -m local_replicate: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
