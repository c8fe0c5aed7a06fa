"""Predictions kept on disk, one small JSON file each, so they outlive a restart of the server.

Layout under the server's data dir:

  predictions/{id}.json    a prediction's record (Prediction.to_record), rewritten atomically
                           (temporary file + os.replace) on every change of its state
  predictions/_state.json  {"next_seq": N}, written by a reset, so list cursors handed out before
                           the reset cannot match predictions created after a restart
  {id}.mp4                 the output files, as before
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("local_replicate")

RECORD_NAME = re.compile(r"^([a-z0-9]{1,64})\.json$")
STATE_FILE = "_state.json"


class DataDirError(RuntimeError):
    """The data dir is missing or unusable; raised when the app is created."""


class PredictionStore:
    def __init__(self, data_dir: Path | str | None) -> None:
        if data_dir is None or str(data_dir).strip() == "":
            raise DataDirError(
                "local_replicate needs a data dir (ServerConfig.data_dir, --data-dir): it keeps"
                " the predictions and their output files there"
            )
        self.data_dir = Path(data_dir)
        self.directory = self.data_dir / "predictions"

    def open(self) -> None:
        """Create the directory and prove it is writable, or raise DataDirError."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._write(self.directory / ".write-check", "ok")
            (self.directory / ".write-check").unlink()
        except OSError as exc:
            raise DataDirError(
                f"local_replicate cannot keep predictions in the data dir {self.data_dir}:"
                f" {self.directory} is not a writable directory ({exc})"
            ) from exc

    def _write(self, path: Path, text: str) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def save(self, record: dict[str, Any]) -> None:
        """Write one prediction's record; a failure is logged, not raised (the server goes on)."""
        try:
            self._write(self.directory / f"{record['id']}.json", json.dumps(record))
        except (OSError, TypeError, ValueError):
            log.exception("could not persist prediction %s", record.get("id"))

    def load(self) -> tuple[list[dict[str, Any]], int]:
        """Every readable record, and the lowest sequence number a new prediction may take."""
        records: list[dict[str, Any]] = []
        next_seq = 1
        for path in sorted(self.directory.iterdir()):
            if path.name.endswith(".tmp"):  # left by a process killed mid-write
                path.unlink(missing_ok=True)
                continue
            if path.name == STATE_FILE:
                try:
                    next_seq = max(next_seq, int(json.loads(path.read_text())["next_seq"]))
                except (OSError, ValueError, KeyError, TypeError):
                    log.warning("ignoring unreadable %s", path)
                continue
            match = RECORD_NAME.match(path.name)
            if not match:
                continue
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                log.warning("ignoring unreadable prediction file %s", path)
                continue
            if not isinstance(record, dict) or record.get("id") != match.group(1):
                log.warning("ignoring prediction file %s: not a prediction record", path)
                continue
            records.append(record)
        return records, next_seq

    def clear(self, next_seq: int) -> None:
        """Remove every persisted prediction, remembering where the sequence numbers got to."""
        for path in self.directory.iterdir():
            if path.is_file():
                path.unlink(missing_ok=True)
        try:
            self._write(self.directory / STATE_FILE, json.dumps({"next_seq": next_seq}))
        except OSError:
            log.exception("could not record the prediction counter")
