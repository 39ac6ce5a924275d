"""A FAISS inner-product index over ad embeddings, with the ad ids and the space it belongs to.

Position ``i`` in the index is ad ``ids[i]``, so FAISS ids are plain positions (no ``IDMap`` needed) and
results keep FAISS's vocabulary: ``D`` (scores, ``(B, k)`` float32) and ``I`` (positions, ``(B, k)`` int64,
``-1`` where fewer than ``k`` ads were found). Cosine similarity is inner product on L2-normalised vectors:
normalise the embeddings before building (the encoder does when its space says ``normalize``).

Search parameters (``nprobe`` for IVF, ``ef_search`` for HNSW) are passed per call as
``faiss.SearchParameters*``. A refining index (factory ending ``,RFlat`` or ``,Refine(SQ8)``) re-scores the
``k·k_factor`` candidates of its base index with the finer codes: the usual cure for IVF-PQ's recall.
The index's stored defaults are set once at build time and never mutated by a search, so concurrent requests
with different settings cannot interfere.

Serialisation is bytes only, no pickle: the index is ``faiss.serialize_index`` bytes, the ids an Arrow IPC
stream with one string column ``ad_id`` whose schema metadata records the space and the factory string.
:meth:`AdIndex.export` writes the same as two plain files, ``index.faiss`` and ``ids.parquet``, for tools
without HLM.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

_META_SPACE = b"hlm.space"
_META_FACTORY = b"hlm.factory"


def _refine(index: faiss.Index) -> faiss.IndexRefine | None:
    """The re-ranking layer of a ``…,RFlat`` / ``…,Refine(…)`` index (always the outermost), or None."""
    core = faiss.downcast_index(index)
    return core if isinstance(core, faiss.IndexRefine) else None


def _parts(index: faiss.Index) -> tuple[faiss.IndexIVF | None, faiss.IndexHNSW | None]:
    """(the IVF layer or None, the HNSW graph or None) under any Refine/PreTransform/IDMap wrappers."""
    core = faiss.downcast_index(index)
    while isinstance(core, faiss.IndexRefine | faiss.IndexPreTransform | faiss.IndexIDMap):
        core = faiss.downcast_index(core.base_index if isinstance(core, faiss.IndexRefine) else core.index)
    if isinstance(core, faiss.IndexIVF):
        quantizer = faiss.downcast_index(core.quantizer)
        return core, quantizer if isinstance(quantizer, faiss.IndexHNSW) else None
    return None, core if isinstance(core, faiss.IndexHNSW) else None


def _positive(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int | np.integer) or value < 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class AdIndex:
    """A FAISS index (metric: inner product) plus the ad id of every position, the space and the factory."""

    def __init__(self, index: faiss.Index, ids: list[str], space: str, factory: str) -> None:
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"an AdIndex uses inner product; this FAISS index has metric {index.metric_type}")
        if index.ntotal != len(ids):
            raise ValueError(f"the FAISS index holds {index.ntotal} vectors but {len(ids)} ad ids were given")
        self.index, self.ids, self.space, self.factory = index, list(ids), space, factory

    # ------------------------------------------------------------------------------------------ build

    @classmethod
    def build(cls, ids: list[str], emb: np.ndarray, space: str, factory: str = "Flat", *,
              train_size: int | None = None, seed: int = 0, nprobe: int | None = None,
              ef_search: int | None = None, k_factor: float | None = None) -> AdIndex:
        """Build from ad ids and ``emb (N, d)``; ``nprobe``/``ef_search``/``k_factor`` set the stored serving
        defaults (``k_factor``: a refining index re-scores ``k·k_factor`` candidates of its base index).

        Indexes that need training (IVF, PQ, …) train on ``train_size`` rows sampled with ``seed``
        (all rows when None).
        """
        ids = list(ids)
        emb = np.ascontiguousarray(emb, dtype=np.float32)  # (N, d)
        if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
            raise ValueError(f"emb must be a non-empty (N, d) matrix, got shape {emb.shape}")
        if len(ids) != emb.shape[0]:
            raise ValueError(f"{len(ids)} ad ids for {emb.shape[0]} embeddings")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{len(ids) - len(set(ids))} duplicate ad id(s)")
        if not np.isfinite(emb).all():
            raise ValueError("emb holds NaN or infinite values")
        if not space:
            raise ValueError("an index needs the fingerprint of its embedding space")
        _positive("train_size", train_size)
        _positive("nprobe", nprobe)
        _positive("ef_search", ef_search)
        if k_factor is not None and not k_factor >= 1:
            raise ValueError(f"k_factor must be >= 1, got {k_factor!r}")
        n, d = emb.shape
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            sample = emb
            if train_size is not None and train_size < n:
                rows = np.sort(np.random.default_rng(seed).choice(n, train_size, replace=False))
                sample = emb[rows]  # (train_size, d)
            logger.info("training %s on %d of %d vectors", factory, len(sample), n)
            index.train(sample)
        if isinstance(faiss.downcast_index(index), faiss.IndexIDMap):
            index.add_with_ids(emb, np.arange(n, dtype=np.int64))
        else:
            index.add(emb)
        ivf, hnsw = _parts(index)
        if nprobe is not None:
            if ivf is None:
                raise ValueError(f"nprobe applies to IVF indexes, not to '{factory}'")
            ivf.nprobe = int(nprobe)
        if ef_search is not None:
            if hnsw is None:
                raise ValueError(f"ef_search applies to HNSW indexes, not to '{factory}'")
            hnsw.hnsw.efSearch = int(ef_search)
        if k_factor is not None:
            refine = _refine(index)
            if refine is None:
                raise ValueError(f"k_factor applies to refining indexes (…,RFlat or …,Refine(…)), not to '{factory}'")
            refine.k_factor = float(k_factor)
        return cls(index, ids, space, factory)

    @classmethod
    def from_embeddings(cls, path: str | os.PathLike, factory: str = "Flat", **build_kwargs) -> AdIndex:
        """Build from an embeddings Parquet file or folder (see ``hlm.data.read_embeddings``)."""
        from hlm.data import read_embeddings

        ids, emb, space = read_embeddings(path)
        if not space.get("fingerprint"):
            raise ValueError(f"{path}: the embedding space metadata has no 'fingerprint'")
        return cls.build(ids, emb, space["fingerprint"], factory, **build_kwargs)

    # ------------------------------------------------------------------------------------------ properties

    @property
    def dim(self) -> int:
        return self.index.d

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def __len__(self) -> int:
        return self.index.ntotal

    @property
    def nprobe(self) -> int | None:
        """The stored IVF default (None for non-IVF indexes)."""
        ivf, _ = _parts(self.index)
        return None if ivf is None else int(ivf.nprobe)

    @property
    def ef_search(self) -> int | None:
        """The stored HNSW default (None without an HNSW graph)."""
        _, hnsw = _parts(self.index)
        return None if hnsw is None else int(hnsw.hnsw.efSearch)

    @property
    def k_factor(self) -> float | None:
        """The stored re-ranking depth of a refining index (None for others)."""
        refine = _refine(self.index)
        return None if refine is None else float(refine.k_factor)

    def __repr__(self) -> str:
        return f"AdIndex(factory={self.factory!r}, ntotal={self.ntotal}, dim={self.dim}, space={self.space!r})"

    # ------------------------------------------------------------------------------------------ search

    def _params(self, nprobe: int | None, ef_search: int | None) -> faiss.SearchParameters | None:
        _positive("nprobe", nprobe)
        _positive("ef_search", ef_search)
        if nprobe is None and ef_search is None:
            return None
        ivf, hnsw = _parts(self.index)
        if nprobe is not None and ivf is None:
            raise ValueError(f"nprobe applies to IVF indexes, not to '{self.factory}'")
        if ef_search is not None and hnsw is None:
            raise ValueError(f"ef_search applies to HNSW indexes, not to '{self.factory}'")
        params = faiss.SearchParametersHNSW(efSearch=int(ef_search)) if ef_search is not None else None
        if ivf is not None:
            hnsw_params, params = params, faiss.SearchParametersIVF(nprobe=int(nprobe) if nprobe is not None
                                                                    else ivf.nprobe)
            if hnsw_params is not None:  # an HNSW coarse quantizer (e.g. IVF65536_HNSW32)
                params.quantizer_params = hnsw_params
        refine = _refine(self.index)
        if refine is not None:  # FAISS refuses base-index parameters handed to the refining layer directly
            params = faiss.IndexRefineSearchParameters(k_factor=refine.k_factor, base_index_params=params)
        return params

    def search(self, q_emb: np.ndarray, k: int, *, nprobe: int | None = None,
               ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``D, I``: the top-k scores ``(B, k)`` float32 and positions ``(B, k)`` int64 for ``q_emb (B, d)``.

        ``k`` above ``ntotal`` is clipped to ``ntotal``; ``k < 1``, a wrong width and non-finite
        queries raise ``ValueError``.
        """
        q_emb = np.ascontiguousarray(q_emb, dtype=np.float32)  # (B, d)
        if q_emb.ndim != 2:
            raise ValueError(f"q_emb must be (B, d), got shape {q_emb.shape}")
        if q_emb.shape[1] != self.dim:
            raise ValueError(f"query width mismatch: the index expects d={self.dim}, got d={q_emb.shape[1]}")
        if not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if not np.isfinite(q_emb).all():
            raise ValueError("q_emb holds NaN or infinite values")
        params = self._params(nprobe, ef_search)
        k = min(int(k), self.ntotal)
        return self.index.search(q_emb, k, params=params)  # (B, k), (B, k)

    def search_ids(self, q_emb: np.ndarray, k: int, *, nprobe: int | None = None,
                   ef_search: int | None = None) -> list[list[tuple[str, float]]]:
        """Per query, ``[(ad_id, score), …]`` best first; positions FAISS could not fill (-1) are dropped."""
        D, I = self.search(q_emb, k, nprobe=nprobe, ef_search=ef_search)  # noqa: E741 (FAISS names)
        return [[(self.ids[i], float(s)) for s, i in zip(d_row, i_row, strict=True) if i >= 0]
                for d_row, i_row in zip(D, I, strict=True)]

    # ------------------------------------------------------------------------------------------ recall

    def recall_at_k(self, exact: AdIndex | None, queries: np.ndarray, k: int, **search_kwargs) -> float:
        """Mean over queries of ``|I ∩ I_exact| / k`` against a Flat index over the same ads (the slow reference).

        ``exact=None`` builds the reference from this index's stored vectors, which works only when they
        are stored uncompressed (Flat, HNSW…Flat, IVF…Flat); otherwise pass ``AdIndex.build(…, "Flat")``.
        """
        if exact is None:
            exact = AdIndex.build(self.ids, self._stored_vectors(), self.space, "Flat")
        if not isinstance(faiss.downcast_index(exact.index), faiss.IndexFlat):
            raise ValueError(f"the reference must be a Flat index, got '{exact.factory}'")
        if exact.ids != self.ids or exact.space != self.space:
            raise ValueError("the reference index must hold the same ads, in the same order and space")
        _, I = self.search(queries, k, **search_kwargs)  # noqa: E741 (B, k)
        _, I_exact = exact.search(queries, k)  # (B, k)
        k = I_exact.shape[1]
        hits = [len(set(row[row >= 0].tolist()) & set(ref.tolist())) for row, ref in zip(I, I_exact, strict=True)]
        return float(np.mean(hits) / k)

    def _stored_vectors(self) -> np.ndarray:
        """The exact vectors ``(N, d)``, read back from uncompressed, untransformed storage."""
        core = faiss.downcast_index(self.index)
        while isinstance(core, faiss.IndexIDMap):  # ids are positions, so the inner order is the position order
            core = faiss.downcast_index(core.index)
        if isinstance(core, faiss.IndexFlat) or (
                isinstance(core, faiss.IndexHNSW) and isinstance(faiss.downcast_index(core.storage), faiss.IndexFlat)):
            return core.reconstruct_n(0, core.ntotal)
        if isinstance(core, faiss.IndexIVFFlat):
            copy = faiss.clone_index(core)  # the direct map is built on a copy: never mutate the shared index
            copy.make_direct_map()
            return copy.reconstruct_n(0, copy.ntotal)
        raise ValueError(f"'{self.factory}' stores compressed or transformed vectors; "
                         "pass exact=AdIndex.build(ids, emb, space, 'Flat')")

    # ------------------------------------------------------------------------------------------ bytes

    def to_bytes(self) -> tuple[bytes, bytes]:
        """(``faiss.serialize_index`` bytes, ids as Arrow IPC with the space and factory in its metadata)."""
        return faiss.serialize_index(self.index).tobytes(), ids_to_ipc(self.ids, self.space, self.factory)

    def export(self, folder: str | os.PathLike) -> list[Path]:
        """``folder/index.faiss`` (``faiss.read_index`` reads it) and ``folder/ids.parquet`` (``faiss_id`` → ``ad_id``,
        with the space and factory in its schema metadata): search with plain FAISS, map ``I`` through the ids."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(folder / "index.faiss"))
        schema = pa.schema([("faiss_id", pa.int64()), ("ad_id", pa.string())],
                           metadata={_META_SPACE: self.space.encode(), _META_FACTORY: self.factory.encode()})
        pq.write_table(pa.table([pa.array(np.arange(self.ntotal), pa.int64()), pa.array(self.ids, pa.string())],
                                schema=schema), folder / "ids.parquet")
        return [folder / "index.faiss", folder / "ids.parquet"]

    @classmethod
    def from_bytes(cls, index_bytes: bytes, ids_bytes: bytes) -> AdIndex:
        ids, space, factory = ids_from_ipc(ids_bytes)
        index = faiss.deserialize_index(np.frombuffer(index_bytes, dtype=np.uint8))
        return cls(index, ids, space, factory)


def ids_to_ipc(ids: list[str], space: str, factory: str) -> bytes:
    """An Arrow IPC stream: one string column ``ad_id``; schema metadata ``hlm.space`` and ``hlm.factory``."""
    schema = pa.schema([("ad_id", pa.string())], metadata={_META_SPACE: space.encode(),
                                                          _META_FACTORY: factory.encode()})
    table = pa.Table.from_arrays([pa.array(ids, pa.string())], schema=schema)
    options = pa.ipc.IpcWriteOptions(compression="zstd" if pa.Codec.is_available("zstd") else None)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema, options=options) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def ids_from_ipc(data: bytes) -> tuple[list[str], str, str]:
    """(ids, space, factory) from :func:`ids_to_ipc` bytes."""
    try:
        table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    except pa.ArrowInvalid as e:
        raise ValueError(f"not an Arrow IPC stream of ad ids ({e})") from e
    meta = table.schema.metadata or {}
    if table.column_names != ["ad_id"] or _META_SPACE not in meta:
        raise ValueError(f"ad ids IPC must have one column 'ad_id' and 'hlm.space' metadata, got {table.schema}")
    return table.column("ad_id").to_pylist(), meta[_META_SPACE].decode(), meta.get(_META_FACTORY, b"").decode()
