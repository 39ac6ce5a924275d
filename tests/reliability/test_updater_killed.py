"""SIGKILL of `python -m pipelines.stream_ads` (its whole process group) mid-stream, then a restart: every event is
applied exactly once and search shows every upsert and no deleted ad. Both updaters join the session's Ray, as a job
submitted to a long-lived cluster does; the killed driver's encoder actor dies with it (Ray ends an owner's actors)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hlm.deltas import DeltaLog
from hlm.encoder import Encoder
from hlm.events import AdEventProducer, events_key
from hlm.index import AdIndex
from hlm.live_index import LiveIndex
from hlm.redis_client import redis_client
from hlm.store import IndexStore

pytestmark = [pytest.mark.integration, pytest.mark.reliability]
REPO = Path(__file__).resolve().parents[2]


def start_updater(redis_url: str, teacher: Path, index: str, log: Path, ray_address: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'platform'}:{REPO}", "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ray_address}
    cmd = [sys.executable, "-m", "pipelines.stream_ads", "--set", f"teacher.model={teacher}",
           "--set", f"stream.index={index}", "--set", f"stream.redis_url={redis_url}", "--set", "stream.lease_s=2",
           "--set", "stream.batch_size=2", "--set", "embed.num_actors=1"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own group: the kill takes every process it started


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_sigkill_mid_stream_then_restart_applies_every_event_exactly_once(redis_url: str, tiny_bert_dir: Path,
                                                                         tmp_path: Path, ray_cluster) -> None:
    # Given a base of 30 ads embedded by the tiny teacher, and 60 events (40 upserts, 20 deletes) in the stream
    client, index = redis_client(redis_url), "killed-updater"
    teacher = Encoder.load(tiny_bert_dir)
    store = IndexStore(client, index)
    base_ids = [f"ad-{i}" for i in range(30)]
    store.publish(AdIndex.build(base_ids, teacher.encode([f"base ad {i}" for i in base_ids], kind="ad"),
                                teacher.space), version="v1")
    upserts = {f"new-{i}": f"streamed ad number {i} {'drill lamp paint'[i % 10:]}" for i in range(40)}
    events = [{"op": "upsert", "ad_id": a, "text": t} for a, t in upserts.items()]
    events[::2] = [{"op": "delete", "ad_id": f"ad-{i}"} for i in range(20)]
    deleted = {e["ad_id"] for e in events if e["op"] == "delete"}
    upserted = {e["ad_id"]: e["text"] for e in events if e["op"] == "upsert"}
    sent = AdEventProducer(client, index).send(events)
    log_file, deltas = tmp_path / "updater.log", DeltaLog(client, index)
    # When the updater is SIGKILLed once it has written some (micro-batches of 2) but not all of them
    first = start_updater(redis_url, tiny_bert_dir, index, log_file, ray_cluster["gcs_address"])
    try:
        wait_for(lambda: len(deltas.read("v1")) >= 2, 180, f"the first delta entries ({log_file})")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    written_before = len(deltas.read("v1"))
    assert written_before < len(sent), "the kill came too late to interrupt the stream"
    # And a new one is started (it waits out the dead one's lease, then claims its pending events)
    second = start_updater(redis_url, tiny_bert_dir, index, log_file, ray_cluster["gcs_address"])
    try:
        wait_for(lambda: len(deltas.read("v1")) >= len(sent)
                 and client.xpending(events_key(index), "hlm-updater")["pending"] == 0, 180, "the rest")
    finally:
        os.killpg(second.pid, signal.SIGTERM)
        second.wait(60)
    # Then the log holds every event exactly once, and search shows every upsert and no deleted ad
    log = [e.event_id for e in deltas.read("v1")]
    assert len(log) == len(sent) and set(log) == set(sent)
    live = LiveIndex(store, teacher.space)
    assert live.refresh()
    q_emb = teacher.encode(list(upserted.values()), kind="ad")  # (n, d): an upsert's own vector finds it first
    hits, _ = live.search(q_emb, 5)
    assert [row[0][0] for row in hits] == list(upserted)
    everything, _ = live.search(np.ones((1, teacher.dim), np.float32), 100)
    assert not deleted & {a for a, _ in everything[0]} and len(everything[0]) == 10 + len(upserted)
