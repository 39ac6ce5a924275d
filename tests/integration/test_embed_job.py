"""The Ray Data embedding job on a real local Ray: exactly once, same numbers as in-process, clear rejects."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hlm.config import ModelRef, load_config
from hlm.data import read_embedding_space, read_embeddings
from hlm.encoder import Encoder
from hlm.staging import SUCCESS
from pipelines.embed import main as embed_main
from pipelines.embed import run_embed

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
N_ADS = 300


def write_ads(path: Path, n: int = N_ADS, null_rows: tuple[int, ...] = ()) -> dict[str, str]:
    texts = [f"ad {i}: {['cordless drill', 'white paint', 'brass lamp', 'oak door'][i % 4]} {i % 11}v"
             for i in range(n)]
    for r in null_rows:
        texts[r] = None
    ids = [f"ad-{i:05d}" for i in range(n)]
    pq.write_table(pa.table({"ad_id": ids, "text": pa.array(texts, pa.string())}), path)
    return {i: t for i, t in zip(ids, texts, strict=True) if t is not None}


def job_config(batch_size: int, actors: int):
    return load_config(overrides=[f"embed.batch_size={batch_size}", f"embed.num_actors={actors}", "profile=cpu"])


def test_embed_job_writes_every_id_once_with_in_process_vectors(ray_cluster, tiny_bert_dir, tmp_path):
    # Given a few hundred ads, one with a null text
    texts = write_ads(tmp_path / "ads.parquet", null_rows=(7,))
    # When the Ray Data job embeds them on two actors, in encoder batches that leave a partial last one (299 = 18*16+11)
    record = run_embed(job_config(16, 2), ModelRef(model=str(tiny_bert_dir)), tmp_path / "ads.parquet", "ads",
                       tmp_path / "out")
    # Then every valid id appears exactly once, equal to in-process encoding
    ids, emb, space = read_embeddings(tmp_path / "out")
    assert sorted(ids) == sorted(texts) and len(ids) == N_ADS - 1
    encoder = Encoder.load(tiny_bert_dir)
    np.testing.assert_allclose(emb, encoder.encode([texts[i] for i in ids], kind="ad"), atol=1e-5)
    # and the space fingerprint travels in the Parquet metadata
    assert space["fingerprint"] == encoder.space == read_embedding_space(tmp_path / "out")["fingerprint"]
    assert record["rows_written"] == N_ADS - 1 and record["rows_rejected"] == 1
    # and the null row is reported with its file, row and field beside the output, not in it
    rejected = pd.read_parquet(tmp_path / "out.rejected")
    assert list(zip(rejected["_row"], rejected["_reason"], strict=True)) == [(7, "text is null")]
    assert rejected["_file"][0].endswith("ads.parquet")
    # and plain pandas reads the output folder as exactly the embeddings
    plain = pd.read_parquet(tmp_path / "out")
    assert list(plain.columns) == ["id", "embedding"] and sorted(plain["id"]) == sorted(ids)


def test_inputs_stream_from_a_uri_and_rows_are_numbered_in_their_own_files(ray_cluster, tiny_bert_dir, tmp_path):
    # Given a folder of two files, read through its file:// URI (pyarrow.fs, as for s3:// or gs://): a bad row
    # deep in the second file, an id of the first file repeated in the second, and an ad marked deleted
    (tmp_path / "ads").mkdir()
    write_ads(tmp_path / "ads" / "a.parquet", n=40)
    texts = [f"lamp {i}" for i in range(50)]
    texts[33] = "   "
    ids = [f"b-{i:03d}" for i in range(50)]
    ids[45] = "ad-00003"
    pq.write_table(pa.table({"ad_id": ids, "text": texts, "deleted": [i == 20 for i in range(50)]}),
                   tmp_path / "ads" / "b.parquet")
    # When the job embeds them in small validation batches
    record = run_embed(job_config(4, 2), ModelRef(model=str(tiny_bert_dir)), (tmp_path / "ads").as_uri(), "ads",
                       tmp_path / "out")
    # Then each rejected row names its file and its row in that file, and every other live ad is embedded once
    rejected = pd.read_parquet(tmp_path / "out.rejected").sort_values("_row")
    assert [(Path(f).name, r) for f, r in zip(rejected["_file"], rejected["_row"], strict=True)] == [
        ("b.parquet", 33), ("b.parquet", 45)]
    assert "text is empty" in rejected["_reason"].iloc[0] and "duplicate" in rejected["_reason"].iloc[1]
    assert record["rows_written"] == 40 + 50 - 3 == len(set(pd.read_parquet(tmp_path / "out")["id"]))


def test_crash_leftovers_are_discarded_the_rerun_is_exactly_once_and_another_does_nothing(ray_cluster, tiny_bert_dir,
                                                                                         tmp_path, capsys):
    # Given a crashed run's half-written staging folder holding a stale copy of some rows
    write_ads(tmp_path / "ads.parquet", n=60)
    staging = tmp_path / ".out.staging"
    staging.mkdir()
    pq.write_table(pa.table({"id": ["ad-00000", "ad-00001"], "embedding": [[0.0] * 32, [0.0] * 32]}),
                   staging / "stale.parquet")
    # When the job runs again
    cfg, model = job_config(16, 1), ModelRef(model=str(tiny_bert_dir))
    run_embed(cfg, model, tmp_path / "ads.parquet", "ads", tmp_path / "out")
    # Then the output holds each id once and no staging folder is left
    ids, _, _ = read_embeddings(tmp_path / "out")
    assert len(ids) == len(set(ids)) == 60
    assert not staging.exists()
    # And a run into the finished folder does nothing
    files_before = sorted(p.name for p in (tmp_path / "out").iterdir())
    capsys.readouterr()
    run_embed(cfg, model, tmp_path / "ads.parquet", "ads", tmp_path / "out")
    assert "nothing to do" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == files_before


def _embed_cmd(model: Path, src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipelines.embed", "--model", str(model), "--input", str(src), "--kind", "ads",
            "--out", str(out), "--set", "embed.batch_size=8"]


@pytest.mark.reliability
def test_killed_job_leaves_no_output_and_the_rerun_is_exactly_once(ray_cluster, tiny_bert_dir, tmp_path,
                                                                   record_property):
    n = 2000  # ~30 blocks of 64 rows: the job writes Parquet for a while, so a kill can land mid-write
    write_ads(tmp_path / "ads.parquet", n=n)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["gcs_address"]}
    cmd = _embed_cmd(tiny_bert_dir, tmp_path / "ads.parquet", tmp_path / "out")
    # When the job is killed once its staging folder holds Parquet, while it is still running
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    staging, deadline = tmp_path / ".out.staging", time.monotonic() + 300
    while not list(staging.glob("*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    written = len(list(staging.glob("*.parquet")))
    assert proc.poll() is None and written, "the kill must land while the job is writing Parquet"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # Then no output folder is visible, and a rerun gives every id exactly once
    assert not (tmp_path / "out").exists()
    assert embed_main(cmd[3:]) == 0  # the rerun needs no process of its own: only the kill did
    ids, _, _ = read_embeddings(tmp_path / "out")
    assert len(ids) == len(set(ids)) == n
    record_property("parquet_files_when_killed", written)


def checkout_with_a_later_hlm_change(tmp_path: Path) -> tuple[Path, Path]:
    """(a copy of this checkout, a marks folder): the copy's hlm was changed after the cluster started, so that
    every process importing it (the job's driver, each Ray worker) leaves a file in marks/ naming its hlm."""
    root, marks = tmp_path / "checkout", tmp_path / "marks"
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in ("pipelines", "platform"):
        shutil.copytree(REPO / folder, root / folder, ignore=ignore)
    shutil.copy(REPO / "runtime_env.yaml", root)
    marks.mkdir()
    with open(root / "platform" / "hlm" / "__init__.py", "a") as f:
        f.write(f"\nimport os as _os\n\nopen(_os.path.join({str(marks)!r}, str(_os.getpid())), 'w').write(__file__)\n")
    return root, marks


def test_embed_job_under_ray_job_submit_runs_the_submitted_hlm(ray_cluster, tiny_bert_dir, tmp_path):
    write_ads(tmp_path / "ads.parquet", n=30)
    checkout, marks = checkout_with_a_later_hlm_change(tmp_path)
    ray_bin, job_id = str(Path(sys.executable).parent / "ray"), f"embed-{tmp_path.name}"
    cmd = [ray_bin, "job", "submit", "--address", ray_cluster["dashboard"], "--runtime-env", "runtime_env.yaml",
           "--submission-id", job_id, "--", *_embed_cmd(tiny_bert_dir, tmp_path / "ads.parquet", tmp_path / "out")]
    for _ in range(12):  # the dashboard's job agent registers a while after ray.init on a loaded machine
        done = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True, timeout=300)
        if "No available agent to submit job" not in done.stdout + done.stderr:
            break
        time.sleep(10)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "embedded 30 ads" in done.stdout
    assert json.loads((tmp_path / "out" / SUCCESS).read_text())["rows_written"] == 30
    # and the driver and the encoder actors imported the submitted hlm (shipped as py_modules), not the installed one
    used = {p.name: p.read_text() for p in marks.iterdir()}
    assert len(used) >= 2, used  # the driver and at least one Ray Data actor
    assert not [f for f in used.values() if Path(f).resolve().is_relative_to(REPO)], used
    # and the cluster reports the job's status and keeps its logs
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_cluster["dashboard"])
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED
    assert "embedded 30 ads" in client.get_job_logs(job_id)


def test_the_embed_job_and_the_refresh_read_a_catalogue_by_one_rule(ray_cluster, tiny_bert_dir, tmp_path):
    # Given a catalogue with a deleted ad whose text is null, a deleted ad repeated live in a later file, a null text
    # and a live duplicate
    (tmp_path / "ads").mkdir()
    pq.write_table(pa.table({"ad_id": ["a", "gone", "b", "c", "b"], "text": ["drill", None, "lamp", None, "again"],
                             "deleted": [False, True, False, False, False]}), tmp_path / "ads" / "part-0.parquet")
    pq.write_table(pa.table({"ad_id": ["d", "e"], "text": ["door", "paint"], "deleted": [True, None]}),
                   tmp_path / "ads" / "part-1.parquet")
    pq.write_table(pa.table({"ad_id": ["d"], "text": ["door again"], "deleted": [False]}),
                   tmp_path / "ads" / "part-2.parquet")
    # When the Ray Data embed job and the refresh's reader read it
    from hlm.refresh import read_catalogue

    run_embed(job_config(16, 1), ModelRef(model=str(tiny_bert_dir)), tmp_path / "ads", "ads", tmp_path / "out")
    ids, _, _ = read_embeddings(tmp_path / "out")
    job_rejected = pq.read_table(tmp_path / "out.rejected").to_pylist()
    rows, rejected = read_catalogue(tmp_path / "ads")
    # Then both keep the same ads and reject the same rows for the same reasons; deleted rows are neither
    assert sorted(ids) == sorted(rows.column("ad_id").to_pylist()) == ["a", "b", "d", "e"]
    assert sorted((Path(r["_file"]).name, r["_row"], r["_reason"]) for r in job_rejected) == sorted(
        (Path(r["_file"]).name, r["_row"], r["_reason"]) for r in rejected.to_pylist()) == [
        ("part-0.parquet", 3, "text is null"), ("part-0.parquet", 4, "ad_id duplicate id 'b' (first at row 2)")]
