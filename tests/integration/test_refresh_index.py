"""The nightly refresh end to end on a real local Ray and a real Redis, the tiny BERT as the teacher.

Each test publishes into its own index name and its own work_dir, so tests never see each other's versions. A test's
"Given a published catalogue" run goes through the same `hlm.refresh.refresh` with the in-process embedding
reference instead of the Ray Data job (tests/integration/test_embed_job.py pins the two together): only the runs
under test pay for a Ray Data job (~7 s each on 2 cores).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hlm.config import load_config
from hlm.data import read_embeddings, write_embeddings
from hlm.embedding import validate_inputs
from hlm.encoder import Encoder
from hlm.redis_client import redis_client
from hlm.refresh import refresh as refresh_run
from hlm.store import IndexStore
from pipelines.refresh_index import main

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
N_ADS = 60  # under P@100's k, so canary precision counts the relevant ads present, whatever the tiny model ranks


def catalogue(n: int = N_ADS) -> dict[str, str | None]:
    return {f"ad-{i:05d}": f"ad {i}: {['cordless drill', 'white paint', 'brass lamp', 'oak door'][i % 4]} {i % 11}v"
            for i in range(n)}


def write_ads(path: Path, texts: dict[str, str | None], deleted: set[str] = frozenset()) -> Path:
    pq.write_table(pa.table({"ad_id": list(texts), "text": pa.array(list(texts.values()), pa.string()),
                             "deleted": [a in deleted for a in texts]}), path)
    return path


class Refresh:
    """Runs `pipelines.refresh_index.main` in-process (on the session's Ray) against one fresh index name."""

    CONFIG = str(REPO / "configs" / "refresh.yaml")

    def __init__(self, tmp_path: Path, tiny_bert_dir: Path, redis_url: str) -> None:
        self.index, self.work = f"refresh-{uuid.uuid4().hex[:8]}", tmp_path / "runs"
        self.ads = tmp_path / "ads.parquet"
        self.store = IndexStore(redis_client(redis_url), self.index)
        self.overrides = ["profile=cpu", f"teacher.model={tiny_bert_dir}", "embed.num_actors=1", "embed.batch_size=32",
                          f"refresh.ads={self.ads}", f"refresh.index={self.index}", f"refresh.redis_url={redis_url}",
                          f"refresh.work_dir={self.work}", "refresh.factory=Flat"]
        self.base = ["--config", self.CONFIG, *(arg for o in self.overrides for arg in ("--set", o))]

    def __call__(self, *overrides: str) -> tuple[int, dict]:
        rc = main(self.base + [arg for o in overrides for arg in ("--set", o)])
        return rc, json.loads(sorted(self.work.glob("*/run.json"))[-1].read_text())

    def given(self, *overrides: str) -> dict:
        """A published starting version: the same refresh, its ads embedded in this process, not by Ray Data."""
        cfg = load_config(self.CONFIG, [*self.overrides, *overrides])
        teacher = Encoder.load(cfg.teacher, cfg.runtime)

        def embed(path: Path, kind: str, out: Path) -> Path:
            rows = validate_inputs(path, kind).rows
            write_embeddings(out / "part-0.parquet", rows.column("id").to_pylist(),
                             teacher.encode(rows.column("text").to_pylist(), kind="ad"), teacher.describe_space())
            return out

        record = refresh_run(cfg, embed)
        assert record["status"] == "published", record["why_not"]
        return record


@pytest.fixture
def refresh(tmp_path, tiny_bert_dir, redis_url, ray_cluster) -> Refresh:
    return Refresh(tmp_path, tiny_bert_dir, redis_url)


def test_second_run_embeds_only_the_changes_and_a_third_without_changes_publishes_nothing(refresh: Refresh,
                                                                                           capsys) -> None:
    # Given a first run over the whole catalogue
    texts = catalogue()
    write_ads(refresh.ads, texts)
    rc, first = refresh()
    assert rc == 0 and first["status"] == "published" and first["counts"]["embedded"] == N_ADS
    assert refresh.store.current() == first["published_version"] == first["run"]
    assert first["previous"]["state"] == "none published" and first["gate"]["checks"]["space"]["status"] == "skipped"
    # When 3 texts change, 2 ads are added and 1 is flagged deleted
    changed, added, gone = ["ad-00001", "ad-00002", "ad-00003"], ["ad-new-1", "ad-new-2"], "ad-00004"
    texts |= {a: f"{texts[a]} now with free delivery" for a in changed} | {a: f"{a} steel tile" for a in added}
    write_ads(refresh.ads, texts, deleted={gone})
    rc, second = refresh()
    # Then exactly those 5 rows are embedded, the rest reused, and the new version holds the right ids
    assert rc == 0 and second["status"] == "published", second["why_not"]
    assert {k: second["counts"][k] for k in ("new", "changed", "deleted", "reused", "embedded")} == {
        "new": 2, "changed": 3, "deleted": 1, "reused": N_ADS - 4, "embedded": 5}
    assert second["previous"] == {"version": first["run"], "source": str((refresh.work / first["run"]).resolve()),
                                  "state": "found"}
    index = refresh.store.load()
    assert refresh.store.current() == second["published_version"]
    assert sorted(index.ids) == sorted(set(texts) - {gone})
    ids1, emb1, _ = read_embeddings(refresh.work / first["run"] / "embeddings")
    ids2, emb2, _ = read_embeddings(refresh.work / second["run"] / "embeddings")
    before, after = dict(zip(ids1, emb1, strict=True)), dict(zip(ids2, emb2, strict=True))
    reused = set(ids1) - set(changed) - {gone}
    assert len(reused) == N_ADS - 4 and all(np.array_equal(before[a], after[a]) for a in reused)
    assert not any(np.allclose(before[a], after[a]) for a in changed)
    np.testing.assert_array_equal(index.index.reconstruct_n(0, index.ntotal), emb2)  # the index is that set
    # And a rerun with nothing changed publishes nothing, embeds nothing and exits 0 (a decision: no empty versions)
    rc, third = refresh()
    assert rc == 0 and third["status"] == "unchanged" and third["published_version"] is None
    assert third["counts"]["embedded"] == 0 and "embed" not in third["timings_s"]
    assert refresh.store.versions() == [second["run"], first["run"]]
    assert "nothing changed" in capsys.readouterr().out


def test_a_refused_gate_publishes_nothing_and_exits_1(refresh: Refresh, tmp_path: Path) -> None:
    # Given a published version and a canary query whose 5 relevant ads are all in it (P@100 = 0.05)
    texts = catalogue()
    write_ads(refresh.ads, texts)
    relevant = [f"ad-{i:05d}" for i in range(5)]
    pq.write_table(pa.table({"query_id": ["q1"], "text": ["cordless drill"]}), tmp_path / "canary_q.parquet")
    pq.write_table(pa.table({"query_id": ["q1"] * 5, "ad_id": relevant, "label": pa.array([1.0] * 5, pa.float32())}),
                   tmp_path / "canary_l.parquet")
    canary = [f"refresh.canary_queries={tmp_path / 'canary_q.parquet'}",
              f"refresh.canary_labels={tmp_path / 'canary_l.parquet'}"]
    first = refresh.given(*canary)
    assert first["gate"]["checks"]["canary_quality"]["status"] == "skipped"
    # When 3 of the relevant ads are deleted and the recall gate asks the impossible (1.01)
    write_ads(refresh.ads, texts, deleted=set(relevant[:3]))
    rc, low_recall = refresh("refresh.min_recall=1.01")
    # Then nothing is published and current stays
    assert rc == 1 and low_recall["status"] == "refused" and "below refresh.min_recall 1.01" in low_recall["why_not"]
    # And with the canary set, the quality drop 0.05 -> 0.02 (over 0.02) refuses too
    rc, drop = refresh(*canary)
    assert rc == 1 and drop["status"] == "refused", drop["why_not"]
    check = drop["gate"]["checks"]["canary_quality"]
    assert check["status"] == "fail" and check["value"] == pytest.approx(0.02)
    assert check["threshold"] == pytest.approx(0.03) and "P@100" in drop["why_not"]
    assert drop["gate"]["checks"]["ann_recall"]["status"] == "pass"
    # And a teacher change (another pooling is another space) is refused before anything is embedded
    rc, swap = refresh("teacher.pooling=cls")
    assert rc == 1 and swap["gate"]["checks"]["space"]["status"] == "fail" and "embed" not in swap["timings_s"]
    assert "new index name" in swap["why_not"] and "retrain the students" in swap["why_not"]
    assert refresh.store.current() == first["run"] and refresh.store.versions() == [first["run"]]


def test_a_bad_row_is_reported_and_loses_nothing(refresh: Refresh) -> None:
    # Given a published catalogue
    texts = catalogue()
    write_ads(refresh.ads, texts)
    first = refresh.given()
    # When an indexed ad's text turns null, a new ad arrives with a null text and another valid one arrives
    broken = texts | {"ad-00010": None, "ad-new-bad": None, "ad-new-ok": "oak door 3v"}
    write_ads(refresh.ads, broken)
    rc, second = refresh()
    # Then both bad rows are in the record with their file row; the indexed ad keeps its previous vector
    assert rc == 0 and second["status"] == "published", second["why_not"]
    assert [(r["row"], r["ad_id"], r["reason"], r["action"]) for r in second["rejected"]] == [
        (10, "ad-00010", "text is null", "kept the previous version"),
        (N_ADS, "ad-new-bad", "text is null", "not indexed")]
    assert second["counts"]["rejected"] == 2 and second["counts"]["embedded"] == 1
    assert pq.read_table(refresh.work / second["run"] / "rejected" / "rejected.parquet").num_rows == 2
    index = refresh.store.load()
    assert sorted(index.ids) == sorted(set(texts) | {"ad-new-ok"})
    ids1, emb1, _ = read_embeddings(refresh.work / first["run"] / "embeddings")
    vec = index.index.reconstruct(index.ids.index("ad-00010"))
    np.testing.assert_array_equal(vec, emb1[ids1.index("ad-00010")])


def test_a_truncated_catalogue_exits_2_naming_the_file_and_the_current_version_stays(refresh: Refresh, capsys) -> None:
    write_ads(refresh.ads, catalogue())
    first = refresh.given()
    whole = refresh.ads.read_bytes()
    refresh.ads.write_bytes(whole[: len(whole) // 2])
    assert main(refresh.base) == 2
    failed = json.loads(sorted(refresh.work.glob("*/run.json"))[-1].read_text())
    assert failed["status"] == "error" and f"{refresh.ads}: not a readable Parquet file" in failed["why_not"]
    assert f"why: {failed['why_not']}" in capsys.readouterr().out
    assert refresh.store.current() == first["run"] and refresh.store.versions() == [first["run"]]


def write_export(folder: Path, texts: dict[str, str | None], n_files: int) -> list[Path]:
    """The catalogue as an upstream export writes it: `n_files` Parquet parts and an `_expected_rows` marker."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = list(texts)
    parts = [write_ads(folder / f"part-{i:03d}.parquet", {a: texts[a] for a in ids[i::n_files]})
             for i in range(n_files)]
    (folder / "_expected_rows").write_text(f"{len(ids)}\n")
    return parts


@pytest.mark.reliability
def test_a_truncated_export_is_refused_and_only_an_explicit_override_publishes_it(refresh: Refresh, tmp_path: Path,
                                                                                   record_property) -> None:
    # Given a published catalogue exported as 10 files
    export = tmp_path / "export"
    parts = write_export(export, catalogue(), 10)
    first = refresh.given(f"refresh.ads={export}")
    # When the next export is valid but holds only 3 of its 10 files (42 of 60 ads look deleted)
    for part in parts[3:]:
        part.unlink()
    rc, short = refresh(f"refresh.ads={export}")
    # Then nothing is embedded or published, and the record says which limit refused it
    assert rc == 1 and short["status"] == "refused", short["why_not"]
    assert "42 of 60 published ads (70%) would be deleted" in short["why_not"]
    assert "refresh.max_deleted_fraction 0.2" in short["why_not"] and "embed" not in short["timings_s"]
    assert refresh.store.current() == first["run"] and refresh.store.versions() == [first["run"]]
    # And an operator's explicit override (a reason) publishes it, logged in the record
    rc, forced = refresh(f"refresh.ads={export}", "refresh.override_shrink_guard=catalogue cut by merchandising")
    assert rc == 0 and forced["status"] == "published", forced["why_not"]
    assert forced["override"] == {"reason": "catalogue cut by merchandising", "overridden": short["why_not"]}
    survivors = [a for part in parts[:3] for a in pq.read_table(part)["ad_id"].to_pylist()]
    assert sorted(refresh.store.load().ids) == sorted(survivors)
    record_property("truncated_export", "3/10 files: refused exit 1; override published")


@pytest.mark.reliability
def test_an_export_short_of_its_row_count_marker_is_refused_even_with_nothing_published(refresh: Refresh,
                                                                                        tmp_path: Path) -> None:
    export = tmp_path / "export"
    for part in write_export(export, catalogue(), 10)[3:]:
        part.unlink()
    rc, rec = refresh(f"refresh.ads={export}", f"refresh.expected_rows_file={export / '_expected_rows'}")
    assert rc == 1 and rec["status"] == "refused"
    assert "holds 18 rows; its marker" in rec["why_not"] and "says 60" in rec["why_not"]
    assert refresh.store.current() is None


@pytest.mark.reliability
def test_a_second_nightly_run_does_not_start_while_one_holds_the_lease(refresh: Refresh) -> None:
    from hlm.lease import Lease

    write_ads(refresh.ads, catalogue())
    with Lease(refresh.store.client, refresh.store.lease_key, owner="run-still-embedding", ttl_s=60):
        rc, rec = refresh()
    assert rc == 2 and rec["status"] == "error" and "held by run-still-embedding" in rec["why_not"]
    assert "read_catalogue" not in rec["timings_s"] and refresh.store.current() is None


def test_the_refresh_folds_the_event_stream_in_and_records_its_position(refresh: Refresh) -> None:
    from hlm.deltas import DeltaLog
    from hlm.events import AdEventProducer

    # Given a published catalogue, then a streamed upsert, an edit and a delete, and one event more after that
    texts = catalogue()
    write_ads(refresh.ads, texts)
    first = refresh.given()["published_version"]
    producer = AdEventProducer(refresh.store.client, refresh.index)
    producer.upsert("streamed", "streamed steel tile")
    producer.upsert("ad-00001", "an edited drill")
    position = producer.delete("ad-00002")
    refresh.store.client.xadd(f"hlm:{refresh.index}:v:{first}:delta",  # what the updater wrote for the old base
                              {"event": position, "op": "delete", "ad_id": "ad-00002"})
    # When the nightly refresh runs over the unchanged export
    rc, rec = refresh()
    # Then the new version holds the stream's changes, records the position and the version it replaced
    assert rc == 0 and rec["status"] == "published", rec["why_not"]
    assert rec["counts"]["new"] == 1 and rec["counts"]["changed"] == 1 and rec["counts"]["deleted"] == 1
    manifest = refresh.store.manifest(rec["published_version"])
    assert manifest["stream_position"] == position and manifest["stream_previous"] == first
    index = refresh.store.load()
    assert "streamed" in index.ids and "ad-00002" not in index.ids
    # And nothing of the old base's log is after the position: a replica of the new base applies none of it twice
    assert DeltaLog(refresh.store.client, refresh.index).read(first, after=manifest["stream_position"]) == []
