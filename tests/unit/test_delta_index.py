"""DeltaIndex (base + upserts − tombstones) against its slow reference: a Flat index rebuilt over the same ads."""

from __future__ import annotations

import numpy as np

from hlm.delta_index import DeltaIndex
from hlm.deltas import DeltaEntry
from hlm.index import AdIndex

D, N = 8, 200


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, D)).astype(np.float32)  # (n, d)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_search_equals_a_flat_index_rebuilt_over_the_ads_after_the_deltas() -> None:
    # Given a base of 200 ads and 150 events: deletes of base ads, edits of base ads, new ads, edits of new ads
    rng = np.random.default_rng(0)
    ids = [f"ad-{i}" for i in range(N)]
    base = AdIndex.build(ids, unit(rng, N), "s")
    truth = dict(zip(ids, base.index.reconstruct_n(0, N), strict=True))
    entries = []
    for n in range(150):
        ad = f"ad-{rng.integers(N)}" if rng.random() < 0.6 else f"new-{rng.integers(40)}"
        if rng.random() < 0.4:
            entries.append(DeltaEntry(f"{n + 1}-0", "delete", ad, None, None))
            truth.pop(ad, None)
        else:
            v = unit(rng, 1)[0]
            entries.append(DeltaEntry(f"{n + 1}-0", "upsert", ad, v, "s"))
            truth[ad] = v
    delta = DeltaIndex(base, "0-0")
    # When they are applied out of order and twice (a replayed log, an entry read from two logs)
    order = rng.permutation(len(entries))
    delta.apply([entries[i] for i in order])
    assert delta.apply(entries) == 0
    # Then every query gets what exact search over the resulting ads gives, k of them even past the tombstones
    ref = AdIndex.build(list(truth), np.stack(list(truth.values())), "s")
    q = unit(rng, 20)
    for k in (1, 10, len(truth)):
        got = delta.search(q, k)
        want = ref.search_ids(q, k)
        assert [[a for a, _ in row] for row in got] == [[a for a, _ in row] for row in want]


def test_entries_the_base_includes_and_other_spaces_are_not_applied() -> None:
    rng = np.random.default_rng(1)
    base = AdIndex.build(["a", "b"], unit(rng, 2), "s")
    delta = DeltaIndex(base, "10-0")
    assert delta.apply([DeltaEntry("9-0", "delete", "a", None, None)]) == 0  # folded into the base already
    assert delta.apply([DeltaEntry("11-0", "upsert", "c", unit(rng, 1)[0], "other")]) == 0
    assert delta.status()["refused"] == 1 and "space other" in delta.status()["last_refusal"]
    assert [a for a, _ in delta.search(unit(rng, 1), 5)[0]] in (["a", "b"], ["b", "a"])
