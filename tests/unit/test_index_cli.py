"""`python -m pipelines.index`: list, show, export (read back with plain FAISS + pyarrow) and rollback, on fakeredis."""

from __future__ import annotations

import json

import faiss
import fakeredis
import numpy as np
import pyarrow.parquet as pq
import pytest

from hlm.index import AdIndex
from hlm.store import IndexStore
from pipelines import index as index_cli

D = 16


def unit_rows(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)  # (n, d)


@pytest.fixture
def store(monkeypatch) -> IndexStore:
    """An index 'ads' with versions v1 (Flat, 50 ads) then v2 (HNSW32, 60 ads), v2 current."""
    client = fakeredis.FakeRedis()
    monkeypatch.setattr(index_cli, "redis_client", lambda url=None: client)
    store = IndexStore(client, "ads")
    store.publish(AdIndex.build([f"a-{i}" for i in range(50)], unit_rows(50, 0), "space-x"), version="v1")
    store.publish(AdIndex.build([f"b-{i}" for i in range(60)], unit_rows(60, 1), "space-x", "HNSW32"), version="v2")
    return store


def test_list_shows_every_version_newest_first_with_current_marked(store, capsys):
    assert index_cli.main(["list", "--index", "ads"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "index 'ads': 2 version(s), current v2"
    assert lines[1].startswith("* v2  60 ads  dim 16  HNSW32") and lines[2].startswith("  v1  50 ads  dim 16  Flat")


def test_with_a_manifest_key_list_marks_unsigned_versions_refused_and_goes_on(store, capsys, monkeypatch):
    # Given v1, v2 unsigned (store) and v3 published with the key, listed by an operator who holds the key
    monkeypatch.setenv("HLM_MANIFEST_KEY", "0123456789abcdef" * 2)
    IndexStore(store.client, "ads").publish(AdIndex.build(["c-0", "c-1"], unit_rows(2, 2), "space-x"), version="v3")
    assert index_cli.main(["list", "--index", "ads"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("* v3  2 ads")
    assert lines[2].startswith("  v2  REFUSED: index ads version v2: the manifest is unsigned")
    assert lines[3].startswith("  v1  REFUSED")


def test_show_prints_the_manifest_of_current_or_of_a_version(store, capsys):
    assert index_cli.main(["show", "--index", "ads"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "v2"
    assert index_cli.main(["show", "--index", "ads", "--version", "v1"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 50


def test_an_export_searches_with_plain_faiss_and_pyarrow_as_hlm_does(store, tmp_path, capsys):
    # When version v2 is exported
    assert index_cli.main(["export", "--index", "ads", "--version", "v2", "--out", str(tmp_path / "x")]) == 0
    assert "wrote" in capsys.readouterr().out
    # Then FAISS and pyarrow alone find the same ads with the same scores as HLM's AdIndex
    index = faiss.read_index(str(tmp_path / "x" / "index.faiss"))
    ads = pq.read_table(tmp_path / "x" / "ids.parquet").column("ad_id").to_pylist()
    q_emb = unit_rows(5, 7)  # (B, d)
    D_plain, I_plain = index.search(q_emb, 10)  # (B, k), (B, k)
    plain = [[(ads[i], float(s)) for s, i in zip(d, row, strict=True)] for d, row in zip(D_plain, I_plain, strict=True)]
    assert plain == store.load("v2").search_ids(q_emb, 10)
    assert json.loads((tmp_path / "x" / "manifest.json").read_text())["version"] == "v2"


def test_export_refuses_a_folder_that_holds_something(store, tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    assert index_cli.main(["export", "--index", "ads", "--out", str(tmp_path / "x")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_rollback_moves_current_to_the_previous_version_and_then_has_nowhere_to_go(store, capsys):
    assert index_cli.main(["rollback", "--index", "ads"]) == 0
    assert store.current() == "v1" and "current v2 -> v1" in capsys.readouterr().out
    assert index_cli.main(["rollback", "--index", "ads"]) == 2
    assert "no version older than 'v1'" in capsys.readouterr().err
    assert index_cli.main(["rollback", "--index", "ads", "--to", "v2"]) == 0 and store.current() == "v2"
