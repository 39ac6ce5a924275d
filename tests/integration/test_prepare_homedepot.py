"""The real Home Depot dev split goes through `python -m pipelines.prepare homedepot` into valid contract files."""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow as pa
import pytest

from hlm.data import LABELS, QUERIES, read_ads, read_labels, read_queries
from pipelines.prepare import main

HOMEDEPOT = Path(__file__).parents[2] / "../shared/data/homedepot"


@pytest.mark.integration
def test_prepare_homedepot_dev_gives_the_whole_catalogue_and_every_judged_pair(tmp_path: Path) -> None:
    if not HOMEDEPOT.exists():
        pytest.skip("../shared/data/homedepot not present")
    # Given the distinct (query, product) pairs of dev.csv, counted without the importer
    with open(HOMEDEPOT / "dev.csv", encoding="utf-8", newline="") as f:
        pairs = {(" ".join(row["search_term"].split()), row["product_uid"]) for row in csv.DictReader(f)}
    # When
    rc = main(["homedepot", "--pairs", str(HOMEDEPOT / "dev.csv"), "--products", str(HOMEDEPOT / "products.csv"),
               "--out", str(tmp_path)])
    # Then
    assert rc == 0
    ads, queries, labels = (read(tmp_path / f"{name}.parquet") for read, name in
                            ((read_ads, "ads"), (read_queries, "queries"), (read_labels, "labels")))
    assert ads.num_rows == 54_667
    assert queries.num_rows == 1_185
    assert labels.num_rows == len(pairs)
    assert ads.schema.field("ad_id").type == ads.schema.field("text").type == pa.string()
    assert queries.schema == QUERIES.schema
    assert labels.schema == LABELS.schema
    label = labels.column("label").to_numpy()
    assert label.min() >= 0.0 and label.max() <= 2.0
    assert set(labels.column("query_id").to_pylist()) == set(queries.column("query_id").to_pylist())
    assert set(labels.column("ad_id").to_pylist()) <= set(ads.column("ad_id").to_pylist())
