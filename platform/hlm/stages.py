"""Cached stages: a multi-step job whose every step writes one folder exactly once, keyed by what it read.

A `Stage` names its output folder, the settings its output depends on, the input files it reads and the
stages it builds on. Its *key* hashes those settings, the inputs' identity (path, size, mtime) and the keys of
the stages it builds on, so a change anywhere upstream changes every key downstream of it and nowhere else.
`run_stages` walks the stages:

- the folder holds a `_SUCCESS.json` with the stage's key → **skipped**, nothing runs;
- otherwise the stage **runs** into a fresh hidden staging path and that path replaces the folder in one
  rename: a reader sees the old complete output or the new one, never a half-written one. A stage killed
  mid-run leaves only the staging path, which the next run removes before it starts; a stage that keeps its
  own resume state (a Ray Train run named after the key) picks up where it stopped. Staging, lock and rename
  are `hlm.staging.StagedOutput`'s, as for every job output: one live run per folder, fsync'd before it shows.

The given order must list every stage after the stages it builds on. With ``parallel`` > 1, up to that many stages
whose upstream stages are done run at once, each in a thread of this process: a stage's work is a Ray job on the
cluster (a Ray Train run, a Ray Data job), so a cluster with room for several of them runs independent branches
(the baselines beside the students, one depth's refine beside another's) side by side. A stage that fails stops new
ones from starting; those already running finish and keep their output, and the first error is raised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hlm.staging import StagedOutput, file_identity, job_key

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    name: str  # also the output folder, relative to the job's root
    run: Callable[[Path, dict[str, str]], dict[str, Any]]  # (fresh output path, every stage's key) -> record
    settings: dict[str, Any] = field(default_factory=dict)  # JSON-able: what the output depends on
    inputs: tuple[Path, ...] = ()  # files read (not produced by a stage)
    after: tuple[str, ...] = ()  # stages whose outputs it reads

    def key(self, upstream: dict[str, str]) -> str:
        missing = [s for s in self.after if s not in upstream]
        if missing:
            raise ValueError(f"stage {self.name} runs after {missing}, which come later or not at all")
        return job_key({"stage": self.name, "settings": self.settings, "inputs": file_identity(list(self.inputs)),
                        "after": {s: upstream[s] for s in self.after}})


@dataclass
class StageResult:
    name: str
    status: str  # "skipped" (already done) | "ran"
    seconds: float
    folder: Path
    key: str
    record: dict[str, Any]


def run_stages(stages: Sequence[Stage], root: Path, parallel: int = 1) -> list[StageResult]:
    """Run what is not done yet, up to `parallel` stages at once; returns one result per stage, in the given order
    (the stage table). With `parallel` 1 every stage runs in the calling thread, one after the other."""
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique: {names}")
    if parallel < 1:
        raise ValueError(f"parallel must be at least 1, got {parallel}")
    keys: dict[str, str] = {}
    for stage in stages:  # a key needs only the keys upstream, so all are known before anything runs
        keys[stage.name] = stage.key(keys)
    if parallel == 1:  # in the calling thread: Ray Train handles Ctrl-C only in the main thread
        return [_run_stage(stage, root, keys) for stage in stages]
    results: dict[str, StageResult] = {}
    waiting, running = list(stages), {}
    error: BaseException | None = None
    with ThreadPoolExecutor(parallel, thread_name_prefix="stage") as pool:
        while waiting or running:
            ready = [s for s in waiting if all(a in results for a in s.after)] if error is None else []
            for stage in ready[:parallel - len(running)]:
                waiting.remove(stage)
                running[pool.submit(_run_stage, stage, root, keys)] = stage
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                stage = running.pop(future)
                try:
                    results[stage.name] = future.result()
                except BaseException as e:  # noqa: BLE001 - re-raised once the running stages are done
                    error = error or e
    if error is not None:
        raise error
    return [results[name] for name in names]


def _run_stage(stage: Stage, root: Path, keys: dict[str, str]) -> StageResult:
    key = keys[stage.name]
    out = StagedOutput(root / stage.name, key)
    if (record := out.record()) is not None and record.get("job_key") == key:
        logger.info("stage %s: done already (%s)", stage.name, out.final)
        return StageResult(stage.name, "skipped", 0.0, out.final, key, record)
    logger.info("stage %s: running (key %s)", stage.name, key)
    started = time.perf_counter()
    staging = out.begin(create=False)  # the stage makes its folder (an embed or train job's own output)
    try:
        record = _relocated(stage.run(staging, dict(keys)), staging, out.final)
    except BaseException:
        out.release()
        raise
    record = {**record, "job_key": key, "seconds": round(time.perf_counter() - started, 1)}
    out.commit(record, replace=True)  # the old output stays whole until the new one is in place
    return StageResult(stage.name, "ran", record["seconds"], out.final, key, record)


def _relocated(record: Any, staging: Path, folder: Path) -> Any:
    """The record with paths into the staging folder pointing where the output will live after the rename."""
    if isinstance(record, dict):
        return {k: _relocated(v, staging, folder) for k, v in record.items()}
    if isinstance(record, list | tuple):
        return [_relocated(v, staging, folder) for v in record]
    if isinstance(record, str | Path) and str(record).startswith(str(staging)):
        return str(folder) + str(record)[len(str(staging)):]
    return record


def stage_table(results: Sequence[StageResult]) -> str:
    """The table a job prints: stage, what happened, how long, where it wrote."""
    width = max([len(r.name) for r in results] + [5])
    lines = [f"{'stage':<{width}}  {'status':<7}  {'seconds':>8}  output"]
    lines += [f"{r.name:<{width}}  {r.status:<7}  {r.seconds:>8.1f}  {r.folder}" for r in results]
    return "\n".join(lines)
