r"""Build a FAISS index from teacher ad embeddings and publish it to Redis as a new version.

    python -m pipelines.publish_index --embeddings EMB/ads --index ads --factory HNSW32 [--redis-url URL]
    python -m pipelines.publish_index --embeddings EMB/ads --index ads \
        --factory "IVF1024_HNSW32,PQ96x4fs,Refine(SQ8)" --nprobe 16 --k-factor 10
    python -m pipelines.publish_index --config configs/refresh.yaml --embeddings EMB/ads --set refresh.min_recall=0.9

The index settings are the config's `refresh` section, the same ones the nightly refresh builds and gates with
(`refresh.index`, `factory`, `nprobe`, `ef_search`, `k_factor`, `redis_url`, `min_recall`, `recall_sample`), so
`--config configs/refresh.yaml` publishes the index the refresh will later replace. Each flag below is a shortcut
for `--set refresh.<name>=…` and wins over it. `--nprobe`, `--ef-search` and `--k-factor` are stored in the index
as its serving defaults (a request may still pass its own); the recall gate searches with them.

Writes a new version of the index to Redis (keys hlm:{index}:*, `current` moved to it) when ANN recall@10 vs
exact search reaches `refresh.min_recall`, else nothing (exit 1); prints the version, its size and recall.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hlm.cli import job_parser, start_job
from hlm.data import DataError, read_embeddings
from hlm.gate import ann_recall, gate
from hlm.index import AdIndex
from hlm.redis_client import redis_client
from hlm.store import IndexStore, StoreError

# the flags that set the `refresh` field of their name (they predate the config and stay as shortcuts)
SHORTCUTS = ("index", "factory", "redis_url", "nprobe", "ef_search", "k_factor", "min_recall")


def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__, __file__)
    parser.add_argument("--embeddings", required=True, type=Path, help="embeddings Parquet file or folder (ads)")
    parser.add_argument("--index", help="refresh.index: index name, keys hlm:{index}:* (default: ads)")
    parser.add_argument("--factory", help="refresh.factory: FAISS index_factory string, e.g. Flat, HNSW32, "
                        "IVF256,PQ32 (default: Flat)")
    parser.add_argument("--redis-url", help="refresh.redis_url (default: $HLM_REDIS_URL, else "
                        "redis://127.0.0.1:6379/0)")
    parser.add_argument("--nprobe", type=int, help="refresh.nprobe: IVF lists searched per query")
    parser.add_argument("--ef-search", type=int, help="refresh.ef_search: HNSW (or an IVF's HNSW quantizer) "
                        "search breadth")
    parser.add_argument("--k-factor", type=float, help="refresh.k_factor: …,Refine(…)/RFlat: k·k_factor "
                        "candidates are re-scored")
    parser.add_argument("--min-recall", type=float, help="refresh.min_recall: recall@10 vs exact search required "
                        "to publish (default: 0.95)")
    args = parser.parse_args(argv)
    # JSON is YAML: a string flag stays a string (an index named 123 or yes), a number stays a number
    args.overrides += [f"refresh.{name}={json.dumps(value)}" for name in SHORTCUTS
                       if (value := getattr(args, name)) is not None]
    job = start_job("publish_index", args).refresh
    try:
        ids, emb, space = read_embeddings(args.embeddings)
        index = AdIndex.build(ids, emb, space["fingerprint"], job.factory, nprobe=job.nprobe,
                              ef_search=job.ef_search, k_factor=job.k_factor)
        recall = ann_recall(index, emb, sample=job.recall_sample, seed=0)
        result = gate(new_space=index.space, serving_space=None, recall=recall, min_recall=job.min_recall)
        if not result.passed:
            print(f"error: {job.factory}: {result.reason}; nothing published", file=sys.stderr)
            return 1
        store = IndexStore(redis_client(job.redis_url), job.index)
        version = store.publish(index, source=str(args.embeddings))
    except (DataError, StoreError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    defaults = {"nprobe": index.nprobe, "ef_search": index.ef_search, "k_factor": index.k_factor}
    print(f"published index '{job.index}' version {version}: {index.ntotal} ads, dim {index.dim}, {job.factory} "
          f"({', '.join(f'{k} {v:g}' for k, v in defaults.items() if v is not None) or 'no search parameters'}), "
          f"recall@10 {recall:.3f}, space {index.space}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
