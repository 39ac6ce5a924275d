"""Exactly-once output folders: a job writes into a hidden staging folder and renames it when complete.

A reader therefore sees either no folder or a complete one with its `_SUCCESS.json`. A crashed run
leaves only the staging folder, which the next run of the same job deletes before starting cleanly.
A finished folder whose `_SUCCESS.json` carries the same job key means there is nothing to do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SUCCESS = "_SUCCESS.json"


class OutputExists(RuntimeError):
    """The output folder holds the result of a different job; we never overwrite it."""


def job_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def file_identity(paths: list[Path]) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of each input: a changed input file makes a new job key."""
    return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]


@dataclass(frozen=True)
class StagedOutput:
    final: Path
    key: str

    @property
    def staging(self) -> Path:
        return self.final.with_name(f".{self.final.name}.staging")

    def finished(self) -> dict | None:
        """The success record if `final` already holds this job's output; raise if it holds another's."""
        marker = self.final / SUCCESS
        if not self.final.exists():
            return None
        record = json.loads(marker.read_text()) if marker.exists() else {}
        if record.get("job_key") != self.key:
            raise OutputExists(f"{self.final} already exists and holds a different job's output "
                               f"(job key {record.get('job_key')}, this job {self.key}); choose another folder")
        return record

    def begin(self) -> Path:
        """A clean, empty staging folder (leftovers of a crashed run are removed)."""
        if self.staging.exists():
            logger.warning("removing the leftovers of an unfinished run in %s", self.staging)
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True)
        return self.staging

    def commit(self, record: dict) -> Path:
        """Write the success record and make the folder visible in one rename."""
        (self.staging / SUCCESS).write_text(json.dumps({**record, "job_key": self.key}, indent=2, default=str))
        self.final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.staging, self.final)
        return self.final
