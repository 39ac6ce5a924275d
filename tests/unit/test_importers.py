"""Importers turn Home Depot CSVs, BEIR folders and ESCI Parquet files into the ads/queries/labels contracts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hlm.data import ADS, LABELS, QUERIES, DataError, read_ads, read_labels, read_queries
from hlm.importers import Dataset, from_beir, from_esci, from_homedepot, query_id
from pipelines.prepare import main

PAIRS_HEADER = ["id", "product_uid", "product_title", "search_term", "relevance"]


def write_csv(path: Path, header: list[str], rows: list[list[object]], delimiter: str = ",") -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, lines: list[dict | str]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def labels_of(ds: Dataset) -> dict[tuple[str, str], float]:
    return {(r["query_id"], r["ad_id"]): r["label"] for r in ds.labels.to_pylist()}


# ---------------------------------------------------------------------------------------------- Home Depot


@pytest.fixture
def products(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "products.csv", ["product_uid", "product_title"],
                     [[100001, "Angle bracket, 12-gauge"], [100002, "Deck paint"], [100003, "Unjudged lamp"]])


def write_pairs(path: Path, rows: list[list[object]]) -> Path:
    """`rows` of (product_uid, search_term, relevance); the pairs' own title is ignored by the importer."""
    return write_csv(path, PAIRS_HEADER, [[i, uid, "a title", term, rel] for i, (uid, term, rel) in enumerate(rows)])


def test_homedepot_every_product_is_an_ad_and_every_distinct_term_a_query(tmp_path: Path, products: Path) -> None:
    # Given two terms judged against two of three products
    pairs = write_pairs(tmp_path / "dev.csv", [[100001, "angle bracket", 3], [100002, "angle bracket", 1],
                                               [100002, "deck paint", 2]])
    # When
    ds = from_homedepot(pairs, products)
    # Then
    assert ds.ads.column("ad_id").to_pylist() == ["100001", "100002", "100003"]
    assert ds.ads.column("text").to_pylist()[0] == "Angle bracket, 12-gauge"
    assert ds.queries.to_pylist() == [{"query_id": query_id("angle bracket"), "text": "angle bracket"},
                                      {"query_id": query_id("deck paint"), "text": "deck paint"}]
    assert ds.labels.num_rows == 3
    assert ds.ads.schema.field("title").type == pa.string()
    assert ds.queries.schema == QUERIES.schema and ds.labels.schema == LABELS.schema


def test_homedepot_label_is_relevance_minus_one(tmp_path: Path, products: Path) -> None:
    pairs = write_pairs(tmp_path / "dev.csv", [[100001, "bracket", 2.33], [100002, "bracket", 1]])
    labels = labels_of(from_homedepot(pairs, products))
    assert labels[(query_id("bracket"), "100001")] == pytest.approx(1.33, abs=1e-6)
    assert labels[(query_id("bracket"), "100002")] == 0.0


def test_homedepot_repeated_pair_is_averaged_into_one_label(tmp_path: Path, products: Path) -> None:
    # Given the same (query, product) judged twice, once with extra whitespace in the term
    pairs = write_pairs(tmp_path / "train.csv", [[100001, "slide bolt", 3], [100001, "slide  bolt", 2]])
    # When
    ds = from_homedepot(pairs, products)
    # Then
    assert ds.queries.to_pylist() == [{"query_id": query_id("slide bolt"), "text": "slide bolt"}]
    assert labels_of(ds) == {(query_id("slide bolt"), "100001"): pytest.approx(1.5)}


def test_homedepot_same_query_text_gets_same_id_in_two_files(tmp_path: Path, products: Path) -> None:
    train = from_homedepot(write_pairs(tmp_path / "train.csv", [[100001, "deck paint", 3]]), products)
    dev = from_homedepot(write_pairs(tmp_path / "dev.csv", [[100003, "lamp", 2], [100002, "deck paint", 2]]), products)
    train_ids = dict(zip(train.queries["text"].to_pylist(), train.queries["query_id"].to_pylist()))
    dev_ids = dict(zip(dev.queries["text"].to_pylist(), dev.queries["query_id"].to_pylist()))
    assert train_ids["deck paint"] == dev_ids["deck paint"] != dev_ids["lamp"]


@pytest.mark.parametrize(("row", "field", "reason"), [
    ([7, 100001, "t", "bracket"], "relevance", "is missing"),
    ([7, 100001, "t", "bracket", "abc"], "relevance", "'abc' is not a number"),
    ([7, 100001, "t", "bracket", "3.5"], "relevance", "outside 1 … 3"),
    ([7, 999999, "t", "bracket", "2"], "product_uid", "'999999' is not in"),
    ([7, 100001, "t", "  ", "2"], "search_term", "is empty"),
])
def test_homedepot_malformed_row_names_file_line_and_field(tmp_path: Path, products: Path, row: list[object],
                                                           field: str, reason: str) -> None:
    # Given a good row on line 2 and a bad one on line 3
    pairs = write_csv(tmp_path / "dev.csv", PAIRS_HEADER, [[1, 100001, "t", "angle bracket", 3], row])
    # When / Then
    with pytest.raises(DataError) as e:
        from_homedepot(pairs, products)
    assert f"dev.csv: line 3, field '{field}'" in str(e.value)
    assert reason in str(e.value)


def test_homedepot_duplicate_product_names_both_lines(tmp_path: Path) -> None:
    products = write_csv(tmp_path / "products.csv", ["product_uid", "product_title"], [[1, "a"], [2, "b"], [1, "c"]])
    pairs = write_pairs(tmp_path / "dev.csv", [[1, "q", 2]])
    with pytest.raises(DataError, match=r"products\.csv: line 4, field 'product_uid': '1' repeats \(first at line 2"):
        from_homedepot(pairs, products)


def test_homedepot_missing_column_is_reported_on_the_header_line(tmp_path: Path, products: Path) -> None:
    pairs = write_csv(tmp_path / "dev.csv", ["id", "product_uid", "search_term"], [[1, 100001, "q"]])
    with pytest.raises(DataError, match=r"dev\.csv: line 1, field 'relevance': no such column"):
        from_homedepot(pairs, products)


# ---------------------------------------------------------------------------------------------- BEIR


def write_beir(root: Path, corpus: list[dict | str], queries: list[dict | str], qrels: list[list[object]]) -> Path:
    (root / "qrels").mkdir(parents=True)
    write_jsonl(root / "corpus.jsonl", corpus)
    write_jsonl(root / "queries.jsonl", queries)
    write_csv(root / "qrels" / "test.tsv", ["query-id", "corpus-id", "score"], qrels, delimiter="\t")
    return root


CORPUS = [{"_id": "d1", "title": "Aspirin", "text": "A painkiller."}, {"_id": "d2", "title": "", "text": "No title."},
          {"_id": "d3", "title": "Only a title", "text": ""}]
QUERIES_JSONL = [{"_id": "q1", "text": "what is aspirin"}, {"_id": "q2", "text": "judged only in train"}]


def test_beir_ad_text_is_title_then_text_and_only_judged_queries_are_kept(tmp_path: Path) -> None:
    # Given three documents, two queries, and test qrels that judge only q1
    root = write_beir(tmp_path / "scifact", CORPUS, QUERIES_JSONL, [["q1", "d1", 1], ["q1", "d2", 0]])
    # When
    ds = from_beir(root, "test")
    # Then
    assert ds.ads.column("text").to_pylist() == ["Aspirin. A painkiller.", "No title.", "Only a title"]
    assert ds.queries.to_pylist() == [{"query_id": "q1", "text": "what is aspirin"}]
    assert labels_of(ds) == {("q1", "d1"): 1.0, ("q1", "d2"): 0.0}


@pytest.mark.parametrize(("corpus", "queries", "qrels", "expected"), [
    (CORPUS[:1] + ['{"_id": "d2", "text": '], QUERIES_JSONL, [["q1", "d1", 1]],
     r"corpus\.jsonl: line 2: not valid UTF-8 JSON"),
    (CORPUS[:2] + [{"title": "t", "text": "x"}], QUERIES_JSONL, [["q1", "d1", 1]],
     r"corpus\.jsonl: line 3, field '_id': is missing"),
    (CORPUS, QUERIES_JSONL, [["q1", "d1", 1], ["q1", "d9", 1]],
     r"test\.tsv: line 3, field 'corpus-id': 'd9' is not in"),
    (CORPUS, QUERIES_JSONL, [["q7", "d1", 1]], r"test\.tsv: line 2, field 'query-id': 'q7' is not in"),
    (CORPUS, QUERIES_JSONL, [["q1", "d1", "high"]], r"test\.tsv: line 2, field 'score': 'high' is not a number"),
])
def test_beir_malformed_input_names_file_line_and_field(tmp_path: Path, corpus: list, queries: list, qrels: list,
                                                        expected: str) -> None:
    root = write_beir(tmp_path / "beir", corpus, queries, qrels)
    with pytest.raises(DataError, match=expected):
        from_beir(root, "test")


def test_beir_unknown_split_says_which_file_is_missing(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "beir", CORPUS, QUERIES_JSONL, [["q1", "d1", 1]])
    with pytest.raises(DataError, match=r"dev\.tsv: cannot open"):
        from_beir(root, "dev")


# ---------------------------------------------------------------------------------------------- ESCI


def write_esci(root: Path, labels: list[str]) -> tuple[Path, Path]:
    """Query 1 (us) judges products A..D with `labels`; query 2 (jp) judges product A, which is another item in jp."""
    n = len(labels)
    examples = pa.table({
        "example_id": list(range(n + 1)),
        "query": ["usb cable"] * n + ["USBケーブル"],
        "query_id": [1] * n + [2],
        "product_id": ["A", "B", "C", "D"][:n] + ["A"],
        "product_locale": ["us"] * n + ["jp"],
        "esci_label": labels + ["E"],
        "split": ["train", "test", "test", "train"][:n] + ["test"],
    })
    products = pa.table({
        "product_id": ["A", "B", "C", "D", "A"],
        "product_locale": ["us", "us", "us", "us", "jp"],
        "product_title": ["Anker USB-C cable", "Cable", "Charger", "Mug", "ケーブル"],
        "product_description": [None, "<b>fast</b>", None, None, None],
        "product_bullet_point": [None] * 5,
        "product_brand": ["Anker", "Belkin", None, "", "Sony"],
        "product_color": [None] * 5,
    })
    pq.write_table(examples, root / "examples.parquet")
    pq.write_table(products, root / "products.parquet")
    return root / "examples.parquet", root / "products.parquet"


def test_esci_maps_e_s_c_i_to_3_2_1_0_within_the_locale(tmp_path: Path) -> None:
    examples, products = write_esci(tmp_path, ["E", "S", "C", "I"])
    ds = from_esci(examples, products)
    assert labels_of(ds) == {("1", "us:A"): 3.0, ("1", "us:B"): 2.0, ("1", "us:C"): 1.0, ("1", "us:D"): 0.0}
    assert ds.queries.to_pylist() == [{"query_id": "1", "text": "usb cable"}]
    # the brand is added only where the title does not already carry it
    assert ds.ads.column("text").to_pylist() == ["Anker USB-C cable", "Cable (Belkin)", "Charger", "Mug"]


def test_esci_ids_stay_unique_when_locales_share_a_product_id(tmp_path: Path) -> None:
    examples, products = write_esci(tmp_path, ["E", "S", "C", "I"])
    ds = from_esci(examples, products, locale=None)
    assert ds.ads.column("ad_id").to_pylist() == ["us:A", "us:B", "us:C", "us:D", "jp:A"]
    assert labels_of(ds)[("2", "jp:A")] == 3.0


def test_esci_split_filter_keeps_only_that_split(tmp_path: Path) -> None:
    examples, products = write_esci(tmp_path, ["E", "S", "C", "I"])
    ds = from_esci(examples, products, split="test")
    assert set(labels_of(ds)) == {("1", "us:B"), ("1", "us:C")}
    assert ds.ads.num_rows == 4  # the ad corpus is the whole catalogue, not just the judged products


@pytest.mark.parametrize(("column", "row", "value", "expected"), [
    ("esci_label", 2, "X", r"examples\.parquet: row 2, field 'esci_label': 'X' is not one of E, S, C, I"),
    ("product_id", 1, "Z", r"examples\.parquet: row 1, field 'product_id': 'Z' is not in .*products\.parquet"),
    ("query", 3, None, r"examples\.parquet: row 3, field 'query': is missing"),
    ("query", 0, "another text", r"examples\.parquet: row 1, field 'query_id': '1' has a second, different query"),
])
def test_esci_malformed_example_names_file_row_and_field(tmp_path: Path, column: str, row: int, value: str | None,
                                                         expected: str) -> None:
    # Given a valid file with one cell replaced
    examples, products = write_esci(tmp_path, ["E", "S", "C", "I"])
    table = pq.read_table(examples)
    cells = table.column(column).to_pylist()
    cells[row] = value
    pq.write_table(table.set_column(table.column_names.index(column), column, pa.array(cells, pa.string())), examples)
    # When / Then
    with pytest.raises(DataError, match=expected):
        from_esci(examples, products)


def test_esci_unknown_locale_lists_the_ones_found(tmp_path: Path) -> None:
    examples, products = write_esci(tmp_path, ["E"])
    with pytest.raises(DataError, match=r"examples\.parquet: no rows with product_locale = 'US' \(found \['jp', 'us'"):
        from_esci(examples, products, locale="US")


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_homedepot_writes_three_valid_parquet_files(tmp_path: Path, products: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # Given
    pairs = write_pairs(tmp_path / "dev.csv", [[100001, "angle bracket", 3], [100002, "deck paint", 2.67]])
    out = tmp_path / "prepared"
    # When
    rc = main(["homedepot", "--pairs", str(pairs), "--products", str(products), "--out", str(out)])
    # Then
    assert rc == 0
    assert read_ads(out / "ads.parquet").num_rows == 3
    assert read_queries(out / "queries.parquet").column("text").to_pylist() == ["angle bracket", "deck paint"]
    labels = read_labels(out / "labels.parquet")
    assert labels.column("label").to_pylist() == pytest.approx([2.0, 1.67], abs=1e-6)
    assert set(ADS.schema.names) <= set(read_ads(out / "ads.parquet").column_names)
    assert "3 ads, 2 queries, 2 labels" in capsys.readouterr().out


def test_cli_returns_2_and_prints_the_bad_row_without_a_traceback(tmp_path: Path, products: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    pairs = write_csv(tmp_path / "dev.csv", PAIRS_HEADER, [[1, 100001, "t", "bracket", "abc"]])
    rc = main(["homedepot", "--pairs", str(pairs), "--products", str(products), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and "dev.csv: line 2, field 'relevance': 'abc' is not a number" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
