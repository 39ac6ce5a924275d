"""The nightly index refresh: diff the catalogue against the last published version, embed only what changed, gate.

State lives in run folders: ``work_dir/<run>/`` holds ``embeddings/`` (the full set, space in its metadata),
``text_hashes.parquet`` (ad_id, sha256 of the text) and ``run.json`` (the run record). The published
manifest's ``source`` is that folder, so the next run reads its previous state from
``IndexStore.manifest(current)["source"]`` (a rollback therefore also rolls back the diff base). With no
published version, or a source folder without this state, everything is embedded. Embedding is injected
(``pipelines.refresh_index`` passes Ray Data's ``run_embed``), so this module never imports Ray.

A run is a sequence of steps, each a function with typed inputs and outputs: read the catalogue and the
previous state → plan (diff) → guard against shrinkage → embed what changed → build → gate → publish. It holds
the index's lease in Redis throughout, and publishes compare-and-set against the version it started from, so
an overlapping run or an operator's rollback is never overwritten. A run that changes nothing publishes nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hlm.config import Config, ConfigError, RefreshJob
from hlm.data import (
    qrels_from_labels,
    read_embeddings,
    read_labels,
)
from hlm.embedding import input_files, validate_inputs
from hlm.encoder import space_of
from hlm.evaluation import retrieval_quality
from hlm.gate import GateResult, ann_recall, gate
from hlm.index import AdIndex
from hlm.lease import Lease
from hlm.metrics import PRIMARY_K, PRIMARY_METRIC
from hlm.redis_client import redis_client
from hlm.refresh_state import Diff, State, diff, load_state, merge_embeddings, save_state, text_hashes
from hlm.store import IndexStore, StoreError, new_version
from hlm.stream_fold import fold, last_events, stream_position

logger = logging.getLogger(__name__)
EmbedFn = Callable[[Path, str, Path], Path]  # (input Parquet, "ads" | "queries", output folder) -> output folder
EXIT_CODES = {"published": 0, "unchanged": 0, "refused": 1, "error": 2}
T = TypeVar("T")


@dataclass(frozen=True)
class Previous:
    """The serving version the run starts from (the publish is compare-and-set against it) and its state."""

    version: str | None
    manifest: dict | None
    state: State | None

    def describe(self) -> dict:
        return {"version": self.version, "source": self.manifest and self.manifest.get("source"),
                "state": "none published" if not self.version else "found" if self.state else "missing"}


@dataclass(frozen=True)
class Plan:
    hashes: dict[str, str]  # ad_id -> text hash of every ad the new version holds, catalogue order
    diff: Diff
    kept: dict[str, str]  # rejected rows whose ad keeps its previous version
    to_embed: pa.Table  # ad_id, text


@dataclass
class Record:
    """``run.json``: what the run did and why."""

    run: str
    index: str
    ads: str
    record: str
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    status: str = "error"  # published | unchanged | refused | error
    published_version: str | None = None
    why_not: str | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    previous: dict | None = None
    space: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    rejected: list[dict] = field(default_factory=list)  # the first 1000; all of them in rejected/rejected.parquet
    override: dict | None = None
    gate: dict | None = None
    gc_deleted: list[str] | None = None
    gc_error: str | None = None
    stream: dict | None = None  # the event stream position this version includes, and the events folded in
    finished_at: str | None = None

    def timed(self, name: str, step: Callable[..., T], *args, **kwargs) -> T:
        t = time.perf_counter()
        try:
            return step(*args, **kwargs)
        finally:
            self.timings_s[name] = round(time.perf_counter() - t, 3)


def read_catalogue(path: str | Path) -> tuple[pa.Table, pa.Table]:
    """(valid live rows: ad_id, text; rejected: _file, _row (position in its file), ad_id, _reason), by the rule the
    embed job applies (`hlm.embedding.split_rows`: deleted rows are dropped before validation)."""
    read = validate_inputs(path, "ads")
    return read.rows.rename_columns(["ad_id", "text"]), read.rejected.select(["_file", "_row", "ad_id", "_reason"])


def read_previous(store: IndexStore) -> Previous:
    version = store.current()
    manifest = store.manifest(version) if version else None
    source = manifest.get("source") if manifest else None
    return Previous(version, manifest, load_state(source) if source else None)


def plan(rows: pa.Table, rejected: pa.Table, previous: Previous) -> Plan:
    """Diff the catalogue against the previous state; a bad row never deletes its ad (its previous version stays
    until the row is fixed)."""
    prev_hashes = previous.state.hashes if previous.state else {}
    current = text_hashes(rows)
    kept = {a: prev_hashes[a] for a in rejected.column("ad_id").to_pylist() if a in prev_hashes and a not in current}
    d = diff(current | kept, prev_hashes)
    return Plan(current | kept, d, kept, rows.filter(pc.is_in(rows.column("ad_id"), pa.array(d.to_embed, pa.string()))))


def export_rows(path: str | Path) -> int:
    """Rows in every Parquet file of the export (live, deleted and rejected alike), from the footers."""
    return input_files(path, "ads").rows


def shrink_guard(job: RefreshJob, p: Plan, previous: Previous) -> list[str]:
    """Why this catalogue looks truncated rather than edited (empty when it does not): a valid export with files
    missing diffs most ads as deleted, and the recall gate then passes on the survivors."""
    why = []
    if job.expected_rows_file:
        marker = Path(job.expected_rows_file)
        try:
            expected = int(marker.read_text().strip())
        except (OSError, ValueError) as e:
            why.append(f"no readable row-count marker at {marker} ({type(e).__name__}: {e})")
        else:
            if (found := export_rows(job.ads)) != expected:
                why.append(f"the export {job.ads} holds {found} rows; its marker {marker} says {expected}")
    if previous.state and (published := len(previous.state.hashes)):
        deleted = len(p.diff.deleted)
        if deleted / published > job.max_deleted_fraction:
            why.append(f"{deleted} of {published} published ads ({deleted / published:.0%}) would be deleted, "
                       f"over refresh.max_deleted_fraction {job.max_deleted_fraction}")
    if previous.manifest and (published := previous.manifest["count"]):
        shrink = (published - len(p.hashes)) / published
        if shrink > job.max_shrink_fraction:
            why.append(f"the index would shrink from {published} to {len(p.hashes)} ads ({shrink:.0%}), over "
                       f"refresh.max_shrink_fraction {job.max_shrink_fraction}")
    return why


def embed_rows(rows: pa.Table, embed: EmbedFn, run_dir: Path) -> tuple[list[str], np.ndarray, dict]:
    pq.write_table(rows, run_dir / "to_embed.parquet")
    return read_embeddings(embed(run_dir / "to_embed.parquet", "ads", run_dir / "new_embeddings"))


def merge_state(p: Plan, previous: Previous, fresh: tuple[list[str], np.ndarray, dict] | None,
                run_dir: Path) -> State:
    """The new version's full embedding set (fresh vectors over previous ones), saved as this run's state."""
    prev = previous.state or State([], np.zeros((0, 0), np.float32), None, {})
    fresh_ids, fresh_emb, space = fresh or ([], np.zeros((0, 0), np.float32), prev.space)
    if prev.space is not None and space["fingerprint"] != prev.space["fingerprint"]:
        raise ValueError(f"previous state {previous.describe()['source']} is in space {prev.space['fingerprint']}, "
                         f"the fresh embeddings in {space['fingerprint']}: they cannot be merged")
    ids = list(p.hashes)
    state = State(ids, merge_embeddings(ids, (prev.ids, prev.emb), (fresh_ids, fresh_emb)), space, p.hashes)
    save_state(run_dir, state)
    return state


def build(state: State, job: RefreshJob, seed: int) -> AdIndex:
    return AdIndex.build(state.ids, state.emb, state.space["fingerprint"], job.factory, seed=seed, nprobe=job.nprobe,
                         ef_search=job.ef_search, k_factor=job.k_factor)


def check(index: AdIndex, state: State, previous: Previous, store: IndexStore, cfg: Config, embed: EmbedFn,
          run_dir: Path) -> GateResult:
    """The gate: ANN recall, and canary quality against the serving version when a canary set is configured."""
    job = cfg.refresh
    recall = ann_recall(index, state.emb, sample=job.recall_sample, seed=cfg.seed)
    quality = serving_quality = None
    if previous.version and job.canary_queries:
        q_ids, q_emb, _ = read_embeddings(embed(Path(job.canary_queries), "queries", run_dir / "canary_embeddings"))
        qrels = qrels_from_labels(read_labels(job.canary_labels))
        quality = retrieval_quality(index, q_emb, q_ids, qrels, ks=(PRIMARY_K,))[PRIMARY_METRIC]
        old = store.load(previous.version, expected_space=index.space)
        serving_quality = retrieval_quality(old, q_emb, q_ids, qrels, ks=(PRIMARY_K,))[PRIMARY_METRIC]
    return gate(new_space=index.space, serving_space=previous.manifest and previous.manifest["space"], recall=recall,
                min_recall=job.min_recall, quality=quality, serving_quality=serving_quality,
                max_quality_drop=job.max_quality_drop)


def refresh(cfg: Config, embed: EmbedFn) -> dict:
    """One run; returns its record (also in ``work_dir/<run>/run.json``). Status: published | unchanged | refused."""
    job = cfg.refresh
    if not job.ads:
        raise ConfigError("refresh.ads: the ad catalogue (Parquet file or folder) is required")
    run = new_version()
    run_dir = Path(job.work_dir) / run
    run_dir.mkdir(parents=True)
    rec = Record(run=run, index=job.index, ads=job.ads, record=str(run_dir / "run.json"))
    try:
        store = IndexStore(redis_client(job.redis_url), job.index, keep=job.keep_versions)
        with Lease(store.client, store.lease_key, owner=f"refresh run {run}", ttl_s=job.lease_s) as lease:
            _steps(cfg, embed, store, lease, run_dir, rec)
    except (ValueError, StoreError) as e:  # bad data or config, Redis down, another run: say why, publish nothing
        rec.why_not = f"{type(e).__name__}: {e}"
    except BaseException as e:
        rec.why_not = f"crashed: {type(e).__name__}: {e}"
        raise
    finally:
        rec.finished_at = datetime.now(UTC).isoformat()
        (run_dir / "run.json").write_text(json.dumps(asdict(rec), indent=2, default=str))
    return asdict(rec)


def _steps(cfg: Config, embed: EmbedFn, store: IndexStore, lease: Lease, run_dir: Path, rec: Record) -> None:
    job = cfg.refresh
    position = stream_position(store.client, job.index)  # before the catalogue: events up to it are folded in
    rows, rejected = rec.timed("read_catalogue", read_catalogue, job.ads)
    events = rec.timed("read_stream", last_events, store.client, job.index, position)
    rows, rejected = fold(rows, rejected, events)
    rec.stream = {"position": position, "ads_with_events": len(events)}
    previous = rec.timed("previous_state", read_previous, store)
    rec.previous, rec.space = previous.describe(), space_of(cfg.teacher)
    p = plan(rows, rejected, previous)
    _record_plan(rec, p, rejected, run_dir)
    if not p.hashes:
        raise ValueError(f"{job.ads}: no valid ads; refusing to publish an empty index")
    if previous.version and previous.manifest["space"] != rec.space:  # a teacher change: refuse before embedding
        result = gate(new_space=rec.space, serving_space=previous.manifest["space"], recall=None,
                      min_recall=job.min_recall)
        rec.status, rec.gate, rec.why_not = "refused", asdict(result), result.reason
        return
    if why := shrink_guard(job, p, previous):
        message = "; ".join(why) + " (a truncated export? if intended, rerun with refresh.override_shrink_guard=REASON)"
        if not job.override_shrink_guard:
            rec.status, rec.why_not = "refused", message
            return
        rec.override = {"reason": job.override_shrink_guard, "overridden": message}
        logger.warning("refresh %s: shrink guard overridden (%s): %s", rec.run, job.override_shrink_guard, message)
    if previous.version and not (p.diff.new or p.diff.changed or p.diff.deleted):
        rec.status, rec.why_not = "unchanged", f"nothing changed since version {previous.version}; nothing published"
        return
    fresh = rec.timed("embed", embed_rows, p.to_embed, embed, run_dir) if p.to_embed.num_rows else None
    rec.counts["embedded"] = len(fresh[0]) if fresh else 0
    state = rec.timed("merge_and_save", merge_state, p, previous, fresh, run_dir)
    index = rec.timed("build_index", build, state, job, cfg.seed)
    result = rec.timed("gate", check, index, state, previous, store, cfg, embed, run_dir)
    rec.gate = asdict(result)
    if not result.passed:
        rec.status, rec.why_not = "refused", result.reason
        return
    if not lease.held():
        raise StoreError(f"lost the lease {store.lease_key} (a pause longer than refresh.lease_s {job.lease_s}); "
                         "another run may be publishing, so this one does not")
    rec.published_version = rec.timed("publish", store.publish, index, source=str(run_dir.resolve()), version=rec.run,
                                      based_on=previous.version,
                                      extra={"stream_position": position, "stream_previous": previous.version})
    rec.status = "published"
    try:  # the publish stands even when cleaning up old versions fails
        rec.gc_deleted = store.gc()
    except StoreError as e:
        rec.gc_error = str(e)


def _record_plan(rec: Record, p: Plan, rejected: pa.Table, run_dir: Path) -> None:
    rec.counts = {"active": len(p.hashes), "new": len(p.diff.new), "changed": len(p.diff.changed),
                  "deleted": len(p.diff.deleted), "reused": len(p.diff.unchanged), "embedded": 0,
                  "rejected": rejected.num_rows, "rejected_kept_previous": len(p.kept)}
    rec.rejected = [{"file": r["_file"], "row": r["_row"], "ad_id": r["ad_id"], "reason": r["_reason"],
                     "action": "kept the previous version" if r["ad_id"] in p.kept else
                     "indexed its first row" if r["ad_id"] in p.hashes else "not indexed"}
                    for r in rejected.to_pylist()[:1000]]
    if rejected.num_rows:
        (run_dir / "rejected").mkdir()
        pq.write_table(rejected, run_dir / "rejected" / "rejected.parquet")
