"""The data contracts: the Arrow schemas of ads, queries, labels and embeddings, and how a table is checked against one.

Every check raises :class:`DataError` naming the source, the row and the field; nothing is dropped silently.
:func:`split_valid` instead returns the valid rows and the rejected ones with their reasons (for a
``rejected/`` side file). Reading and writing the files is `hlm.data`'s, which re-exports these names.

Row numbers are 0-based positions in the file (the Arrow/pandas convention).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


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
