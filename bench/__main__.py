"""`python -m bench [name ...]`: runs the benchmarks (all by default), one process each, then
writes bench/RESULTS.md from every result in bench/results/."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from .common import ROOT
from .report import write_report

# In the order they run; each is also `python -m bench.<name>` on its own.
BENCHES = {
    "orchestration": "Orchestration overhead against a bare chain of seven no-op activities",
    "in_flight": "1,000 renders in flight against a thread-per-job poller",
    "download": "Downloading a 1 GiB MP4 against curl",
    "rendering": "The local slideshow render against the ffmpeg command line",
    "api": "GET /api/v2/jobs/{id} under load against a bare FastAPI endpoint",
    "stitching": "Stitching scene clips against the ffmpeg command line",
    "scenes": "Per-scene rendering: parallel scenes, held-down creates, edits",
    "fairness": "Fair shares: one tenant's backlog against another's job",
    "many_hosts": "Many hosts: throughput with 1, 2 and 3 workers behind 2 APIs",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "names",
        nargs="*",
        choices=[[], *BENCHES],
        metavar="name",
        help=f"any of: {', '.join(BENCHES)} (default: all)",
    )
    args = parser.parse_args(argv)
    names = args.names or list(BENCHES)
    failed: list[str] = []
    t0 = time.monotonic()
    for name in names:
        # A process per benchmark: one's threads, memory and event loop never touch another's.
        code = subprocess.call([sys.executable, "-m", f"bench.{name}"], cwd=ROOT)
        if code != 0:
            failed.append(f"{name} (exit {code})")
    path = write_report()
    print(f"\nWrote {path.relative_to(ROOT)} in {time.monotonic() - t0:.0f} s in all", flush=True)
    if failed:
        print(f"Failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
