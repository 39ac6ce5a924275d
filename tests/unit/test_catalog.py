"""The built-in catalogue: deterministic, valid under the data contracts, and graded from its attributes."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import pytest

from hlm.catalog import generate_catalog, split_queries
from hlm.data import ADS, LABELS, QUERIES, read_ads, read_labels, read_queries, validate
from hlm.importers import Dataset, write_dataset

GRID = {0.0, 0.33, 0.67, 1.0, 1.33, 1.67, 2.0}  # Home Depot relevance − 1, averaged over three raters


@pytest.fixture(scope="module")
def catalog() -> Dataset:
    return generate_catalog()  # the demo's size: 2000 ads, 400 queries


def ad_facts(ds: Dataset) -> dict[str, tuple[str, frozenset[str]]]:
    """ad_id -> (product type, its attribute keywords); keywords are the type first, then one per attribute."""
    facts = {}
    for ad_id, keywords in zip(ds.ads["ad_id"].to_pylist(), ds.ads["keywords"].to_pylist(), strict=True):
        ptype, *attrs = keywords.split(", ")
        facts[ad_id] = (ptype, frozenset(attrs))
    return facts


def labels_by_query(ds: Dataset) -> dict[str, dict[str, float]]:
    by_query: dict[str, dict[str, float]] = defaultdict(dict)
    for q, a, y in zip(*(ds.labels[c].to_pylist() for c in ("query_id", "ad_id", "label")), strict=True):
        assert a not in by_query[q], f"({q}, {a}) is judged twice"
        by_query[q][a] = round(y, 2)
    return by_query


def test_same_seed_gives_identical_tables():
    first, second = generate_catalog(300, 40, seed=7), generate_catalog(300, 40, seed=7)
    for name in ("ads", "queries", "labels"):
        assert getattr(first, name).equals(getattr(second, name)), name


def test_different_seeds_give_different_catalogues():
    a, b = generate_catalog(300, 40, seed=1), generate_catalog(300, 40, seed=2)
    assert a.ads["text"].to_pylist() != b.ads["text"].to_pylist()
    assert a.queries["text"].to_pylist() != b.queries["text"].to_pylist()


def test_more_queries_extend_the_same_catalogue():
    small, large = generate_catalog(300, 20, seed=5), generate_catalog(300, 50, seed=5)
    assert large.ads.equals(small.ads)
    assert large.queries.slice(0, 20).equals(small.queries)
    assert large.labels.slice(0, small.labels.num_rows).equals(small.labels)


def test_tables_pass_the_contracts_with_the_documented_ids_and_text(catalog):
    for table, contract in ((catalog.ads, ADS), (catalog.queries, QUERIES), (catalog.labels, LABELS)):
        assert validate(table, contract).equals(table)
    assert (catalog.ads.num_rows, catalog.queries.num_rows) == (2000, 400)
    ads = catalog.ads.to_pylist()
    assert all(re.fullmatch(r"ad-\d{6}", ad["ad_id"]) for ad in ads)
    assert all(re.fullmatch(r"q-\d{4}", q) for q in catalog.queries["query_id"].to_pylist())
    assert all(ad["text"] == f"{ad['title']} - {ad['description']}" and ad["keywords"] for ad in ads)


def test_queries_are_distinct_short_lower_case_searches(catalog):
    texts = catalog.queries["text"].to_pylist()
    assert len(set(texts)) == len(texts)
    assert all(t == t.lower() and 1 <= len(t.split()) <= 12 for t in texts)


def test_every_label_names_a_known_query_and_ad_and_sits_on_the_grade_grid(catalog):
    ads, queries = set(catalog.ads["ad_id"].to_pylist()), set(catalog.queries["query_id"].to_pylist())
    by_query = labels_by_query(catalog)
    assert set(by_query) == queries
    assert all(a in ads and y in GRID for judged in by_query.values() for a, y in judged.items())


def test_each_query_has_between_3_and_30_relevant_ads_and_one_exact_match(catalog):
    for q, judged in labels_by_query(catalog).items():
        assert 3 <= sum(y >= 1.0 for y in judged.values()) <= 30, q
        assert max(judged.values()) == 2.0, q


def test_labels_follow_the_product_type(catalog):
    # Given each ad's product type from its keywords
    facts = ad_facts(catalog)
    of_type: dict[str, set[str]] = defaultdict(set)
    for ad_id, (ptype, _) in facts.items():
        of_type[ptype].add(ad_id)
    negatives = 0
    for q, judged in labels_by_query(catalog).items():
        # Then every ad with a positive label is of one type, and every ad of that type is judged
        types = {facts[a][0] for a, y in judged.items() if y > 0}
        assert len(types) == 1, q
        (ptype,) = types
        assert {a for a, y in judged.items() if y > 0} == of_type[ptype], q
        # And the judged zeros are ads of other types
        zeros = [a for a, y in judged.items() if y == 0]
        assert all(facts[a][0] != ptype for a in zeros), q
        negatives += len(zeros)
    assert negatives >= 2 * catalog.queries.num_rows  # a same-brand, a shared-attribute and a random ad per query


def test_labels_are_a_function_of_the_attributes(catalog):
    facts = ad_facts(catalog)
    for q, judged in labels_by_query(catalog).items():
        # Ads with identical attributes get identical labels
        label_of: dict[tuple[str, frozenset[str]], float] = {}
        for a, y in judged.items():
            assert label_of.setdefault(facts[a], y) == y, q
        # Whatever all exact matches share covers what the query asked for, so every ad that has it is exact too
        exact = [facts[a] for a, y in judged.items() if y == 2.0]
        shared = frozenset.intersection(*(attrs for _, attrs in exact))
        ptype = exact[0][0]
        assert all(y == 2.0 for a, y in judged.items() if facts[a][0] == ptype and shared <= facts[a][1]), q


def test_a_tiny_catalogue_still_gives_every_query_a_relevant_ad():
    ds = generate_catalog(n_ads=5, n_queries=3, seed=3)
    judged = labels_by_query(ds)
    assert ds.ads.num_rows == 5 and len(judged) == 3
    assert all(max(labels.values()) == 2.0 for labels in judged.values())


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="n_ads"):
        generate_catalog(n_ads=0)


def test_split_queries_partitions_queries_and_keeps_labels_with_their_query(catalog):
    # When the catalogue is split by query
    train, dev = split_queries(catalog, dev_fraction=0.25, seed=0)
    # Then the queries are partitioned, a quarter of them in dev
    train_q, dev_q = (set(d.queries["query_id"].to_pylist()) for d in (train, dev))
    assert not train_q & dev_q and train_q | dev_q == set(catalog.queries["query_id"].to_pylist())
    assert len(dev_q) == 100
    # And each label goes with its query, none lost, while both sides keep every ad
    assert set(train.labels["query_id"].to_pylist()) == train_q and set(dev.labels["query_id"].to_pylist()) == dev_q
    assert train.labels.num_rows + dev.labels.num_rows == catalog.labels.num_rows
    assert train.ads.equals(catalog.ads) and dev.ads.equals(catalog.ads)
    # And the split is deterministic
    assert split_queries(catalog, 0.25, seed=0)[1].queries.equals(dev.queries)
    assert not split_queries(catalog, 0.25, seed=1)[1].queries.equals(dev.queries)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_split_queries_refuses_a_fraction_outside_0_1(catalog, fraction):
    with pytest.raises(ValueError, match="dev_fraction"):
        split_queries(catalog, dev_fraction=fraction)


def test_written_catalogue_reads_back_through_the_contracts(catalog, tmp_path: Path):
    counts = write_dataset(catalog, tmp_path)
    assert counts == {"ads": 2000, "queries": 400, "labels": catalog.labels.num_rows}
    assert read_ads(tmp_path / "ads.parquet").equals(catalog.ads)
    assert read_queries(tmp_path / "queries.parquet").equals(catalog.queries)
    assert read_labels(tmp_path / "labels.parquet").equals(catalog.labels)
