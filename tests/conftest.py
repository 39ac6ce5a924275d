"""Session-wide fixtures: one real redis-server and one real local Ray for the whole run, tiny models on disk.

Expensive things are started once per session (docs/design.md, "Code style" 12); tests take cheap copies.
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Ray Train polls its workers every 2 s by default, a wait added to each of the ~30 tiny training runs here
# (a finished run is noticed a poll later); set before the session's Ray starts so its processes inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Each Ray Train run starts a preemption watcher, an actor process with nothing to watch on one node (it follows node
# drains; ~2 CPU-s a run on 2 cores), and metrics callbacks feeding Prometheus gauges that nobody scrapes here.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
# Ray Data's Parquet reader lists files through a pool of up to 32 FooterReader actors per read (sized for thousands
# of files on a large cluster); each is a process start (~1 CPU-s) and their churn leaves idle workers to start and
# kill. The tests read a few files per job: one actor lists them. 3 embed jobs of 300 ads: 51-57 -> 39 CPU-s.
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def received(sub, n: int, timeout_s: float = 5.0) -> list[bytes]:
    """The data of the next ``n`` pub/sub messages (the first get_message only consumes the subscribe ack)."""
    out: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        if (message := sub.get_message(timeout=0.1)) is not None:
            out.append(message["data"])
    return out


def assert_valid_serve_config(config: dict) -> None:
    """A `serve deploy` config whose apps import from this repo and whose args fit the typed builder."""
    from ray.serve.schema import ServeDeploySchema

    from serving.app import AppArgs

    ServeDeploySchema.model_validate(config)
    for app in config["applications"]:
        module, attr = app["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), attr))
        AppArgs.model_validate(app["args"])


def shipped_persistence() -> list[str]:
    """The persistence lines of the production redis.conf (infra/kuberay/redis.yaml), as redis-server options."""
    docs = yaml.safe_load_all((REPO / "infra/kuberay/redis.yaml").read_text())
    conf = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["redis.conf"]
    lines = [line.split() for line in conf.splitlines() if line.split()[:1] in (["appendonly"], ["appendfsync"])]
    assert len(lines) == 2, f"expected appendonly and appendfsync in the shipped redis.conf, got {lines}"
    return [arg for name, value in lines for arg in (f"--{name}", value)]


class DurableRedis:
    """A redis-server with the shipped persistence that a test may SIGKILL and start again on the same folder."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port, self.pid = folder, free_port(), 0
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        out = subprocess.run([str(REPO / "infra/redis/start.sh"), str(self.port), str(self.folder),
                              *shipped_persistence()], check=True, capture_output=True, text=True)
        self.pid = int(out.stdout.strip())

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        raise TimeoutError(f"redis-server {self.pid} survived SIGKILL")


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[DurableRedis]:
    server = DurableRedis(tmp_path / "redis")
    server.start()
    yield server
    subprocess.run(["kill", str(server.pid)], check=False, capture_output=True)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A project-owned redis-server on a free loopback port, started with infra/redis, stopped at the end."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed; `make test` installs it (Debian package redis-server)")
    port, folder = free_port(), tmp_path_factory.mktemp("redis")
    pid = subprocess.run([str(REPO / "infra/redis/start.sh"), str(port), str(folder)], check=True,
                         capture_output=True, text=True).stdout.strip()
    yield f"redis://127.0.0.1:{port}/0"
    subprocess.run(["kill", pid], check=False)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[dict]:
    """One local Ray (with its dashboard, for job submission) shared by every integration test."""
    import ray

    dashboard_port = free_port()
    # 4 logical CPUs on 2 cores: actor pools must leave slots for Ray Data's read/write tasks.
    context = ray.init(num_cpus=4, include_dashboard=True, dashboard_port=dashboard_port,
                       log_to_driver=False, configure_logging=False)
    yield {"gcs_address": context.address_info["gcs_address"], "dashboard": f"http://127.0.0.1:{dashboard_port}"}
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models train faster on one thread, and two threads stall badly on a busy 2-core CI box."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hlm.tiny import save_tiny_encoder

    return save_tiny_encoder(tmp_path_factory.mktemp("models") / "tiny-bert", "bert")


@pytest.fixture(scope="session")
def catalog_split(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The built-in catalogue (120 ads, 60 queries → 45 train / 15 dev) with a tiny 48-d teacher (seed 1) saved on
    disk and its ad and query embeddings written as embeddings files: the inputs of the training-side jobs."""
    from hlm.catalog import generate_catalog, split_queries
    from hlm.data import write_embeddings
    from hlm.encoder import Encoder
    from hlm.importers import write_dataset
    from hlm.tiny import save_tiny_encoder

    root = tmp_path_factory.mktemp("catalog-split")
    train, dev = split_queries(generate_catalog(n_ads=120, n_queries=60), 0.25)
    write_dataset(train, root / "train")
    write_dataset(dev, root / "dev")
    teacher_dir = save_tiny_encoder(root / "teacher", "bert", hidden=48, seed=1)
    teacher = Encoder.load(teacher_dir)
    space = teacher.describe_space()
    write_embeddings(root / "emb" / "ads.parquet", train.ads["ad_id"].to_pylist(),
                     teacher.encode(train.ads["text"].to_pylist(), kind="ad"), space)
    for name, split in (("queries_train", train), ("queries_dev", dev)):
        write_embeddings(root / "emb" / f"{name}.parquet", split.queries["query_id"].to_pylist(),
                         teacher.encode(split.queries["text"].to_pylist()), space)
    return {"root": root, "teacher": teacher_dir, "train_queries": root / "train/queries.parquet",
            "teacher_queries": root / "emb/queries_train.parquet", "ads_emb": root / "emb/ads.parquet",
            "dev_queries": root / "dev/queries.parquet", "dev_labels": root / "dev/labels.parquet",
            "dev_teacher_queries": root / "emb/queries_dev.parquet", "space": space["fingerprint"]}


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """`make reliability`'s table: one row per reliability scenario with its outcome, time and recorded figures."""
    rows = []
    for outcome in ("passed", "failed", "error", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            scenario = "reliability" in getattr(report, "keywords", {})
            if scenario and (report.when == "call" or outcome != "passed" and report.when == "setup"):
                rows.append((report.nodeid.rsplit("/", 1)[-1].replace(".py::", "::"), outcome, report.duration,
                                 dict(getattr(report, "user_properties", []))))
    if not rows:
        return
    terminalreporter.section("reliability scenarios")
    terminalreporter.write_line(f"{'scenario (file::test)':<110} {'result':<8} {'s':>6}  figures")
    for name, outcome, seconds, figures in sorted(rows):
        shown = ", ".join(f"{k}={v}" for k, v in figures.items())
        terminalreporter.write_line(f"{name[:110]:<110} {outcome.upper():<8} {seconds:>6.1f}  {shown}")
