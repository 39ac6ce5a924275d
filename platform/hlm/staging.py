"""Exactly-once output folders: a job writes into a hidden staging folder and renames it when complete.

A reader therefore sees either no folder or a complete one with its `_SUCCESS.json`. A crashed run
leaves only the staging folder, which the next run of the same job deletes before starting cleanly.
A finished folder whose `_SUCCESS.json` carries the same job key means there is nothing to do.

One run at a time per output: `begin` takes an exclusive `flock` on a hidden lock file beside the output and
holds it until `commit` or `release`; the kernel drops it when the process dies, so a crashed run never blocks
the next one, while a live one makes a second run fail fast instead of deleting its staging folder. Every file,
the staging folder and the parent are fsync'd around the rename, so a power loss cannot publish empty files.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

SUCCESS = "_SUCCESS.json"


class OutputExists(RuntimeError):
    """The output folder holds the result of a different job; we never overwrite it."""


class OutputBusy(RuntimeError):
    """Another live run is writing the same output folder."""


def job_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def file_identity(paths: list[Path]) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of each input: a changed input file makes a new job key."""
    return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]


@dataclass
class StagedOutput:
    final: Path
    key: str
    _lock_fd: int | None = field(default=None, init=False, repr=False)

    @property
    def staging(self) -> Path:
        return self.final.with_name(f".{self.final.name}.staging")

    @property
    def lock_file(self) -> Path:
        return self.final.with_name(f".{self.final.name}.lock")

    def record(self) -> dict | None:
        """The success record in `final`, whichever job wrote it; None when there is no finished output."""
        marker = self.final / SUCCESS
        return json.loads(marker.read_text()) if marker.exists() else None

    def finished(self) -> dict | None:
        """The success record if `final` already holds this job's output; raise if it holds another's."""
        if not self.final.exists():
            return None
        record = self.record() or {}
        if record.get("job_key") != self.key:
            raise OutputExists(f"{self.final} already exists and holds a different job's output "
                               f"(job key {record.get('job_key')}, this job {self.key}); choose another folder")
        return record

    def begin(self, create: bool = True) -> Path:
        """Take the output's lock, then give a clean staging path (a dead run's leftovers are removed): an empty
        folder, or with ``create=False`` only its parent, for a writer that makes the folder itself."""
        self.lock()
        if self.staging.exists():
            logger.warning("removing the leftovers of an unfinished run in %s", self.staging)
            shutil.rmtree(self.staging)
        self.staging.parent.mkdir(parents=True, exist_ok=True)
        if create:
            self.staging.mkdir()
        return self.staging

    def commit(self, record: dict, replace: bool = False) -> Path:
        """Write the success record, make everything durable, and make the folder visible in one rename; with
        ``replace``, an older output in `final` is moved aside first and stays whole until the new one is in place."""
        self.staging.mkdir(parents=True, exist_ok=True)
        (self.staging / SUCCESS).write_text(json.dumps({**record, "job_key": self.key}, indent=2, default=str))
        _fsync_tree(self.staging)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        old = self.final.with_name(f".{self.final.name}.old")
        if replace:
            shutil.rmtree(old, ignore_errors=True)
            if self.final.exists():
                os.rename(self.final, old)
        os.rename(self.staging, self.final)
        _fsync(self.final.parent)  # the rename itself
        shutil.rmtree(old, ignore_errors=True)
        self.release()
        return self.final

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def lock(self) -> None:
        """Take the output's exclusive lock (kept until commit or release); OutputBusy if a live run holds it."""
        if self._lock_fd is not None:
            return
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputBusy(f"another run is writing {self.final} (it holds {self.lock_file}); wait for it to "
                             "finish or choose another output folder") from None
        self._lock_fd = fd


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Every file, then every folder bottom-up, so each directory entry points at durable data."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))
