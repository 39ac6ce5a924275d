"""The nightly index refresh: diff the catalogue against the last published version, embed only what changed, gate.

State lives in run folders: ``work_dir/<run>/`` holds ``embeddings/`` (the full set, space in its metadata),
``text_hashes.parquet`` (ad_id, sha256 of the text) and ``run.json`` (the run record). The published
manifest's ``source`` is that folder, so the next run reads its previous state from
``IndexStore.manifest(current)["source"]`` (a rollback therefore also rolls back the diff base). With no
published version, or a source folder without this state, everything is embedded. Publishing is the last
step; a run that changes nothing publishes nothing. Embedding is injected (``pipelines.refresh_index``
passes Ray Data's ``run_embed``), so this module never imports Ray.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hlm.config import Config, ConfigError
from hlm.data import (
    ADS,
    parquet_files,
    qrels_from_labels,
    read_embeddings,
    read_labels,
    read_parquet,
    split_valid,
    write_embeddings,
)
from hlm.encoder import space_of
from hlm.evaluation import retrieval_quality
from hlm.index import AdIndex
from hlm.metrics import PRIMARY_METRIC
from hlm.store import IndexStore, StoreError, new_version, redis_client

EmbedFn = Callable[[Path, str, Path], Path]  # (input Parquet, "ads" | "queries", output folder) -> output folder
EXIT_CODES = {"published": 0, "unchanged": 0, "refused": 1, "error": 2}


@dataclass
class Diff:
    new: list[str]
    changed: list[str]
    deleted: list[str]
    unchanged: list[str]

    @property
    def to_embed(self) -> list[str]:
        return self.new + self.changed


@dataclass
class GateResult:
    passed: bool
    checks: dict[str, dict]  # name -> {status: pass | fail | skipped, value, threshold, note}
    reason: str  # why it refused ("" when passed)


def text_hashes(ads: pa.Table) -> dict[str, str]:
    """ad_id -> sha256 of its text, in table order; rows with ``deleted: true`` are left out."""
    if "deleted" in ads.column_names:
        ads = ads.filter(pc.invert(pc.fill_null(ads.column("deleted").cast(pa.bool_()), False)))
    return {a: hashlib.sha256(t.encode()).hexdigest()
            for a, t in zip(ads.column("ad_id").to_pylist(), ads.column("text").to_pylist(), strict=True)}


def diff(current: dict[str, str], previous: dict[str, str]) -> Diff:
    """New, changed (other text hash), deleted (in previous only) and unchanged ids; current's order."""
    return Diff(new=[a for a in current if a not in previous],
                changed=[a for a, h in current.items() if a in previous and previous[a] != h],
                deleted=[a for a in previous if a not in current],
                unchanged=[a for a, h in current.items() if previous.get(a) == h])


def merge_embeddings(order: list[str], previous: tuple[list[str], np.ndarray],
                     fresh: tuple[list[str], np.ndarray]) -> np.ndarray:
    """(len(order), d) float32: each id's fresh vector, else its previous one; an id in neither raises."""
    src = {a: (previous[1], i) for i, a in enumerate(previous[0])} | {a: (fresh[1], i) for i, a in enumerate(fresh[0])}
    if missing := [a for a in order if a not in src]:
        raise ValueError(f"{len(missing)} ad(s) have neither a fresh nor a previous embedding, e.g. {missing[:5]}")
    rows = [m[i] for m, i in (src[a] for a in order)]
    if len(widths := {len(r) for r in rows}) > 1:
        raise ValueError(f"previous and fresh embeddings differ in width: {sorted(widths)}")
    return np.asarray(rows, np.float32).reshape(len(order), -1) if rows else np.zeros((0, 0), np.float32)


def gate(*, new_space: str, serving_space: str | None, recall: float | None, min_recall: float,
         quality: float | None = None, serving_quality: float | None = None, max_quality_drop: float = 0.02,
         metric: str = PRIMARY_METRIC) -> GateResult:
    """Three checks: ANN recall, canary quality vs the serving version, same space as the serving version."""
    def check(ok: bool | None, value=None, threshold=None, note: str = "") -> dict:
        return {"status": "skipped" if ok is None else "pass" if ok else "fail", "value": value,
                "threshold": threshold, "note": note}

    checks = {"space": check(None, new_space, None, "no serving version: nothing to compare with")
              if serving_space is None else check(new_space == serving_space, new_space, serving_space,
              "" if new_space == serving_space else
              f"the teacher's space {new_space} differs from the serving version's {serving_space}: publishing "
              "would silently swap spaces under the serving students; publish under a new index name "
              "(refresh.index) or retrain the students on the new teacher first")}
    checks["ann_recall"] = (check(None, note="not measured") if recall is None else check(
        recall >= min_recall, recall, min_recall,
        "" if recall >= min_recall else f"ANN recall@10 {recall:.4f} is below refresh.min_recall {min_recall}"))
    if serving_space is None or checks["space"]["status"] == "fail":
        checks["canary_quality"] = check(None, note="no serving version in the same space to compare with")
    elif quality is None or serving_quality is None:
        checks["canary_quality"] = check(None, note="no canary set (refresh.canary_queries, refresh.canary_labels)")
    else:
        floor = serving_quality - max_quality_drop
        checks["canary_quality"] = check(quality >= floor, quality, floor, "" if quality >= floor else
                                         f"canary {metric} {quality:.4f} is more than {max_quality_drop} below the "
                                         f"serving version's {serving_quality:.4f}")
    reasons = [c["note"] for c in checks.values() if c["status"] == "fail"]
    if not reasons and checks["ann_recall"]["status"] != "pass":
        reasons = ["ANN recall was not measured"]
    return GateResult(not reasons, checks, "; ".join(reasons))


def read_catalogue(path: str | Path) -> tuple[pa.Table, pa.Table]:
    """(valid live rows: ad_id, text; rejected: _file, _row (position in its file), ad_id, _reason)."""
    valid, rejected, seen = [], [], set()
    for f in parquet_files(path):
        table = read_parquet(f)
        table = table.append_column("_pos", pa.array(np.arange(table.num_rows), pa.int64()))
        if "deleted" in table.column_names:
            table = table.filter(pc.invert(pc.fill_null(table.column("deleted").cast(pa.bool_()), False)))
        good, bad = split_valid(table, ADS, str(f))
        dup = np.array([a in seen for a in good.column("ad_id").to_pylist()], dtype=bool)
        seen.update(good.column("ad_id").to_pylist())
        bad = bad.select(["_pos", "ad_id", "_reason"])
        if dup.any():
            again = good.filter(pa.array(dup)).select(["_pos", "ad_id"])
            bad = pa.concat_tables([bad, again.append_column("_reason", pa.array(
                ["ad_id duplicate id seen in an earlier file"] * again.num_rows, pa.string()))])
            good = good.filter(pa.array(~dup))
        valid.append(good.select(["ad_id", "text"]))
        rejected.append(bad.rename_columns(["_row", "ad_id", "_reason"]).add_column(
            0, "_file", pa.array([str(f)] * bad.num_rows, pa.string())))
    return pa.concat_tables(valid), pa.concat_tables(rejected)


def load_state(folder: str | Path) -> tuple[list[str], np.ndarray, dict, dict[str, str]] | None:
    """(ids, embeddings, space, text hashes) a run left in ``folder``, or None when it holds no such state."""
    folder = Path(folder)
    if not (folder / "text_hashes.parquet").exists() or not (folder / "embeddings").is_dir():
        return None
    hashes = pq.read_table(folder / "text_hashes.parquet").to_pydict()
    ids, emb, space = read_embeddings(folder / "embeddings")
    return ids, emb, space, dict(zip(hashes["ad_id"], hashes["sha256"], strict=True))


def save_state(folder: Path, ids: list[str], emb: np.ndarray, space: dict, hashes: dict[str, str]) -> None:
    """The full embedding set, then the text hashes (written last: they mark the state complete)."""
    write_embeddings(folder / "embeddings" / "part-00000.parquet", ids, emb, space)
    table = pa.table({"ad_id": ids, "sha256": [hashes[a] for a in ids]})
    pq.write_table(table.replace_schema_metadata({b"hlm.space": space["fingerprint"].encode()}),
                   folder / ".text_hashes.parquet.tmp")
    (folder / ".text_hashes.parquet.tmp").rename(folder / "text_hashes.parquet")


def refresh(cfg: Config, embed: EmbedFn) -> dict:
    """One run; returns its record (also in ``work_dir/<run>/run.json``). Status: published | unchanged | refused."""
    job = cfg.refresh
    if not job.ads:
        raise ConfigError("refresh.ads: the ad catalogue (Parquet file or folder) is required")
    run = new_version()
    run_dir = Path(job.work_dir) / run
    run_dir.mkdir(parents=True)
    rec: dict = {"run": run, "index": job.index, "ads": job.ads, "started_at": datetime.now(UTC).isoformat(),
                 "status": "error", "published_version": None, "why_not": None, "timings_s": {},
                 "record": str(run_dir / "run.json")}

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            rec["timings_s"][name] = round(time.perf_counter() - t, 3)

    try:
        _run(cfg, embed, run_dir, rec, stage)
    except (ValueError, StoreError) as e:  # bad data or config, Redis down: say why, publish nothing
        rec["why_not"] = f"{type(e).__name__}: {e}"
    except BaseException as e:
        rec["why_not"] = f"crashed: {type(e).__name__}: {e}"
        raise
    finally:
        rec["finished_at"] = datetime.now(UTC).isoformat()
        (run_dir / "run.json").write_text(json.dumps(rec, indent=2, default=str))
    return rec


def _run(cfg: Config, embed: EmbedFn, run_dir: Path, rec: dict, stage: Callable) -> None:
    job = cfg.refresh
    store = IndexStore(redis_client(job.redis_url), job.index, keep=job.keep_versions)
    with stage("read_catalogue"):
        rows, rejected = read_catalogue(job.ads)
    with stage("previous_state"):
        serving = store.current()
        manifest = store.manifest(serving) if serving else None
        state = load_state(manifest["source"]) if manifest and manifest.get("source") else None
        prev_ids, prev_emb, prev_space, prev_hashes = state or ([], np.zeros((0, 0), np.float32), None, {})
        rec["previous"] = {"version": serving, "source": manifest and manifest.get("source"),
                           "state": "none published" if not serving else "found" if state else "missing"}
    teacher_space = space_of(cfg.teacher)
    rec["space"] = teacher_space
    current = text_hashes(rows)
    kept = {a: prev_hashes[a] for a in rejected.column("ad_id").to_pylist() if a in prev_hashes and a not in current}
    current |= kept  # a bad row never deletes its ad: the previous version stays until the row is fixed
    d = diff(current, prev_hashes)
    rows = rows.filter(pc.is_in(rows.column("ad_id"), pa.array(d.to_embed, pa.string())))
    rec["counts"] = {"active": len(current), "new": len(d.new), "changed": len(d.changed), "deleted": len(d.deleted),
                     "reused": len(d.unchanged), "embedded": 0, "rejected": rejected.num_rows,
                     "rejected_kept_previous": len(kept)}
    rec["rejected"] = [{"file": r["_file"], "row": r["_row"], "ad_id": r["ad_id"], "reason": r["_reason"],
                        "action": "kept the previous version" if r["ad_id"] in kept else
                        "indexed its first row" if r["ad_id"] in current else "not indexed"}
                       for r in rejected.to_pylist()[:1000]]  # all of them: rejected/rejected.parquet
    if rejected.num_rows:
        (run_dir / "rejected").mkdir()
        pq.write_table(rejected, run_dir / "rejected" / "rejected.parquet")
    if not current:
        raise ValueError(f"{job.ads}: no valid ads; refusing to publish an empty index")
    if serving and manifest["space"] != teacher_space:  # a teacher change: refuse before paying for any embedding
        result = gate(new_space=teacher_space, serving_space=manifest["space"], recall=None, min_recall=job.min_recall)
        rec.update(status="refused", gate=asdict(result), why_not=result.reason)
        return
    if serving and not (d.new or d.changed or d.deleted):
        rec.update(status="unchanged", why_not=f"nothing changed since version {serving}; nothing published")
        return
    fresh_ids, fresh_emb, space = [], np.zeros((0, 0), np.float32), prev_space
    if rows.num_rows:
        with stage("embed"):
            pq.write_table(rows, run_dir / "to_embed.parquet")
            fresh_ids, fresh_emb, space = read_embeddings(embed(run_dir / "to_embed.parquet", "ads",
                                                                run_dir / "new_embeddings"))
        rec["counts"]["embedded"] = len(fresh_ids)
    if prev_space is not None and space["fingerprint"] != prev_space["fingerprint"]:
        raise ValueError(f"previous state {rec['previous']['source']} is in space {prev_space['fingerprint']}, "
                         f"the fresh embeddings in {space['fingerprint']}: they cannot be merged")
    with stage("merge_and_save"):
        ids = list(current)
        emb = merge_embeddings(ids, (prev_ids, prev_emb), (fresh_ids, fresh_emb))
        save_state(run_dir, ids, emb, space, current)
    with stage("build_index"):
        index = AdIndex.build(ids, emb, space["fingerprint"], job.factory, seed=cfg.seed, nprobe=job.nprobe,
                              ef_search=job.ef_search, k_factor=job.k_factor)
    with stage("gate"):
        exact = index if job.factory == "Flat" else AdIndex.build(ids, emb, index.space, "Flat")
        sample = emb[np.random.default_rng(cfg.seed).choice(len(ids), min(job.recall_sample, len(ids)), replace=False)]
        recall = index.recall_at_k(exact, sample, k=min(10, len(ids)))
        quality = serving_quality = None
        if serving and job.canary_queries:
            q_ids, q_emb, _ = read_embeddings(embed(Path(job.canary_queries), "queries", run_dir / "canary_embeddings"))
            qrels, k = qrels_from_labels(read_labels(job.canary_labels)), int(PRIMARY_METRIC.split("@")[1])
            quality = retrieval_quality(index, q_emb, q_ids, qrels, ks=(k,))[PRIMARY_METRIC]
            old = store.load(serving, expected_space=index.space)
            serving_quality = retrieval_quality(old, q_emb, q_ids, qrels, ks=(k,))[PRIMARY_METRIC]
        result = gate(new_space=index.space, serving_space=manifest and manifest["space"], recall=recall,
                      min_recall=job.min_recall, quality=quality, serving_quality=serving_quality,
                      max_quality_drop=job.max_quality_drop)
    rec["gate"] = asdict(result)
    if not result.passed:
        rec.update(status="refused", why_not=result.reason)
        return
    with stage("publish"):
        version = store.publish(index, source=str(run_dir.resolve()), version=rec["run"])
        rec.update(status="published", published_version=version)
    try:  # the publish stands even when cleaning up old versions fails
        rec["gc_deleted"] = store.gc()
    except StoreError as e:
        rec["gc_error"] = str(e)
