"""The worker's memory bounds that are not timings: glibc's malloc arenas are capped before
any thread starts (each thread would otherwise keep an arena of freed memory of its own)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from processes import run_script

ROOT = Path(__file__).resolve().parent.parent

# Starts threads that each allocate, as the worker's executors and Temporal's runtime do,
# and counts the heaps glibc's malloc_info reports.
PROBE = """
import ctypes, sys, threading
import worker
capped = worker.limit_malloc_arenas(int(sys.argv[1]))
together = threading.Barrier(8)
def work():
    blocks = [bytearray(4096) for _ in range(100)]
    together.wait()  # all alive at once, as a worker's threads are
threads = [threading.Thread(target=work) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
out = libc.fopen(sys.argv[2].encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(out))
libc.fclose(ctypes.c_void_p(out))
print(capped)
"""


def heaps(tmp_path: Path, arenas: int, **env: str) -> tuple[bool, int]:
    info = tmp_path / f"malloc-{arenas}.xml"
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | env
    done = run_script(PROBE, str(arenas), str(info), cwd=ROOT, env=environ)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip() == "True", info.read_text().count("<heap nr=")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc arenas")
def test_the_worker_caps_malloc_arenas_before_its_threads_start(tmp_path: Path) -> None:
    # Without the cap each of the eight threads gets an arena of its own (up to 8 a core).
    capped, uncapped_heaps = heaps(tmp_path, 0)
    assert not capped and uncapped_heaps > 3
    assert heaps(tmp_path, 2) == (True, 2)
    # An operator's MALLOC_ARENA_MAX wins: glibc applied it, the setting stays out of the way.
    assert heaps(tmp_path, 2, MALLOC_ARENA_MAX="3") == (False, 3)
