"""Offline embedding of ads or queries: input validation, the batch encoder, and the plain-loop reference.

`pipelines.embed` wires these into Ray Data (read → validate → encode in an actor pool → write); the
plain loop in :func:`embed_plain` is the slow reference that tests and the benchmark pin it against.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

from hlm.config import ModelRef, Runtime
from hlm.data import ADS, QUERIES, Contract, embeddings_table, parquet_files, read_parquet, split_valid
from hlm.encoder import Encoder

logger = logging.getLogger(__name__)

InputKind = Literal["ads", "queries"]
CONTRACT_OF: dict[str, Contract] = {"ads": ADS, "queries": QUERIES}


@dataclass
class ValidatedInput:
    rows: pa.Table  # (id, text) of every valid row, in file order
    rejected: pa.Table  # the bad rows with _file, _row, _reason
    files: list[Path]


def validate_inputs(path: str | Path, kind: InputKind) -> ValidatedInput:
    """Check every input file against its contract; bad rows are set aside with file, row and reason.

    Duplicate ids across files are rejected too (the second occurrence), so each id is embedded once.
    """
    contract = CONTRACT_OF[kind]
    files = parquet_files(path)
    valid, rejected, seen = [], [], set()
    for f in files:
        table = read_parquet(f)
        good, bad = split_valid(table.append_column("_pos", pa.array(np.arange(table.num_rows))), contract, str(f))
        if kind == "ads" and "deleted" in good.column_names:  # after validation, so row numbers stay the file's
            good = good.filter(pa.compute.invert(pa.compute.fill_null(good.column("deleted"), False)))
        ids = good.column(contract.key).to_pylist()
        dup = np.array([i in seen for i in ids], dtype=bool)
        seen.update(ids)
        if dup.any():
            extra = good.filter(pa.array(dup))
            extra = extra.append_column("_row", extra.column("_pos")).append_column(
                "_reason", pa.array([f"{contract.key} duplicate id seen in an earlier file"] * extra.num_rows))
            bad = pa.concat_tables([bad, extra], promote_options="permissive")
            good = good.filter(pa.array(~dup))
        valid.append(good.select([contract.key, contract.text]).rename_columns(["id", "text"]))
        if bad.num_rows:
            bad = bad.drop_columns(["_pos"]).append_column("_file", pa.array([str(f)] * bad.num_rows, pa.string()))
            rejected.append(bad)
    rows = pa.concat_tables(valid)
    rejected_table = (pa.concat_tables(rejected, promote_options="permissive") if rejected
                      else pa.table({"_file": pa.array([], pa.string()), "_row": pa.array([], pa.int64()),
                                     "_reason": pa.array([], pa.string())}))
    for r in rejected_table.select(["_file", "_row", "_reason"]).to_pylist()[:10]:
        logger.warning("rejected %s row %d: %s", r["_file"], r["_row"], r["_reason"])
    return ValidatedInput(rows, rejected_table, files)


class EmbedBatch:
    """Encode an (id, text) batch into an `embeddings` batch. Ray Data runs it as an actor: the model loads once."""

    def __init__(self, model: ModelRef | dict, kind: InputKind, batch_size: int, runtime: Runtime | dict | None = None):
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

