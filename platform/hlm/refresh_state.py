"""What a refresh run leaves in its folder, and how the next run diffs the catalogue against it.

``work_dir/<run>/embeddings/`` holds the full embedding set (space in its metadata) and
``text_hashes.parquet`` the sha256 of each ad's text; an ad whose hash changed is embedded again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hlm.data import read_embeddings, write_embeddings


@dataclass
class Diff:
    new: list[str]
    changed: list[str]
    deleted: list[str]
    unchanged: list[str]

    @property
    def to_embed(self) -> list[str]:
        return self.new + self.changed


@dataclass(frozen=True)
class State:
    """What a run leaves in its folder: the full embedding set and the text hash of each ad."""

    ids: list[str]
    emb: np.ndarray  # (N, d) float32
    space: dict
    hashes: dict[str, str]


def text_hashes(ads: pa.Table) -> dict[str, str]:
    """ad_id -> sha256 of its text, in table order (live rows: `read_catalogue` has dropped the deleted ones)."""
    return {a: hashlib.sha256(t.encode()).hexdigest()
            for a, t in zip(ads.column("ad_id").to_pylist(), ads.column("text").to_pylist(), strict=True)}


def diff(current: dict[str, str], previous: dict[str, str]) -> Diff:
    """New, changed (other text hash), deleted (in previous only) and unchanged ids; current's order."""
    return Diff(new=[a for a in current if a not in previous],
                changed=[a for a, h in current.items() if a in previous and previous[a] != h],
                deleted=[a for a in previous if a not in current],
                unchanged=[a for a, h in current.items() if previous.get(a) == h])


def merge_embeddings(order: list[str], previous: tuple[list[str], np.ndarray],
                     fresh: tuple[list[str], np.ndarray]) -> np.ndarray:
    """(len(order), d) float32: each id's fresh vector, else its previous one; an id in neither raises."""
    src = {a: (previous[1], i) for i, a in enumerate(previous[0])} | {a: (fresh[1], i) for i, a in enumerate(fresh[0])}
    if missing := [a for a in order if a not in src]:
        raise ValueError(f"{len(missing)} ad(s) have neither a fresh nor a previous embedding, e.g. {missing[:5]}")
    rows = [m[i] for m, i in (src[a] for a in order)]
    if len(widths := {len(r) for r in rows}) > 1:
        raise ValueError(f"previous and fresh embeddings differ in width: {sorted(widths)}")
    return np.asarray(rows, np.float32).reshape(len(order), -1) if rows else np.zeros((0, 0), np.float32)


def load_state(folder: str | Path) -> State | None:
    """The state a run left in ``folder``, or None when it holds none."""
    folder = Path(folder)
    if not (folder / "text_hashes.parquet").exists() or not (folder / "embeddings").is_dir():
        return None
    hashes = pq.read_table(folder / "text_hashes.parquet").to_pydict()
    ids, emb, space = read_embeddings(folder / "embeddings")
    return State(ids, emb, space, dict(zip(hashes["ad_id"], hashes["sha256"], strict=True)))


def save_state(folder: Path, state: State) -> None:
    """The full embedding set, then the text hashes (written last: they mark the state complete)."""
    write_embeddings(folder / "embeddings" / "part-00000.parquet", state.ids, state.emb, state.space)
    table = pa.table({"ad_id": state.ids, "sha256": [state.hashes[a] for a in state.ids]})
    pq.write_table(table.replace_schema_metadata({b"hlm.space": state.space["fingerprint"].encode()}),
                   folder / ".text_hashes.parquet.tmp")
    (folder / ".text_hashes.parquet.tmp").rename(folder / "text_hashes.parquet")
