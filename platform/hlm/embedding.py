"""Offline embedding of ads or queries: input files, row validation, the batch encoder, and the plain-loop reference.

`pipelines.embed` wires these into Ray Data: `ray.data.read_parquet` streams the rows of :func:`input_files`
(local, or an object-store URI read through pyarrow.fs), one :class:`ValidateRows` actor checks them in file order,
an :class:`EmbedBatch` actor pool encodes them, and `write_parquet` writes them. :func:`validate_inputs` and
:func:`embed_plain` are the single-process reference that tests and the benchmark pin it against.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from hlm.config import ModelRef, Runtime
from hlm.data import ADS, QUERIES, Contract, DataError, check_schema, embeddings_table, split_valid

logger = logging.getLogger(__name__)

InputKind = Literal["ads", "queries"]
CONTRACT_OF: dict[str, Contract] = {"ads": ADS, "queries": QUERIES}
PATH = "path"  # the column `read_parquet(include_paths=True)` adds


@dataclass(frozen=True)
class InputFiles:
    filesystem: pafs.FileSystem
    paths: list[str]  # in read order, as `filesystem` names them
    rows: int  # in all files, from their footers
    deleted: int  # ads rows marked deleted (they are skipped, not embedded)


def input_files(source: str | os.PathLike, kind: InputKind) -> InputFiles:
    """The Parquet files of `source` (a file or a folder; local, or an object-store URI such as `s3://bucket/ads/`)
    with each file's schema checked against the contract from its footer. Only the `deleted` column is read.

    Hidden and `_`-prefixed files and folders are skipped, as Ray and Spark skip them.
    """
    uri = str(source) if "://" in str(source) else str(Path(source).expanduser().resolve())
    try:
        fs, root = pafs.FileSystem.from_uri(uri)
        info = fs.get_file_info(root)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{source}: cannot open ({e})") from e
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{source}: no such file or folder")
    paths = [root]
    if info.type == pafs.FileType.Directory:
        found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        paths = sorted(f.path for f in found if f.type == pafs.FileType.File and f.path.endswith(".parquet")
                       and not any(part.startswith((".", "_")) for part in Path(f.path).relative_to(root).parts))
        if not paths:
            raise DataError(f"{source}: no Parquet files in this folder")
    rows = deleted = 0
    for path in paths:
        try:
            with fs.open_input_file(path) as f:
                parquet = pq.ParquetFile(f)
                check_schema(parquet.schema_arrow, CONTRACT_OF[kind], path)
                rows += parquet.metadata.num_rows
                if kind == "ads" and "deleted" in parquet.schema_arrow.names:
                    deleted += _count_true(parquet.read(columns=["deleted"]).column("deleted"))
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from e
    return InputFiles(fs, paths, rows, deleted)


def _count_true(col: pa.ChunkedArray) -> int:
    return int(pc.sum(pc.fill_null(col.cast(pa.bool_()), False)).as_py() or 0)


def split_rows(table: pa.Table, kind: InputKind, source: str, first_row: int,
               seen: set[str]) -> tuple[pa.Table, pa.Table]:
    """Rows `first_row`… of the file `source` → (valid `(id, text)`, rejected rows with `_file`, `_row`, `_reason`).

    The one rule for every job that reads ads (`pipelines.embed` through `ValidateRows`, the refresh through
    `hlm.refresh.read_catalogue`): rows marked ``deleted: true`` are dropped *before* validation, so they are
    neither embedded, rejected nor counted as seen; a null flag is live. A deleted ad's other fields do not
    matter, and in the refresh a rejected row keeps its ad's previous version, so validating deleted rows first
    would keep a deleted ad whose export blanked its text in the index forever. An id in `seen` (from an earlier
    file or slice) is a duplicate; the valid ids are added to `seen`.
    """
    contract = CONTRACT_OF[kind]
    check_schema(table.schema, contract, source)  # a wrong `deleted` type is a DataError naming the file, not a cast
    positions = np.arange(first_row, first_row + table.num_rows)  # each row's place in its file
    if kind == "ads" and "deleted" in table.column_names:
        live = pc.invert(pc.fill_null(table.column("deleted").cast(pa.bool_()), False))
        table, positions = table.filter(live), positions[live.to_numpy(zero_copy_only=False)]
    good, bad = split_valid(table, contract, source, positions=positions)
    good = good.append_column("_row", pa.array(positions[~np.isin(positions, bad.column("_row").to_numpy())]))
    ids = good.column(contract.key).to_pylist()
    dup = np.array([i in seen for i in ids], dtype=bool)
    seen.update(ids)
    if dup.any():
        extra = good.filter(pa.array(dup))
        extra = extra.append_column("_reason", pa.array([f"{contract.key} duplicate id seen earlier in the input"]
                                                        * extra.num_rows, pa.string()))
        bad = pa.concat_tables([bad, extra], promote_options="permissive")
        good = good.filter(pa.array(~dup))
    bad = bad.append_column("_file", pa.array([source] * bad.num_rows, pa.string()))
    return good.select([contract.key, contract.text]).rename_columns(["id", "text"]), bad


class ValidateRows:
    """Ray Data stage, run by ONE actor on rows in dataset order (`preserve_order`): each file's rows arrive in file
    order, so a running count per file numbers them, and one set of ids finds duplicates across files. Rejected rows
    go to `rejected_dir`, one file per batch named by where the batch starts (a retried batch overwrites its file)."""

    def __init__(self, kind: InputKind, rejected_dir: str) -> None:
        self.kind, self.rejected_dir = kind, Path(rejected_dir)
        self.next_row: dict[str, int] = {}
        self.seen: set[str] = set()

    def __call__(self, batch: pa.Table) -> pa.Table:
        """batch: the contract's columns plus `path` -> valid `(id, text)`."""
        paths = batch.column(PATH).to_pylist()
        starts = [0] + [i for i in range(1, len(paths)) if paths[i] != paths[i - 1]] + [len(paths)]
        valid, rejected = [], []
        for start, stop in zip(starts, starts[1:], strict=False):
            path, first = paths[start], self.next_row.get(paths[start], 0)
            rows = batch.slice(start, stop - start).drop_columns([PATH])
            self.next_row[path] = first + rows.num_rows
            good, bad = split_rows(rows, self.kind, path, first, self.seen)
            valid.append(good)
            if bad.num_rows:
                rejected.append(bad)
        if rejected:
            name = hashlib.sha256(f"{paths[0]}:{self.next_row[paths[0]]}".encode()).hexdigest()[:16]
            pq.write_table(pa.concat_tables(rejected, promote_options="permissive"),
                           self.rejected_dir / f"rejected-{name}.parquet")
        return pa.concat_tables(valid)


@dataclass
class ValidatedInput:
    rows: pa.Table  # (id, text) of every valid row, in file order
    rejected: pa.Table  # the bad rows with _file, _row, _reason
    files: list[Path]


def validate_inputs(path: str | Path, kind: InputKind) -> ValidatedInput:
    """The single-process reference of read → `ValidateRows`: every file read whole on this process."""
    files = input_files(path, kind)
    valid, rejected, seen = [], [], set()
    for f in files.paths:
        good, bad = split_rows(pq.read_table(f, filesystem=files.filesystem), kind, f, 0, seen)
        valid.append(good)
        rejected.append(bad)
    rejected_table = pa.concat_tables(rejected, promote_options="permissive")
    for r in rejected_table.select(["_file", "_row", "_reason"]).to_pylist()[:10]:
        logger.warning("rejected %s row %d: %s", r["_file"], r["_row"], r["_reason"])
    return ValidatedInput(pa.concat_tables(valid), rejected_table, [Path(p) for p in files.paths])


class EmbedBatch:
    """Encode an (id, text) batch into an `embeddings` batch. Ray Data runs it as an actor: the model loads once."""

    def __init__(self, model: ModelRef | dict, kind: InputKind, batch_size: int, runtime: Runtime | dict | None = None):
        # imported here, not at the top: the ValidateRows actor imports this module too and needs no torch or
        # transformers (about 4 s of CPU per job on a 2-core box)
        from hlm.encoder import Encoder

        model = ModelRef.model_validate(model)
        runtime = Runtime.model_validate(runtime or {})
        self.encoder = Encoder.load(model, runtime)
        self.kind = "query" if kind == "queries" else "ad"
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        emb = self.encoder.encode(batch.column("text").to_pylist(), kind=self.kind, batch_size=self.batch_size)
        return embeddings_table(batch.column("id").to_pylist(), emb)  # (n, d) as fixed_size_list


def embed_plain(rows: pa.Table, embedder: EmbedBatch, batch_size: int = 1024) -> pa.Table:
    """The single-process reference: the same encoder over the same rows in a plain loop."""
    parts = [embedder(rows.slice(i, batch_size)) for i in range(0, rows.num_rows, batch_size)]
    return pa.concat_tables(parts) if parts else embeddings_table([], np.zeros((0, embedder.encoder.dim)))
