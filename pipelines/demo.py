"""The whole HARNESS-LM flow on the embedded default models and a built-in catalogue (`make demo`).

prepare a catalogue → embed ads and queries with the teacher (Ray Data) → align the student to the teacher's
query space (L2) → refine it against the frozen teacher ad embeddings (InfoNCE + hard negatives) → evaluate
teacher vs students over the full ad index → publish the index to a project-owned Redis → serve the student
with Ray Serve and send a few queries.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import ray
import requests

from hlm.catalog import generate_catalog, split_queries
from hlm.cli import job_parser, start_job
from hlm.config import Config, ModelRef
from hlm.data import qrels_from_labels, read_embeddings
from hlm.encoder import Encoder
from hlm.evaluation import retrieval_quality
from hlm.importers import write_dataset
from hlm.index import AdIndex
from hlm.metrics import recovery
from hlm.mining import mine_hard_negatives, positive_pairs, relevant_rows
from hlm.store import IndexStore, redis_client
from hlm.train import train_align, train_refine
from pipelines.embed import run_embed

logger = logging.getLogger("pipelines.demo")
REPO = Path(__file__).resolve().parents[1]
DEMO_QUERIES = ["cordless drill 20v", "white interior paint 1 gallon", "brushed nickel bathroom faucet"]


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def start_redis(folder: Path) -> tuple[str, str]:
    from socket import socket

    with socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pid = subprocess.run([str(REPO / "infra/redis/start.sh"), str(port), str(folder)], check=True,
                         capture_output=True, text=True).stdout.strip()
    return f"redis://127.0.0.1:{port}/0", pid


def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--n-ads", type=int, default=1500)
    parser.add_argument("--n-queries", type=int, default=1200)
    parser.add_argument("--align-epochs", type=int, default=4)
    parser.add_argument("--refine-steps", type=int, default=100)
    parser.add_argument("--serve-seconds", type=float, default=0.0,
                        help="keep the endpoint up this long after the demo queries (0: stop at once)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    cfg: Config = start_job("demo", args, out)
    started = time.perf_counter()

    banner("1/6 prepare: a built-in sponsored-search catalogue")
    train, dev = split_queries(generate_catalog(args.n_ads, args.n_queries, seed=cfg.seed), 0.25, seed=cfg.seed)
    for name, ds in (("train", train), ("dev", dev)):
        counts = write_dataset(ds, out / "data" / name)
        print(f"{name}: {counts} -> {out / 'data' / name}")

    banner("2/6 embed ads and queries with the teacher (Ray Data)")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)  # 2 encoder actors + a slot for IO
    cfg.embed.num_actors = 2
    emb = out / "embeddings"
    run_embed(cfg, cfg.teacher, out / "data/train/ads.parquet", "ads", emb / "ads")
    run_embed(cfg, cfg.teacher, out / "data/train/queries.parquet", "queries", emb / "queries_train")
    run_embed(cfg, cfg.teacher, out / "data/dev/queries.parquet", "queries", emb / "queries_dev")
    ad_ids, ad_emb, space = read_embeddings(emb / "ads")
    teacher_index = AdIndex.build(ad_ids, ad_emb, space["fingerprint"], "Flat")

    banner("3/6 align the student to the teacher's query space (L2)")
    train_qids, train_q_emb, _ = read_embeddings(emb / "queries_train")
    text = dict(zip(train.queries["query_id"].to_pylist(), train.queries["text"].to_pylist(), strict=True))
    student = Encoder.load(cfg.student, cfg.runtime)
    align_cfg = cfg.train.model_copy(update={"phase": "align", "epochs": args.align_epochs, "lr": 2e-4,
                                             "warmup_steps": 10})
    aligned = train_align(student, [text[q] for q in train_qids], train_q_emb, align_cfg,
                          teacher_space=space["fingerprint"]).encoder
    aligned.save(out / "students" / "aligned")
    print(f"aligned student -> {out / 'students' / 'aligned'}")

    banner("4/6 refine the student against the frozen teacher ad embeddings (InfoNCE + hard negatives)")
    pairs = positive_pairs(train.queries, train.labels, ad_ids)
    row_of = {q: i for i, q in enumerate(train_qids)}
    pairs = mine_hard_negatives(pairs, train_q_emb[[row_of[q] for q in pairs.query_ids]], teacher_index,
                                relevant_rows(pairs))
    refine_cfg = cfg.train.model_copy(update={"phase": "refine", "max_steps": args.refine_steps, "lr": 5e-5,
                                              "l2_weight": 1.0, "batch_size": 32})
    refined = train_refine(aligned, pairs.queries, pairs.positive_ad_idx, ad_emb, refine_cfg,
                           hard_negative_idx=pairs.hard_negative_idx,
                           teacher_q_emb=train_q_emb[[row_of[q] for q in pairs.query_ids]],
                           teacher_space=space["fingerprint"]).encoder
    refined.save(out / "students" / "refined")
    print(f"refined student -> {out / 'students' / 'refined'} ({len(pairs.queries)} pairs)")

    banner("5/6 evaluate on held-out queries over the full ad index")
    dev_qids, dev_q_emb, _ = read_embeddings(emb / "queries_dev")
    dev_text = dict(zip(dev.queries["query_id"].to_pylist(), dev.queries["text"].to_pylist(), strict=True))
    qrels = qrels_from_labels(dev.labels)
    queries = [dev_text[q] for q in dev_qids]
    base = Encoder.load(cfg.student, cfg.runtime)  # off the shelf, in its own space with its own ad index
    ad_text = dict(zip(train.ads["ad_id"].to_pylist(), train.ads["text"].to_pylist(), strict=True))
    base_index = AdIndex.build(ad_ids, base.encode([ad_text[a] for a in ad_ids], kind="ad"), base.space, "Flat")
    aligned = Encoder.load(out / "students" / "aligned", cfg.runtime)  # refine trained the in-memory copy
    quality = lambda index, q_emb: retrieval_quality(index, q_emb, dev_qids, qrels)  # noqa: E731
    rows = {"teacher (mpnet-base, 110M)": quality(teacher_index, dev_q_emb),
            "student off-the-shelf (MiniLM, own index)": quality(base_index, base.encode(queries)),
            "student aligned (teacher index)": quality(teacher_index, aligned.encode(queries)),
            "student aligned + refined": quality(teacher_index, refined.encode(queries))}
    teacher_p100 = rows["teacher (mpnet-base, 110M)"]["P@100"]
    print(f"{'model':44s} {'P@100':>7s} {'R@100':>7s} {'nDCG@10':>8s} {'MRR@10':>7s} {'recovery':>9s}")
    for name, m in rows.items():
        print(f"{name:44s} {m['P@100']:7.4f} {m['R@100']:7.4f} {m['nDCG@10']:8.4f} {m['MRR@10']:7.4f} "
              f"{recovery(m['P@100'], teacher_p100):9.1%}")
    (out / "report.json").write_text(json.dumps(rows, indent=2))

    banner("6/6 publish the teacher ad index to Redis and serve the refined student (Ray Serve)")
    redis_url, redis_pid = start_redis(out / "redis")
    try:
        version = IndexStore(redis_client(redis_url), "ads").publish(teacher_index, source=str(emb / "ads"))
        print(f"published index 'ads' version {version} to {redis_url}")
        serve_and_query(out / "students" / "refined", redis_url, args.serve_seconds,
                        dict(zip(train.ads["ad_id"].to_pylist(), train.ads["title"].to_pylist(), strict=True)))
    finally:
        subprocess.run(["kill", redis_pid], check=False)
        ray.shutdown()
    print(f"\ndemo finished in {time.perf_counter() - started:.0f}s; everything it wrote is under {out}")
    return 0


def serve_and_query(student: Path, redis_url: str, serve_seconds: float, titles: dict[str, str]) -> None:
    from ray import serve

    from serving.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(build_app({"student": ModelRef(model=str(student)).model_dump(), "redis_url": redis_url,
                         "max_replicas": 1}), name="hlm", route_prefix="/")
    url = "http://127.0.0.1:8000"
    for query in DEMO_QUERIES:
        body = requests.post(f"{url}/v1/search", json={"query": query, "k": 3}, timeout=60).json()
        print(f"POST {url}/v1/search {query!r} (index {body['index_version']}):")
        for ad in body["ads"]:
            print(f"    {ad['score']:.3f}  {ad['ad_id']}  {titles[ad['ad_id']]}")
    print(f"endpoint: {url}/v1/search (docs at {url}/docs)")
    if serve_seconds > 0:
        print(f"serving for {serve_seconds:.0f}s more; try: curl -X POST {url}/v1/search "
              "-H 'content-type: application/json' -d '{\"query\": \"ladder\", \"k\": 5}'")
        time.sleep(serve_seconds)
    serve.shutdown()


if __name__ == "__main__":
    sys.exit(main())
