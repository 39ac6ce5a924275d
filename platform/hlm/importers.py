"""Importers: convert public relevance datasets, once, into the `ads` / `queries` / `labels` contracts.

One function per format returns a :class:`Dataset`; the rest of HLM reads only the contracts, never these
formats. Malformed input raises :class:`hlm.data.DataError` naming the file, the place and the field:
``line N`` (1-based, header = line 1) in CSV, TSV and JSONL files, ``row N`` (0-based, as in :mod:`hlm.data`)
in Parquet files. Nothing is dropped silently.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hlm.data import ADS, LABELS, QUERIES, DataError, validate, write_table

logger = logging.getLogger(__name__)

ESCI_GRADES = ("I", "C", "S", "E")  # position = label: Irrelevant 0, Complement 1, Substitute 2, Exact 3
Column = Sequence[Any] | pa.Array | pa.ChunkedArray


@dataclass(frozen=True)
class Dataset:
    """One imported dataset, each table conformed to its contract."""

    ads: pa.Table
    queries: pa.Table
    labels: pa.Table


def write_dataset(ds: Dataset, out_dir: str | os.PathLike) -> dict[str, int]:
    """Write `out_dir/{ads,queries,labels}.parquet` (validated again on write); return the row counts."""
    tables = {"ads": (ds.ads, ADS), "queries": (ds.queries, QUERIES), "labels": (ds.labels, LABELS)}
    for name, (table, contract) in tables.items():
        write_table(table, Path(out_dir) / f"{name}.parquet", contract)
    return {name: table.num_rows for name, (table, _) in tables.items()}


def normalise_query(text: str) -> str:
    """Collapse runs of whitespace: query logs hold both 'slide bolt' and 'slide  bolt', which are one query."""
    return " ".join(text.split())


def query_id(text: str) -> str:
    """A stable id for a query text, so the same query gets the same id in every file that holds it."""
    return "q" + hashlib.sha1(normalise_query(text).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------- formats


def from_homedepot(pairs_csv: str | os.PathLike, products_csv: str | os.PathLike) -> Dataset:
    """Home Depot search relevance: every product is an ad; label = mean relevance − 1 (0 … 2).

    Titles come from `products_csv`; the pairs' own `product_title` column is ignored (a few rows disagree).
    """
    products = _Source(products_csv)
    rows = list(_csv_records(products, ("product_uid", "product_title")))
    ad_ids, titles = [rec["product_uid"].strip() for _, rec in rows], [rec["product_title"] for _, rec in rows]
    _check_unique(products, "product_uid", ad_ids, [n for n, _ in rows])

    pairs, known = _Source(pairs_csv), set(ad_ids)
    texts: dict[str, str] = {}
    judged: list[tuple[str, str, float]] = []
    for n, rec in _csv_records(pairs, ("product_uid", "search_term", "relevance")):
        uid, text = rec["product_uid"].strip(), normalise_query(rec["search_term"])
        if uid not in known:
            raise pairs.error(n, "product_uid", f"{uid!r} is not in {products.path}")
        relevance = _number(pairs, n, "relevance", rec["relevance"])
        if not 1.0 <= relevance <= 3.0:
            raise pairs.error(n, "relevance", f"{relevance} is outside 1 … 3")
        texts.setdefault(query_id(text), text)
        judged.append((query_id(text), uid, relevance - 1.0))
    return _dataset({"ad_id": ad_ids, "text": titles, "title": titles}, texts, _labels(*_columns(judged, 3)))


def from_beir(beir_dir: str | os.PathLike, split: str = "test") -> Dataset:
    """A BEIR folder: the corpus is the ads (text = "title. text"); only queries judged in `split` are kept."""
    root = Path(beir_dir)
    corpus, queries, qrels = (_Source(root / name) for name in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv"))
    docs: list[tuple[int, str, str, str | None]] = []
    for n, rec in _jsonl_records(corpus, ("_id",)):
        title, body = (str(rec.get(f) or "").strip() for f in ("title", "text"))
        if not (title or body):
            raise corpus.error(n, "text", "is missing or empty, and so is 'title'")
        docs.append((n, str(rec["_id"]), f"{title}. {body}" if title and body else title or body, title or None))
    at, ad_ids, ad_texts, ad_titles = _columns(docs, 4)
    _check_unique(corpus, "_id", ad_ids, at)

    records = [(n, str(rec["_id"]), str(rec["text"])) for n, rec in _jsonl_records(queries, ("_id", "text"))]
    _check_unique(queries, "_id", [qid for _, qid, _ in records], [n for n, _, _ in records])
    all_texts, known_ads = {qid: text for _, qid, text in records}, set(ad_ids)

    judged: list[tuple[str, str, float]] = []
    for n, rec in _csv_records(qrels, ("query-id", "corpus-id", "score"), delimiter="\t", quoting=csv.QUOTE_NONE):
        qid, aid = rec["query-id"].strip(), rec["corpus-id"].strip()
        if qid not in all_texts:
            raise qrels.error(n, "query-id", f"{qid!r} is not in {queries.path}")
        if aid not in known_ads:
            raise qrels.error(n, "corpus-id", f"{aid!r} is not in {corpus.path}")
        judged.append((qid, aid, _number(qrels, n, "score", rec["score"])))
    kept = {qid for qid, _, _ in judged}
    return _dataset({"ad_id": ad_ids, "text": ad_texts, "title": pa.array(ad_titles, pa.string())},
                    {qid: text for qid, text in all_texts.items() if qid in kept}, _labels(*_columns(judged, 3)))


def from_esci(examples_parquet: str | os.PathLike, products_parquet: str | os.PathLike, *,
              locale: str | None = "us", split: str | None = None) -> Dataset:
    """Amazon Shopping Queries (ESCI): label E/S/C/I → 3/2/1/0; the ads are every product of the locale(s).

    ``ad_id`` is always ``"{product_locale}:{product_id}"``: one ASIN is listed in several locales with
    different titles, and prefixing even when one locale is imported keeps an ad's id independent of the
    filters it was imported with. Text is the title, plus the brand in parentheses when the title lacks it.
    """
    ex_src, pr_src = _Source(examples_parquet, "row"), _Source(products_parquet, "row")
    judged = ("query_id", "query", "product_id", "product_locale", "esci_label", "split")
    ex = _read_parquet(ex_src, judged, nonempty=judged)
    listed = ("product_id", "product_locale", "product_title")
    pr = _read_parquet(pr_src, (*listed, "product_brand", "product_description"), nonempty=listed)
    for name, value in (("product_locale", locale), ("split", split)):
        if value is not None:
            ex = _keep(ex, ex_src, name, value)
    if locale is not None:
        pr = _keep(pr, pr_src, "product_locale", locale)
    ad_ids, ex_ads = (pc.binary_join_element_wise(t["product_locale"], t["product_id"], ":") for t in (pr, ex))
    _check_unique(pr_src, "product_id", ad_ids.to_pylist(), pr["_row"].to_pylist(), "repeats in its locale")
    titles, brands = pr["product_title"].to_pylist(), [(b or "").strip() for b in pr["product_brand"].to_pylist()]
    texts = [f"{t} ({b})" if b and b.lower() not in t.lower() else t for t, b in zip(titles, brands, strict=True)]

    grade = pc.index_in(ex["esci_label"], value_set=pa.array(ESCI_GRADES))
    _raise_at_first(ex_src, ex, "esci_label", pc.is_null(grade), lambda v: f"{v!r} is not one of E, S, C, I")
    _raise_at_first(ex_src, ex, "product_id", pc.invert(pc.is_in(ex_ads, value_set=ad_ids.combine_chunks())),
                    lambda v: f"{v!r} is not in {pr_src.path} (for this locale)")
    distinct = ex.group_by(["query_id", "query"], use_threads=False).aggregate([("_row", "min")])
    qids = pc.cast(distinct["query_id"], pa.string()).to_pylist()
    _check_unique(ex_src, "query_id", qids, distinct["_row_min"].to_pylist(), "has a second, different query text")
    return _dataset({"ad_id": ad_ids, "text": texts, "title": titles, "description": pr["product_description"]},
                    dict(zip(qids, distinct["query"].to_pylist(), strict=True)),
                    _labels(pc.cast(ex["query_id"], pa.string()), ex_ads, grade))


# ---------------------------------------------------------------------------------------------- shared pieces


@dataclass(frozen=True)
class _Source:
    """An input file; its errors name the file and the line (text, 1-based) or row (Parquet, 0-based)."""

    path: str | os.PathLike
    unit: str = "line"

    def error(self, at: int, field: str | None, reason: str) -> DataError:
        where = f"{self.unit} {at}" + (f", field '{field}'" if field else "")
        return DataError(f"{self.path}: {where}: {reason}")


def _open(src: _Source, mode: str = "r") -> Any:
    try:
        return open(src.path, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""}))
    except OSError as e:
        raise DataError(f"{src.path}: cannot open ({e.strerror})") from e


def _csv_records(src: _Source, required: Sequence[str], **fmt: Any) -> Iterator[tuple[int, dict[str, str]]]:
    """(line, record) for each data row; every `required` field is present and non-empty."""
    with _open(src) as f:
        reader = csv.DictReader(f, **fmt)
        try:
            header = reader.fieldnames or []
            for name in required:
                if name not in header:
                    raise src.error(1, name, f"no such column (the header has {header})")
            for rec in reader:
                n = reader.line_num  # the record's last line, should a quoted field span several
                if None in rec:
                    raise src.error(n, None, f"{len(header) + len(rec[None])} fields, the header has {len(header)}")
                _require(src, n, rec, required)
                yield n, rec
        except csv.Error as e:
            raise src.error(reader.line_num, None, f"not readable as CSV ({e})") from e
        except UnicodeDecodeError as e:  # decoded a block at a time, so the line is unknown
            raise DataError(f"{src.path}: not UTF-8 text ({e})") from e


def _jsonl_records(src: _Source, required: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, object) for each non-blank line; every `required` field is present and non-empty."""
    with _open(src, "rb") as f:  # bytes, so that bad UTF-8 fails on its own line, as bad JSON does
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise src.error(n, None, f"not valid UTF-8 JSON ({e})") from e
            if not isinstance(rec, dict):
                raise src.error(n, None, f"a JSON {type(rec).__name__}, not an object")
            _require(src, n, rec, required)
            yield n, rec


def _require(src: _Source, n: int, rec: dict[str, Any], fields: Sequence[str]) -> None:
    for name in fields:
        if rec.get(name) is None or not str(rec[name]).strip():
            raise src.error(n, name, "is missing" if rec.get(name) is None else "is empty")


def _number(src: _Source, n: int, field: str, value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        x = math.nan
    if not math.isfinite(x):
        raise src.error(n, field, f"{value!r} is not a number")
    return x


def _check_unique(src: _Source, field: str, keys: Sequence[str], at: Sequence[int], reason: str = "repeats") -> None:
    first: dict[str, int] = {}
    for key, n in zip(keys, at, strict=True):
        if key in first:
            raise src.error(n, field, f"{key!r} {reason} (first at {src.unit} {first[key]})")
        first[key] = n


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows to columns, keeping `width` empty columns when there are no rows."""
    return [list(col) for col in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]


def _read_parquet(src: _Source, columns: Sequence[str], nonempty: Sequence[str]) -> pa.Table:
    """`columns` plus `_row` (the row in the file); the `nonempty` ones hold no nulls or blank strings."""
    try:
        names = pq.read_schema(src.path).names
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{src.path}: not a readable Parquet file ({e})") from e
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{src.path}: missing column(s) {missing} (found {names})")
    table = pq.read_table(src.path, columns=list(columns))
    table = table.append_column("_row", pa.array(np.arange(table.num_rows)))
    for name in nonempty:
        bad = pc.is_null(table[name])
        if pa.types.is_string(table[name].type):
            bad = pc.or_(bad, pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(table[name])), 0))
        _raise_at_first(src, table, name, bad, lambda v: "is missing" if v is None else "is empty")
    return table


def _raise_at_first(src: _Source, table: pa.Table, field: str, bad: Column, reason: Callable[[Any], str]) -> None:
    """Raise for the first row where `bad` holds, naming its `_row` and `reason(value)`."""
    hits = np.flatnonzero(pc.fill_null(bad, True).to_numpy(zero_copy_only=False))
    if hits.size:
        i = int(hits[0])
        raise src.error(table["_row"][i].as_py(), field, reason(table[field][i].as_py()))


def _keep(table: pa.Table, src: _Source, column: str, value: str) -> pa.Table:
    kept = table.filter(pc.equal(table[column], value))
    if kept.num_rows == 0:
        found = sorted(pc.unique(table[column]).to_pylist())
        raise DataError(f"{src.path}: no rows with {column} = {value!r} (found {found})")
    return kept


def _labels(query_ids: Column, ad_ids: Column, grades: Column) -> pa.Table:
    """One row per (query, ad), in order of first appearance; the grades of a repeated pair are averaged."""
    table = pa.table({"query_id": query_ids, "ad_id": ad_ids, "label": grades},
                     schema=pa.schema([("query_id", pa.string()), ("ad_id", pa.string()), ("label", pa.float64())]))
    mean = table.group_by(["query_id", "ad_id"], use_threads=False).aggregate([("label", "mean")])
    if table.num_rows > mean.num_rows:
        logger.info("averaged %d repeated judgement(s) of a (query, ad) pair", table.num_rows - mean.num_rows)
    return pa.table([mean["query_id"], mean["ad_id"], pc.cast(mean["label_mean"], pa.float32())], schema=LABELS.schema)


def _dataset(ads: dict[str, Column], texts: dict[str, str], labels: pa.Table) -> Dataset:
    logger.info("imported %d ads, %d queries, %d labels", len(ads["ad_id"]), len(texts), labels.num_rows)
    return Dataset(ads=validate(pa.table(ads), ADS, "ads"),
                   queries=validate(pa.table([list(texts), list(texts.values())], schema=QUERIES.schema), QUERIES,
                                    "queries"),
                   labels=validate(labels, LABELS, "labels"))
