"""Build a FAISS index from teacher ad embeddings and publish it to Redis as a new version.

    python -m pipelines.publish_index --embeddings EMB/ads --index ads --factory HNSW32 [--redis-url URL]
    python -m pipelines.publish_index --embeddings EMB/ads --index ads \
        --factory "IVF1024_HNSW32,PQ96x4fs,Refine(SQ8)" --nprobe 16 --k-factor 10

`--nprobe`, `--ef-search` and `--k-factor` are stored in the index as its serving defaults (a request may
still pass its own); the recall gate searches with them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hlm.cli import command_name, command_notes, setup_logging
from hlm.config import RefreshJob
from hlm.data import DataError, read_embeddings
from hlm.gate import ann_recall, gate
from hlm.index import AdIndex
from hlm.redis_client import redis_client
from hlm.store import IndexStore, StoreError


def main(argv: list[str] | None = None) -> int:
    # no --config/--set: nothing here is a config field, and a flag that is accepted and ignored misleads
    parser = argparse.ArgumentParser(prog=command_name(), description=__doc__.splitlines()[0],
                                     epilog=command_notes(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embeddings", required=True, type=Path, help="embeddings Parquet file or folder (ads)")
    parser.add_argument("--index", required=True, help="index name: keys hlm:{index}:*")
    parser.add_argument("--factory", default="Flat", help="FAISS index_factory string, e.g. Flat, HNSW32, IVF256,PQ32")
    parser.add_argument("--redis-url", help="default: $HLM_REDIS_URL, else redis://127.0.0.1:6379/0")
    parser.add_argument("--nprobe", type=int, help="IVF: lists searched per query")
    parser.add_argument("--ef-search", type=int, help="HNSW (or an IVF's HNSW quantizer): search breadth")
    parser.add_argument("--k-factor", type=float, help="…,Refine(…)/RFlat: k·k_factor candidates are re-scored")
    gate_defaults = RefreshJob()  # one gate, one set of thresholds, for this job and the nightly refresh
    parser.add_argument("--min-recall", type=float, default=gate_defaults.min_recall,
                        help="recall@10 vs exact search required to publish (refresh.min_recall's default)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        ids, emb, space = read_embeddings(args.embeddings)
        index = AdIndex.build(ids, emb, space["fingerprint"], args.factory, nprobe=args.nprobe,
                              ef_search=args.ef_search, k_factor=args.k_factor)
        recall = ann_recall(index, emb, sample=gate_defaults.recall_sample, seed=0)
        result = gate(new_space=index.space, serving_space=None, recall=recall, min_recall=args.min_recall)
        if not result.passed:
            print(f"error: {args.factory}: {result.reason}; nothing published", file=sys.stderr)
            return 1
        store = IndexStore(redis_client(args.redis_url), args.index)
        version = store.publish(index, source=str(args.embeddings))
    except (DataError, StoreError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    defaults = {"nprobe": index.nprobe, "ef_search": index.ef_search, "k_factor": index.k_factor}
    print(f"published index '{args.index}' version {version}: {index.ntotal} ads, dim {index.dim}, {args.factory} "
          f"({', '.join(f'{k} {v:g}' for k, v in defaults.items() if v is not None) or 'no search parameters'}), "
          f"recall@10 {recall:.3f}, space {index.space}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
