"""Cached stages: skip what is done, rerun what a change reaches and nothing else, never show a half-written folder."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from hlm.config import ConfigError, load_config
from hlm.recipe import RecipeConfig, phase_job
from hlm.stages import Stage, run_stages, stage_table
from hlm.staging import SUCCESS


def writer(calls: list[str], name: str, fail: bool = False):
    def run(out: Path, keys: dict[str, str]) -> dict:
        calls.append(name)
        out.mkdir()
        (out / "value.txt").write_text(f"{name} {keys[name]}")
        if fail:
            raise RuntimeError(f"{name} killed")
        return {"wrote": name}
    return run


def chain(calls: list[str], data: Path, settings: dict[str, dict], fail: str | None = None) -> list[Stage]:
    """a (reads data) → b → c, and d on its own."""
    return [Stage("a", writer(calls, "a", fail == "a"), settings.get("a", {}), (data,)),
            Stage("b", writer(calls, "b", fail == "b"), settings.get("b", {}), after=("a",)),
            Stage("c", writer(calls, "c", fail == "c"), settings.get("c", {}), after=("b",)),
            Stage("d", writer(calls, "d", fail == "d"), settings.get("d", {}))]


@pytest.fixture
def data(tmp_path) -> Path:
    (tmp_path / "data.txt").write_text("rows")
    return tmp_path / "data.txt"


def test_a_rerun_skips_every_finished_stage(tmp_path, data):
    calls: list[str] = []
    first = run_stages(chain(calls, data, {}), tmp_path / "out")
    second = run_stages(chain(calls, data, {}), tmp_path / "out")
    assert calls == ["a", "b", "c", "d"]
    assert [r.status for r in first] == ["ran"] * 4 and [r.status for r in second] == ["skipped"] * 4
    assert json.loads((tmp_path / "out/c" / SUCCESS).read_text())["wrote"] == "c"
    assert "skipped" in stage_table(second) and str(tmp_path / "out/c") in stage_table(second)


def test_a_changed_setting_reruns_that_stage_and_everything_after_it_only(tmp_path, data):
    calls: list[str] = []
    run_stages(chain(calls, data, {}), tmp_path / "out")
    calls.clear()
    results = run_stages(chain(calls, data, {"b": {"lr": 0.1}}), tmp_path / "out")
    assert calls == ["b", "c"]
    assert {r.name: r.status for r in results} == {"a": "skipped", "b": "ran", "c": "ran", "d": "skipped"}


def test_a_changed_input_file_reruns_the_stages_that_read_it(tmp_path, data):
    calls: list[str] = []
    run_stages(chain(calls, data, {}), tmp_path / "out")
    calls.clear()
    data.write_text("more rows")
    run_stages(chain(calls, data, {}), tmp_path / "out")
    assert calls == ["a", "b", "c"]


def test_a_stage_killed_mid_run_keeps_the_old_output_and_reruns_cleanly(tmp_path, data):
    calls: list[str] = []
    run_stages(chain(calls, data, {}), tmp_path / "out")
    old = (tmp_path / "out/b/value.txt").read_text()
    with pytest.raises(RuntimeError, match="b killed"):
        run_stages(chain(calls, data, {"b": {"lr": 0.1}}, fail="b"), tmp_path / "out")
    # the complete old output is still there, the half-written new one only in the staging folder
    assert (tmp_path / "out/b/value.txt").read_text() == old
    assert (tmp_path / "out/.b.staging/value.txt").exists()
    calls.clear()
    run_stages(chain(calls, data, {"b": {"lr": 0.1}}), tmp_path / "out")
    assert calls == ["b", "c"] and not (tmp_path / "out/.b.staging").exists()
    assert (tmp_path / "out/b/value.txt").read_text() != old


def test_a_stage_listed_before_what_it_reads_is_refused(tmp_path, data):
    stages = chain([], data, {})
    with pytest.raises(ValueError, match="runs after"):
        run_stages([stages[1], stages[0]], tmp_path / "out")


def timed(events: list[tuple[str, str]], name: str, barrier: threading.Barrier | None = None, fail: bool = False):
    """A stage that logs its start and end; with a barrier it waits there for its peers (a broken barrier raises)."""
    def run(out: Path, _: dict[str, str]) -> dict:
        events.append(("start", name))
        out.mkdir()
        if barrier is not None:
            barrier.wait()
        time.sleep(0.05)
        events.append(("end", name))
        if fail:
            raise RuntimeError(f"{name} failed")
        return {}
    return run


def diamond(events: list[tuple[str, str]], both: threading.Barrier) -> list[Stage]:
    """a → (b, c) → d, where b and c wait for each other: they can only finish by running at the same time."""
    return [Stage("a", timed(events, "a")), Stage("b", timed(events, "b", both), after=("a",)),
            Stage("c", timed(events, "c", both), after=("a",)), Stage("d", timed(events, "d"), after=("b", "c"))]


def test_parallel_stages_run_independent_branches_at_once_and_never_before_their_upstream(tmp_path):
    events: list[tuple[str, str]] = []
    results = run_stages(diamond(events, threading.Barrier(2, timeout=5)), tmp_path / "out", parallel=2)
    assert [r.name for r in results] == ["a", "b", "c", "d"] and {r.status for r in results} == {"ran"}
    # a stage started only after every stage it reads had ended
    at = {event: i for i, event in enumerate(events)}
    assert at[("end", "a")] < min(at[("start", "b")], at[("start", "c")])
    assert max(at[("end", "b")], at[("end", "c")]) < at[("start", "d")]
    # and one at a time the same stages cannot finish (b waits for c, which has not started)
    with pytest.raises(threading.BrokenBarrierError):
        run_stages(diamond([], threading.Barrier(2, timeout=0.5)), tmp_path / "one-at-a-time", parallel=1)


def test_a_failed_parallel_stage_lets_the_running_one_finish_and_starts_nothing_new(tmp_path):
    # Given b fails while c, beside it, is running, and d comes after c
    events: list[tuple[str, str]] = []
    both = threading.Barrier(2, timeout=5)
    stages = [Stage("b", timed(events, "b", both, fail=True)), Stage("c", timed(events, "c", both)),
              Stage("d", timed(events, "d"), after=("c",))]
    with pytest.raises(RuntimeError, match="b failed"):
        run_stages(stages, tmp_path / "out", parallel=2)
    # Then c finished and kept its output, d never started, and b left nothing but its staging folder
    assert ("end", "c") in events and ("start", "d") not in events
    assert (tmp_path / "out/c" / SUCCESS).exists() and not (tmp_path / "out/b").exists()
    # And the rerun skips c and runs the rest
    results = run_stages([Stage("b", timed(events, "b")), stages[1], stages[2]], tmp_path / "out", parallel=2)
    assert {r.name: r.status for r in results} == {"b": "ran", "c": "skipped", "d": "ran"}


def test_recipe_overrides_are_checked_against_the_training_settings(tmp_path):
    base = ["recipe.data.train=t", "recipe.data.dev=d"]
    with pytest.raises(ConfigError, match="recipe.align"):
        load_config(None, [*base, "recipe.align.learning_rate=0.1"], RecipeConfig)
    with pytest.raises(ConfigError, match="decreasing"):
        load_config(None, [*base, "recipe.depths=[2, 3]"], RecipeConfig)
    cfg = load_config(None, [*base, "train.lr=0.5", "recipe.refine.lr=0.01"], RecipeConfig)
    # a stage's settings are `train` with the stage's overrides on top, as that stage's phase
    assert phase_job(cfg, "refine", "refine").lr == 0.01 and phase_job(cfg, "align", "align").lr == 0.5
    assert phase_job(cfg, "prune", "prune", prune_schedule=[1]).prune_schedule == [1]


def test_a_stage_record_points_at_the_final_folder_not_the_staging_one(tmp_path):
    def run(out: Path, _: dict[str, str]) -> dict:
        (out / "model").mkdir(parents=True)
        return {"model": str(out / "model"), "files": [out / "model" / "w.bin"], "other": "/elsewhere"}

    [result] = run_stages([Stage("train", run, {})], tmp_path)
    record = json.loads((tmp_path / "train" / SUCCESS).read_text())
    assert record["model"] == str(tmp_path / "train" / "model") == result.record["model"]
    assert Path(record["model"]).is_dir()
    assert record["files"] == [str(tmp_path / "train" / "model" / "w.bin")] and record["other"] == "/elsewhere"
