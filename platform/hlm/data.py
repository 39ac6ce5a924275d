"""Validating Parquet I/O of the data contracts (`hlm.contracts`): ads, queries, labels and embeddings files.

Every reader checks the contract and raises :class:`DataError` naming the file, the row and the field;
nothing is dropped silently. Jobs that prefer to keep going use :func:`split_valid`, which returns the
valid rows and the rejected ones with their reasons (for a ``rejected/`` side file). The contracts and their
checks are `hlm.contracts`'; they are re-exported here, where jobs read and write the files.

Row numbers are 0-based positions in the file (the Arrow/pandas convention).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hlm.contracts import (  # noqa: F401 (re-exported: jobs take the contracts from hlm.data)
    ADS,
    CONTRACTS,
    LABELS,
    QUERIES,
    Contract,
    DataError,
    Problem,
    check_schema,
    embedding_schema,
    find_problems,
    split_valid,
    validate,
)

logger = logging.getLogger(__name__)

EMBEDDING_META_KEY = b"hlm.space"


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
