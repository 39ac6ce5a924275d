"""Malformed Parquet into every job: a clear error that names the file and the problem, exit code 2, and nothing
published or lost (the serving version stays current, no output folder appears)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hlm.redis_client import redis_client
from hlm.store import IndexStore
from pipelines import embed, evaluate, publish_index, train

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def rewritten(src: Path, dst: Path, change: Callable[[pa.Table], pa.Table]) -> Path:
    pq.write_table(change(pq.read_table(src)), dst)
    return dst


def with_column(name: str, values: list) -> Callable[[pa.Table], pa.Table]:
    return lambda t: t.set_column(t.column_names.index(name), name, pa.array(values))


def duplicate_first_row(t: pa.Table) -> pa.Table:
    return pa.concat_tables([t, t.slice(0, 1)])


def null_at(name: str, row: int) -> Callable[[pa.Table], pa.Table]:
    def change(t: pa.Table) -> pa.Table:
        values = t.column(name).to_pylist()
        values[row] = None
        return t.set_column(t.column_names.index(name), name, pa.array(values, t.schema.field(name).type))

    return change


def nan_vector(t: pa.Table) -> pa.Table:
    col = t.column("embedding").combine_chunks()
    flat = col.flatten().to_numpy(zero_copy_only=False).copy()
    flat[: col.type.list_size] = np.nan
    return t.set_column(1, "embedding", pa.FixedSizeListArray.from_arrays(pa.array(flat), col.type.list_size))


EMBEDDING_DEFECTS = {
    "truncated file": (truncated, "not a readable Parquet file"),
    "duplicate id": (lambda s, d: rewritten(s, d, duplicate_first_row), "duplicate id"),
    "null id": (lambda s, d: rewritten(s, d, null_at("id", 3)), r"row 3.*'id'.*null"),
    "NaN vector": (lambda s, d: rewritten(s, d, nan_vector), r"row 0.*'embedding'.*not finite"),
    "wrong type": (lambda s, d: rewritten(s, d, lambda t: t.set_column(1, "embedding", pa.array(
        ["x"] * t.num_rows))), r"'embedding'.*fixed-size list of float"),
}


@pytest.mark.parametrize("defect", EMBEDDING_DEFECTS)
def test_publish_index_refuses_bad_embeddings_and_the_serving_version_stays(defect, catalog_split, redis_url,
                                                                           tmp_path, capsys):
    name = f"malformed-{abs(hash(defect)) % 10**8}"
    assert publish_index.main(["--embeddings", str(catalog_split["ads_emb"]), "--index", name,
                               "--redis-url", redis_url]) == 0
    store = IndexStore(redis_client(redis_url), name)
    serving = store.current()
    make, message = EMBEDDING_DEFECTS[defect]
    bad = make(catalog_split["ads_emb"], tmp_path / "ads.parquet")
    assert publish_index.main(["--embeddings", str(bad), "--index", name, "--redis-url", redis_url]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and re.search(message, err), err
    assert store.current() == serving and store.versions() == [serving]


QUERY_DEFECTS = {
    "truncated file": (truncated, "not a readable Parquet file"),
    "duplicate id": (lambda s, d: rewritten(s, d, duplicate_first_row), r"field 'query_id': duplicate id"),
    "null text": (lambda s, d: rewritten(s, d, null_at("text", 2)), r"row 2, field 'text': is null"),
    "wrong type": (lambda s, d: rewritten(s, d, with_column("text", [[1, 2]] * pq.read_metadata(s).num_rows)),
                   r"field 'text': cannot read list<\w+: int64> as string"),
}


def train_args(split: dict, queries: Path, out: Path) -> list[str]:
    return ["--phase", "align", "--out", str(out), "--queries", str(queries), "--teacher-queries",
            str(split["teacher_queries"]), "--ads-emb", str(split["ads_emb"])]


def evaluate_args(split: dict, queries: Path, out: Path) -> list[str]:
    return ["--ads-emb", str(split["ads_emb"]), "--queries", str(queries), "--labels", str(split["dev_labels"]),
            "--out", str(out), "--set", f"teacher.model={split['teacher']}"]


@pytest.mark.parametrize("defect", QUERY_DEFECTS)
@pytest.mark.parametrize("job", ["train", "evaluate"])
def test_jobs_reading_queries_exit_2_naming_the_file_row_and_field(job, defect, catalog_split, tmp_path, capsys):
    make, message = QUERY_DEFECTS[defect]
    bad = make(catalog_split["dev_queries"], tmp_path / "queries.parquet")
    out = tmp_path / "out"
    module, args = (train, train_args) if job == "train" else (evaluate, evaluate_args)
    assert module.main(args(catalog_split, bad, out)) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and re.search(message, err), err
    assert not (out / "model").exists() and not (out / "report.md").exists()


def test_embed_job_refuses_a_truncated_input_and_writes_no_output(ray_cluster, catalog_split, tiny_bert_dir, tmp_path,
                                                                  capsys):
    bad = truncated(catalog_split["root"] / "train/ads.parquet", tmp_path / "ads.parquet")
    out = tmp_path / "emb"
    assert embed.main(["--model", str(tiny_bert_dir), "--input", str(bad), "--kind", "ads", "--out", str(out)]) == 2
    assert f"{bad}: not a readable Parquet file" in capsys.readouterr().err
    assert not out.exists()
