"""`python -m local_replicate`: run the local render server until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from pathlib import Path

import uvicorn

from .config import ConfigError, ServerConfig
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
    ap.add_argument(
        "--webhook-secret",
        help="whsec_... signing secret (default: a random one kept in DATA_DIR/webhook-secret)",
    )
    ap.add_argument("--start-delay", type=float, default=0.5, help="seconds in `starting`")
    ap.add_argument(
        "--render-seconds",
        "--min-processing",
        dest="min_processing",
        type=float,
        default=0.0,
        help="each prediction stays `processing` at least this long (a timer, not a render"
        " thread: e.g. 20 for benchmarks)",
    )
    ap.add_argument("--retention-seconds", type=float, default=3600.0)
    ap.add_argument(
        "--admin",
        action="store_true",
        help="serve /_admin/* (fault injection, stats, reset): for tests and benchmarks only",
    )
    ap.add_argument(
        "--create-limit-per-minute",
        type=int,
        help="accept at most this many creates in any 60 s, then 429 (default: no limit)",
    )
    ap.add_argument(
        "--pose",
        help="comma-separated owner/name of real models to pose as, from their stored schemas"
        " (default: every stored schema; '' for none)",
    )
    ap.add_argument(
        "--schemas-dir",
        type=Path,
        help="where the stored schemas (<owner>__<name>.json) are (default: backend/model_schemas)",
    )
    ap.add_argument(
        "--clip-max-height",
        type=int,
        help="scale clips down to at most this height (default: the size the input asks for)",
    )
    ap.add_argument("--render-workers", type=int, default=2, help="render threads")
    ap.add_argument(
        "--webhook-retry-delays",
        default="1,2,4,8,16,30",
        help="comma-separated seconds between retries of the completed webhook",
    )
    ap.add_argument("--log-level", default="warning")
    return ap.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    delays = tuple(float(x) for x in args.webhook_retry_delays.split(",") if x.strip())
    pose = None
    if args.pose is not None:
        pose = tuple(name.strip() for name in args.pose.split(",") if name.strip())
    config = ServerConfig(
        data_dir=args.data_dir,
        public_url=args.public_url,
        token=args.token,
        webhook_secret=args.webhook_secret,
        start_delay=args.start_delay,
        min_processing=args.min_processing,
        retention_seconds=args.retention_seconds,
        webhook_retry_delays=delays,
        render_workers=args.render_workers,
        admin=args.admin,
        create_limit_per_minute=args.create_limit_per_minute,
        pose=pose,
        schemas_dir=args.schemas_dir,
        clip_max_height=args.clip_max_height,
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
    except (DataDirError, ConfigError) as exc:
        print(f"python -m local_replicate: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
