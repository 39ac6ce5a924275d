"""Data contracts: the Arrow schemas of ads, queries, labels and embeddings, and validating Parquet I/O.

Every reader checks the contract and raises :class:`DataError` naming the file, the row and the field;
nothing is dropped silently. Jobs that prefer to keep going use :func:`split_valid`, which returns the
valid rows and the rejected ones with their reasons (for a ``rejected/`` side file).

Row numbers are 0-based positions in the file (the Arrow/pandas convention).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

EMBEDDING_META_KEY = b"hlm.space"


@dataclass(frozen=True)
class Contract:
    """What a table must look like: required columns with their types, the unique key, the text column."""

    name: str
    schema: pa.Schema  # required columns, in order
    key: str | None  # unique, non-empty id column
    text: str | None  # non-empty text column
    optional: tuple[pa.Field, ...] = ()


ADS = Contract(
    "ads",
    pa.schema([("ad_id", pa.string()), ("text", pa.string())]),
    key="ad_id",
    text="text",
    optional=(
        pa.field("title", pa.string()),
        pa.field("description", pa.string()),
        pa.field("keywords", pa.string()),
        pa.field("updated_at", pa.timestamp("us", tz="UTC")),
        pa.field("deleted", pa.bool_()),
    ),
)
QUERIES = Contract(
    "queries", pa.schema([("query_id", pa.string()), ("text", pa.string())]), key="query_id", text="text"
)
LABELS = Contract(
    "labels", pa.schema([("query_id", pa.string()), ("ad_id", pa.string()), ("label", pa.float32())]),
    key=None, text=None,
)
CONTRACTS = {c.name: c for c in (ADS, QUERIES, LABELS)}


class DataError(ValueError):
    """A table breaks its contract. The message names the file, the row and the field."""


@dataclass(frozen=True)
class Problem:
    row: int
    field: str
    reason: str

    def describe(self, source: str) -> str:
        return f"{source}: row {self.row}, field '{self.field}': {self.reason}"


def embedding_schema(dim: int) -> pa.Schema:
    """`id: string`, `embedding: fixed_size_list<float32>[dim]` — plain Arrow, readable without Ray."""
    return pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32(), dim))])


# ---------------------------------------------------------------------------------------------- validation


def _conform(table: pa.Table, contract: Contract, source: str) -> pa.Table:
    """Check columns exist and cast them to the contract's types; extra columns are kept."""
    fields = list(contract.schema) + [f for f in contract.optional if f.name in table.column_names]
    missing = [f.name for f in contract.schema if f.name not in table.column_names]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing} for the '{contract.name}' contract "
                        f"(found {table.column_names})")
    for f in fields:
        col = table.column(f.name)
        if col.type == f.type:
            continue
        try:
            table = table.set_column(table.column_names.index(f.name), f.name, pc.cast(col, f.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            row = _first_uncastable_row(col, f.type)
            where = f"row {row}, " if row is not None else ""
            raise DataError(f"{source}: {where}field '{f.name}': cannot read {col.type} as {f.type} ({e})") from e
    return table


def _first_uncastable_row(col: pa.ChunkedArray, type_: pa.DataType) -> int | None:
    for i, value in enumerate(col.to_pylist()):
        try:
            pa.array([value]).cast(type_)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            return i
    return None


def _positions(table: pa.Table, first_row: int, positions: np.ndarray | None) -> np.ndarray:
    return positions if positions is not None else np.arange(first_row, first_row + table.num_rows)


def find_problems(table: pa.Table, contract: Contract, first_row: int = 0,
                  positions: np.ndarray | None = None) -> list[Problem]:
    """Every row-level problem: nulls in required fields, empty text or id, duplicate ids, non-finite labels.

    Rows are numbered from `first_row` (the position in its file of a slice's first row), or by `positions` (each
    row's position in its file, for a table with rows filtered out).
    """
    at = _positions(table, first_row, positions)
    problems: list[Problem] = []
    for f in contract.schema:
        col = table.column(f.name)
        for i in np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False)):
            problems.append(Problem(int(at[i]), f.name, "is null"))
        if pa.types.is_string(f.type):
            stripped = pc.utf8_trim_whitespace(col)
            empty = pc.fill_null(pc.equal(pc.utf8_length(stripped), 0), False).to_numpy(zero_copy_only=False)
            problems += [Problem(int(at[i]), f.name, "is empty") for i in np.flatnonzero(empty)]
        elif pa.types.is_floating(f.type):
            values = col.to_numpy(zero_copy_only=False)
            bad = ~np.isfinite(values) & ~col.is_null().to_numpy(zero_copy_only=False)
            problems += [Problem(int(at[i]), f.name, f"is not a finite number ({values[i]})")
                         for i in np.flatnonzero(bad)]
    if contract.key:
        seen: dict[str, int] = {}
        for i, key in zip(at.tolist(), table.column(contract.key).to_pylist(), strict=True):
            if key is None:
                continue
            if key in seen:
                problems.append(Problem(i, contract.key, f"duplicate id '{key}' (first at row {seen[key]})"))
            else:
                seen[key] = i
    return sorted(problems, key=lambda p: (p.row, p.field))


def validate(table: pa.Table, contract: Contract, source: str = "<table>") -> pa.Table:
    """Return `table` conformed to `contract`, or raise DataError listing the first problems."""
    table = _conform(table, contract, source)
    problems = find_problems(table, contract)
    if problems:
        shown = "\n  ".join(p.describe(source) for p in problems[:10])
        more = f"\n  … and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise DataError(f"{len(problems)} invalid row(s) in '{contract.name}' data:\n  {shown}{more}")
    return table


def split_valid(table: pa.Table, contract: Contract, source: str = "<table>", first_row: int = 0,
                positions: np.ndarray | None = None) -> tuple[pa.Table, pa.Table]:
    """(valid rows, rejected rows with `_row` and `_reason` columns). Column/type errors still raise.

    `_row` counts from `first_row`, the position in its file of the slice's first row, or is taken from `positions`.
    """
    table = _conform(table, contract, source)
    at = _positions(table, first_row, positions)
    index_of = {int(p): i for i, p in enumerate(at)}
    bad_rows: dict[int, list[str]] = {}
    for p in find_problems(table, contract, positions=at):
        bad_rows.setdefault(index_of[p.row], []).append(f"{p.field} {p.reason}")
    mask = np.ones(table.num_rows, dtype=bool)
    mask[list(bad_rows)] = False
    rows = sorted(bad_rows)
    rejected = table.take(pa.array(rows, pa.int64())).append_column(
        "_row", pa.array([int(at[r]) for r in rows], pa.int64()))
    rejected = rejected.append_column("_reason", pa.array(["; ".join(bad_rows[r]) for r in rows], pa.string()))
    return table.filter(pa.array(mask)), rejected


def check_schema(schema: pa.Schema, contract: Contract, source: str) -> None:
    """A file's columns and types (from its footer, no rows read) against `contract`; DataError names the file."""
    _conform(schema.empty_table(), contract, source)


# ---------------------------------------------------------------------------------------------- Parquet I/O


def parquet_files(path: str | os.PathLike) -> list[Path]:
    """A Parquet file, or every `*.parquet` under a folder (sorted, hidden and `rejected/` files skipped)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.parquet")
                       if not any(part.startswith((".", "_")) or part == "rejected" for part in f.relative_to(p).parts))
        if not files:
            raise DataError(f"{p}: no Parquet files in this folder")
        return files
    if not p.exists():
        raise DataError(f"{p}: no such file")
    return [p]


def read_parquet(path: Path, *, schema_only: bool = False) -> pa.Table | pa.Schema:
    """One Parquet file (or only its schema); a truncated or non-Parquet file is a DataError naming it."""
    try:
        return pq.read_schema(path) if schema_only else pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e


def read_table(path: str | os.PathLike, contract: Contract) -> pa.Table:
    """Read and validate one file or a folder of files (each file is checked on its own, so errors name it)."""
    tables = [validate(read_parquet(f), contract, str(f)) for f in parquet_files(path)]
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    if contract.key and len(tables) > 1:
        validate(table, contract, str(path))  # duplicates across files
    return table


def write_table(table: pa.Table, path: str | os.PathLike, contract: Contract,
                metadata: dict[bytes, bytes] | None = None) -> Path:
    """Validate and write atomically: the file appears complete or not at all."""
    path = Path(path)
    table = validate(table, contract, str(path))
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    return _atomic_write(table, path)


def _atomic_write(table: pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_ads(path: str | os.PathLike) -> pa.Table:
    return read_table(path, ADS)


def read_queries(path: str | os.PathLike) -> pa.Table:
    return read_table(path, QUERIES)


def read_labels(path: str | os.PathLike) -> pa.Table:
    return read_table(path, LABELS)


def qrels_from_labels(labels: pa.Table) -> dict[str, dict[str, float]]:
    """Labels table -> `{query_id: {ad_id: label}}`, the shape `hlm.metrics` reads."""
    qrels: dict[str, dict[str, float]] = {}
    for q, a, y in zip(*(labels.column(c).to_pylist() for c in ("query_id", "ad_id", "label")), strict=True):
        qrels.setdefault(q, {})[a] = float(y)
    return qrels


# ---------------------------------------------------------------------------------------------- embeddings


def embeddings_table(ids: Iterable[str], emb: np.ndarray) -> pa.Table:
    """Ids plus an (n, d) float32 matrix as an `embeddings` table (zero-copy for the vectors)."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n, d = emb.shape
    values = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), d)
    return pa.Table.from_arrays([pa.array(list(ids), pa.string()), values], schema=embedding_schema(d))


def space_metadata(space: dict) -> dict[bytes, bytes]:
    """Parquet schema metadata that records an embedding space (JSON: fingerprint, model, pooling, dim, …)."""
    return {EMBEDDING_META_KEY: json.dumps(space, sort_keys=True).encode()}


def write_embeddings(path: str | os.PathLike, ids: Iterable[str], emb: np.ndarray, space: dict) -> Path:
    """Write an embeddings file whose schema metadata carries the space description."""
    table = embeddings_table(ids, emb).replace_schema_metadata(space_metadata(space))
    return _atomic_write(table, Path(path))


def read_embedding_space(path: str | os.PathLike) -> dict:
    """The space JSON stored in an embeddings file's metadata (no data read)."""
    f = parquet_files(path)[0]
    meta = read_parquet(f, schema_only=True).metadata or {}
    if EMBEDDING_META_KEY not in meta:
        raise DataError(f"{f}: embeddings file without '{EMBEDDING_META_KEY.decode()}' metadata")
    return json.loads(meta[EMBEDDING_META_KEY])


def _embedding_ids(table: pa.Table, source: Path) -> list[str]:
    ids = table.column("id").to_pylist()
    if (row := next((i for i, v in enumerate(ids) if v is None or not str(v).strip()), None)) is not None:
        raise DataError(f"{source}: row {row}, field 'id': is null or empty")
    return [str(v) for v in ids]


def _embedding_matrix(col: pa.Array, source: Path) -> np.ndarray:
    """float32 (n, d) from a fixed-size (or equal-length) list column; names the first bad row."""
    if not (pa.types.is_fixed_size_list(col.type) or pa.types.is_list(col.type)) or not (
            pa.types.is_floating(col.type.value_type) or pa.types.is_integer(col.type.value_type)):
        raise DataError(f"{source}: field 'embedding' is {col.type}, expected a fixed-size list of float32")
    if col.null_count:
        raise DataError(f"{source}: row {col.is_null().to_pylist().index(True)}, field 'embedding': is null")
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        row = int(np.flatnonzero(lengths != lengths[0])[0])
        raise DataError(f"{source}: row {row}, field 'embedding': {lengths[row]} values, row 0 has {lengths[0]}")
    dim = int(lengths[0]) if len(lengths) else 0
    emb = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(col), dim)
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        raise DataError(f"{source}: row {int(np.flatnonzero(bad)[0])}, field 'embedding': not finite (NaN or inf)")
    return emb


def read_embeddings(path: str | os.PathLike) -> tuple[list[str], np.ndarray, dict]:
    """(ids, float32 (n, d), space) from a file or a folder; all files must share one space."""
    files = parquet_files(path)
    spaces = {json.dumps(read_embedding_space(f), sort_keys=True) for f in files}
    if len(spaces) != 1:
        raise DataError(f"{path}: files from {len(spaces)} different embedding spaces")
    ids: list[str] = []
    mats: list[np.ndarray] = []
    for f in files:
        table = read_parquet(f)
        if "id" not in table.column_names or "embedding" not in table.column_names:
            raise DataError(f"{f}: an embeddings file needs columns 'id' and 'embedding'")
        ids += _embedding_ids(table, f)
        mats.append(_embedding_matrix(table.column("embedding").combine_chunks(), f))
    emb = np.concatenate(mats) if mats else np.zeros((0, 0), np.float32)
    dupes = len(ids) - len(set(ids))
    if dupes:
        first = next(i for i, c in Counter(ids).items() if c > 1)
        raise DataError(f"{path}: field 'id': {dupes} duplicate id(s) in embeddings, first {first!r}")
    return ids, emb, json.loads(spaces.pop())
