"""The whole HARNESS-LM flow on the embedded default models and a built-in catalogue (`make demo`).

    python -m pipelines.demo --out runs/demo

Prepare a catalogue → run the recipe job (`pipelines.recipe`: embed ads and queries with the teacher on Ray Data,
align the student to the teacher's query space, refine it against the frozen teacher ad embeddings, evaluate
teacher vs students over the full ad index, publish the index to a project-owned Redis) → serve the refined
student with Ray Serve and send a few queries. The recipe's config is left in OUT/recipe.yaml: rerun it with
`python -m pipelines.recipe --config OUT/recipe.yaml` (every finished stage is skipped). The Serve config the demo
served is left in OUT/serve.yaml (serving/config.yaml with the refined student, which is in the space of the
teacher's index): after publishing that index to a Redis, `serve run OUT/serve.yaml` serves it again.

Writes OUT/data/{train,dev}/ (the catalogue), OUT/recipe/ (the recipe's stages, the report in
OUT/recipe/evaluate/), OUT/recipe.yaml, OUT/serve.yaml and OUT/demo.config.yaml; the Redis it starts and stops
keeps its files in OUT/redis/.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import ray
import requests
import yaml

from hlm.catalog import generate_catalog, split_queries
from hlm.cli import job_parser, start_job
from hlm.config import Config
from hlm.importers import write_dataset
from hlm.recipe import RecipeConfig
from hlm.stages import stage_table
from pipelines.recipe import run_recipe

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


def demo_recipe(cfg: Config, out: Path, redis_url: str, align_epochs: int, refine_steps: int) -> RecipeConfig:
    """The demo's recipe: the default teacher as it is (no phase 1), the whole student, one row per family."""
    recipe = {
        "data": {"train": str(out / "data/train"), "dev": str(out / "data/dev")}, "out": str(out / "recipe"),
        "teacher": None, "own_index": ["student-default"],
        "align": {"epochs": align_epochs, "lr": 2e-4, "warmup_steps": 10},
        "refine": {"max_steps": refine_steps, "lr": 5e-5, "l2_weight": 1.0, "batch_size": 32},
        "publish": {"redis_url": redis_url, "index": "ads"},
    }
    # 2 encoder actors + a slot for IO; a trainer worker with both cores
    settings = {**cfg.model_dump(mode="json"), "embed": {**cfg.embed.model_dump(), "num_actors": 2},
                "cluster": {**cfg.cluster.model_dump(), "cpus_per_worker": 2}, "recipe": recipe}
    (out / "recipe.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    return RecipeConfig.model_validate(settings)


def write_serve_config(out: Path, student: Path) -> Path:
    """OUT/serve.yaml: serving/config.yaml serving `student` (a folder aligned to the published index's teacher).
    The Redis URL stays unset: `serve run` then reads $HLM_REDIS_URL, else redis://127.0.0.1:6379/0."""
    config = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    for app in config["applications"]:
        app["args"]["student"] = {"model": str(Path(student).resolve())}
    path = out / "serve.yaml"
    path.write_text("# Written by `make demo`: serving/config.yaml serving its refined student (README, \"Serve\")\n"
                    + yaml.safe_dump(config, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__, __file__)
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

    banner("1/3 prepare: a built-in sponsored-search catalogue")
    train, dev = split_queries(generate_catalog(args.n_ads, args.n_queries, seed=cfg.seed), 0.25, seed=cfg.seed)
    for name, ds in (("train", train), ("dev", dev)):
        if not (out / "data" / name / "labels.parquet").exists():  # rewriting would change the recipe's keys
            counts = write_dataset(ds, out / "data" / name)
            print(f"{name}: {counts} -> {out / 'data' / name}")

    redis_url, redis_pid = start_redis(out / "redis")
    try:
        banner("2/3 the recipe: embed (Ray Data) → align → refine (Ray Train) → evaluate → publish to Redis")
        recipe_cfg = demo_recipe(cfg, out, redis_url, args.align_epochs, args.refine_steps)
        recipe, results = run_recipe(recipe_cfg)
        print(recipe.out("evaluate", "report.md").read_text())
        print(stage_table(results))
        version = next(r.record for r in results if r.name == "publish")["version"]
        print(f"published index 'ads' version {version} to {redis_url}")

        banner("3/3 serve the refined student against the published index (Ray Serve)")
        serve_yaml = write_serve_config(out, recipe.out(f"refine-L{recipe.depths[0]}", "model"))
        serve_and_query(serve_yaml, redis_url, args.serve_seconds,
                        dict(zip(train.ads["ad_id"].to_pylist(), train.ads["title"].to_pylist(), strict=True)))
    finally:
        subprocess.run(["kill", redis_pid], check=False)
        ray.shutdown()
    print(f"\ndemo finished in {time.perf_counter() - started:.0f}s; everything it wrote is under {out}")
    print(f"serve it again (its Redis is gone: start one and publish the teacher's ad index first):\n"
          f"  infra/redis/start.sh 6379 runs/redis\n"
          f"  python -m pipelines.publish_index --embeddings {recipe.out('ads')} --index ads "
          f"--redis-url redis://127.0.0.1:6379/0\n"
          f"  serve run {serve_yaml}")
    return 0


def serve_and_query(serve_yaml: Path, redis_url: str, serve_seconds: float, titles: dict[str, str]) -> None:
    """Serve the app of `serve_yaml` (what the demo leaves) against `redis_url` and send the demo queries."""
    from ray import serve

    from serving.app import build_app

    args = yaml.safe_load(serve_yaml.read_text())["applications"][0]["args"]
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(build_app({**args, "redis_url": redis_url, "max_replicas": 1}), name="hlm", route_prefix="/")
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
