#!/usr/bin/env python3
"""Bootstrap for a fresh machine with only python3.

    python3 dev.py demo    render the sample storyboard end to end on the embedded local stack
    python3 dev.py test    run the whole test suite
    python3 dev.py dev     run the local stack in the foreground (Ctrl-C stops it)
    python3 dev.py bench   run every benchmark (or `bench NAME ...`) and write bench/RESULTS.md

Creates `.venv` and installs the project into it on first use (again when pyproject.toml
changes), then runs the command inside it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
STAMP = VENV / ".installed-from"


# What each command needs beyond the runtime: the demo and the dev stack need nothing more,
# so a first `demo` installs no test or benchmark tools.
EXTRAS = {"demo": (), "dev": (), "test": ("test",), "bench": ("test", "bench")}


def ensure_venv(extras: tuple[str, ...]) -> None:
    """Creates .venv and installs the project with `extras`, unless pyproject.toml is unchanged
    since an install that had them all (the stamp records what was installed)."""
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    installed: set[str] = set()
    if STAMP.exists():
        recorded_digest, _, recorded = STAMP.read_text().partition(" ")
        if recorded_digest == digest:
            installed = {name for name in recorded.split(",") if name}
            if set(extras) <= installed:
                return
    wanted = sorted(installed | set(extras))
    if not (BIN / "python").exists():
        print("Creating .venv ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    what = f" and its {', '.join(wanted)} tools" if wanted else ""
    print(f"Installing the project{what} into .venv ...", flush=True)
    target = f"{ROOT}[{','.join(wanted)}]" if wanted else str(ROOT)
    subprocess.run(
        [
            str(BIN / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-e",
            target,
        ],
        check=True,
    )
    STAMP.write_text(f"{digest} {','.join(wanted)}")


def ensure_postgres() -> None:
    """The store tests also run on PostgreSQL; start the machine's cluster if it is down."""
    if os.environ.get("TEST_POSTGRES_URL"):
        return
    with socket.socket() as sock:
        sock.settimeout(1)
        if sock.connect_ex(("127.0.0.1", 5432)) == 0:
            return
    clusters = Path("/etc/postgresql")
    if shutil.which("pg_ctlcluster") and clusters.is_dir():
        for version in sorted(p.name for p in clusters.iterdir()):
            print(f"Starting PostgreSQL {version} ...", flush=True)
            subprocess.run(
                ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
                check=False,
            )


def main() -> int:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    rest = sys.argv[2:]
    if command not in {"demo", "test", "dev", "bench"}:
        print(__doc__)
        return 2
    ensure_venv(EXTRAS[command])
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    os.chdir(ROOT)
    if command == "test":
        ensure_postgres()
        rest = rest or ["-q"]
        # The suite mostly waits on servers and subprocesses: three pytest workers (xdist)
        # finish it in about half the time on two cores. `-n 0` runs it in one process.
        if not any(a.startswith(("-n", "--numprocesses")) or a == "no:xdist" for a in rest):
            rest = ["-n", os.environ.get("TEST_WORKERS", "3"), *rest]
        args = [str(BIN / "python"), "-m", "pytest", *rest]
    elif command == "bench":
        args = [str(BIN / "python"), "-m", "bench", *rest]
    else:
        args = [str(BIN / "render-video"), command, *rest]
    child = subprocess.Popen(args, env=env)
    # Ctrl-C reaches the child too (same process group); it shuts its stack down and exits,
    # so this wrapper only waits for it. SIGTERM is passed on.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, _frame: child.send_signal(signum))
    return child.wait()


if __name__ == "__main__":
    sys.exit(main())
