"""Exactly-once output folders: write into a hidden staging folder, publish with one rename and a `_SUCCESS.json`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hlm.staging import SUCCESS, OutputBusy, OutputExists, StagedOutput, file_identity, job_key


def staged(tmp_path: Path, key: str = "key-1") -> StagedOutput:
    return StagedOutput(final=tmp_path / "out" / "ads-emb", key=key)


def test_finished_is_none_before_any_run(tmp_path: Path) -> None:
    assert staged(tmp_path).finished() is None


def test_begin_gives_an_empty_hidden_staging_folder_next_to_the_final_one(tmp_path: Path) -> None:
    # Given / When
    out = staged(tmp_path)
    staging = out.begin()

    # Then
    assert staging == tmp_path / "out" / ".ads-emb.staging"
    assert staging.is_dir() and list(staging.iterdir()) == []
    assert not out.final.exists()


def test_begin_removes_a_crashed_runs_leftovers(tmp_path: Path) -> None:
    # Given a run that wrote part of its output and crashed before commit
    out = staged(tmp_path)
    (out.begin() / "sub").mkdir()
    (out.staging / "part-0.parquet").write_bytes(b"half")

    # When the job runs again
    staging = out.begin()

    # Then it starts from an empty folder and nothing was published
    assert list(staging.iterdir()) == []
    assert out.finished() is None


def test_commit_publishes_the_folder_with_its_success_record(tmp_path: Path) -> None:
    # Given a staged output with one file
    out = staged(tmp_path)
    (out.begin() / "part-0.parquet").write_bytes(b"data")

    # When
    final = out.commit({"rows": 3, "rejected": 0})

    # Then the final folder holds the file and the record; the staging folder is gone
    assert final == out.final
    assert (final / "part-0.parquet").read_bytes() == b"data"
    assert json.loads((final / SUCCESS).read_text()) == {"rows": 3, "rejected": 0, "job_key": "key-1"}
    assert not out.staging.exists()
    assert sorted(p.name for p in final.parent.iterdir()) == [".ads-emb.lock", "ads-emb"]  # the lock file stays


def test_finished_returns_the_record_for_the_same_job(tmp_path: Path) -> None:
    # Given a committed run
    out = staged(tmp_path)
    out.begin()
    out.commit({"rows": 3})

    # When the same job asks again (a fresh object, as a rerun would make)
    record = staged(tmp_path).finished()

    # Then there is nothing to do
    assert record == {"rows": 3, "job_key": "key-1"}


def test_finished_raises_for_another_jobs_output(tmp_path: Path) -> None:
    # Given a folder committed by another job
    other = staged(tmp_path, key="key-other")
    other.begin()
    other.commit({})

    # When / Then
    with pytest.raises(OutputExists, match="key-other"):
        staged(tmp_path, key="key-1").finished()


def test_finished_raises_for_a_folder_without_success_record(tmp_path: Path) -> None:
    # Given a folder someone made by hand
    out = staged(tmp_path)
    out.final.mkdir(parents=True)
    (out.final / "part-0.parquet").write_bytes(b"?")

    # When / Then
    with pytest.raises(OutputExists, match=str(out.final)):
        out.finished()


def test_job_key_is_stable_for_equal_dicts_and_changes_with_any_value() -> None:
    a = {"model": "teacher-default", "batch": 64, "inputs": [("x", 1, 2)], "out": Path("/o")}
    b = {"out": Path("/o"), "inputs": [("x", 1, 2)], "batch": 64, "model": "teacher-default"}

    assert job_key(a) == job_key(b)
    assert len(job_key(a)) == 24
    assert job_key(a) != job_key({**a, "batch": 65})


def test_job_key_changes_when_an_input_files_content_changes(tmp_path: Path) -> None:
    # Given an input file and the key of a job over it
    data = tmp_path / "ads.parquet"
    data.write_bytes(b"v1")
    os.utime(data, ns=(1_000_000_000, 1_000_000_000))
    before = job_key({"inputs": file_identity([data])})

    # When nothing changes, then when the content (and size) changes, then when only the mtime does
    same = job_key({"inputs": file_identity([data])})
    data.write_bytes(b"v2-longer")
    os.utime(data, ns=(1_000_000_000, 1_000_000_000))
    resized = job_key({"inputs": file_identity([data])})
    os.utime(data, ns=(2_000_000_000, 2_000_000_000))
    touched = job_key({"inputs": file_identity([data])})

    # Then the key is stable until the file changes
    assert same == before
    assert len({before, resized, touched}) == 3


def test_file_identity_records_resolved_path_size_and_mtime(tmp_path: Path) -> None:
    data = tmp_path / "q.parquet"
    data.write_bytes(b"12345")
    os.utime(data, ns=(5, 7))

    assert file_identity([tmp_path / "." / "q.parquet"]) == [(str(data.resolve()), 5, 7)]


def test_a_second_run_into_the_same_output_is_refused_and_leaves_the_first_runs_staging_alone(tmp_path: Path) -> None:
    # Given a run writing its staging folder
    first = staged(tmp_path)
    (first.begin() / "part-0.parquet").write_bytes(b"first run")
    # When a second run of the same job starts on the same output
    with pytest.raises(OutputBusy, match="another run is writing"):
        staged(tmp_path).begin()
    # Then the first run's files are intact and it commits; afterwards the output is free again
    assert (first.staging / "part-0.parquet").read_bytes() == b"first run"
    first.commit({"rows_written": 1})
    assert staged(tmp_path).finished() == {"rows_written": 1, "job_key": "key-1"}
    staged(tmp_path, key="key-1").lock()


def test_a_dead_runs_lock_does_not_block_the_next_run(tmp_path: Path) -> None:
    dead = staged(tmp_path)
    (dead.begin() / "part-0.parquet").write_bytes(b"half")
    dead.release()  # what the kernel does when the process dies
    assert list(staged(tmp_path).begin().iterdir()) == []
