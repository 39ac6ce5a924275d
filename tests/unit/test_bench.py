"""The encoder benchmark in quick mode on tiny models writes a result record with the keys the summary reads.

Speed itself is never asserted (docs/design.md, "Benchmarks"): these pin the record's shape and the summary. The
benchmarks that need Redis or Ray are in tests/integration/test_bench_services.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import encoder, faiss_scale, run
from bench.common import threads
from hlm.tiny import save_tiny_encoder

RECORD_KEYS = {"name", "created_at", "machine", "config", "numbers"}


def read(out: Path, name: str) -> dict:
    record = json.loads((out / f"{name}.json").read_text())
    assert RECORD_KEYS <= record.keys() and record["name"] == name and record["config"]["quick"] is True
    return record


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """As `python -m bench.run` runs them (its --threads default); 2 threads on a busy 2-core box take minutes."""
    with threads(1):
        yield


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A wider 'teacher' and a 6-layer 'student', so the 4/3/2-layer cuts all apply."""
    folder = tmp_path_factory.mktemp("models")
    return (str(save_tiny_encoder(folder / "teacher", "bert", hidden=64, layers=4)),
            str(save_tiny_encoder(folder / "student", "bert", hidden=32, layers=6)))


@pytest.fixture(scope="module")
def encoder_results(tmp_path_factory: pytest.TempPathFactory, tiny_models) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("results")
    teacher, student = tiny_models
    return out, encoder.run(out, quick=True, teacher=teacher, student=student)


def test_encoder_benchmark_measures_every_variant_and_each_fast_path_recovery(encoder_results):
    out, numbers = encoder_results
    assert numbers == read(out, "encoder")["numbers"]
    assert [r["variant"] for r in numbers["variants"]] == ["teacher", "student", "student-int8", "student-bf16",
                                                           "student-onnx", "student-onnx_int8",
                                                           "student-4L", "student-3L", "student-2L"]
    assert [r["layers"] for r in numbers["variants"]][-3:] == [4, 3, 2]
    for row in numbers["variants"]:
        assert row["latency_p50_ms"] > 0 and row["latency_p99_ms"] >= row["latency_p50_ms"]
        assert row["throughput_qps"] > 0 and row["latency_speedup"] > 0 and row["throughput_speedup"] > 0
    assert numbers["onnx_int8_over_fp32_latency_speedup"] > 0 and numbers["onnx_over_fp32_throughput_speedup"] > 0
    for path in ("int8", "onnx", "onnx_int8"):
        assert {"R@100_fp32", "R@100", "R@100_drop_points", "within_goal"} <= numbers["recovery"][path].keys()
    assert numbers["recovery"]["onnx"]["R@100_drop_points"] == pytest.approx(0, abs=0.5)  # the same function


def test_summary_has_a_section_table_and_plot_per_benchmark(encoder_results):
    out, _ = encoder_results
    text = run.summary(out).read_text()
    assert "## encoder" in text and "| variant | layers |" in text and "**recovery**" in text
    assert "![encoder](encoder.png)" in text and (out / "encoder.png").stat().st_size > 0


def test_table_renders_scalars_rows_and_sections():
    text = run.table({"ratio": 0.98765, "rows": [{"a": 1, "b": 2.0}, {"a": 3}], "part": {"x": True}})
    assert "| ratio | 0.9877 |" in text
    assert "| a | b |\n|---|---|\n| 1 | 2 |\n| 3 |  |" in text
    assert "**part**" in text and "| x | True |" in text


def test_recall_counts_the_shared_positions_per_query():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert faiss_scale.recall(np.array([[4, 3, 9, 9], [5, 6, 7, 8]]), exact) == pytest.approx((0.5 + 1.0) / 2)
