"""The stream benchmark's search-with-deltas record has its shape (speed itself is never asserted)."""

from __future__ import annotations

import numpy as np

from bench.stream import pending_delta_search, problems, unit


def test_pending_delta_search_reports_both_p50s_and_their_ratio() -> None:
    base = unit(np.random.default_rng(0), 300, 8)
    record = pending_delta_search([f"ad-{i}" for i in range(300)], base, "s", 100, queries=5)
    assert set(record) == {"base_ads", "pending_deltas", "p50_ms_none", "p50_ms_pending", "ratio_pending_over_none"}
    assert record["pending_deltas"] == 100 and record["ratio_pending_over_none"] > 0


def test_events_that_never_became_visible_fail_the_run() -> None:
    assert problems({"visibility": {"never_visible": 3}}) == ["visibility: 3 events never became visible"]
    assert problems({"visibility": {"never_visible": 0}, "visibility_isolated": {"never_visible": 2},
                     "throughput": {}}) == ["visibility_isolated: 2 events never became visible"]
    assert problems({"visibility": {"never_visible": 0}}) == []
