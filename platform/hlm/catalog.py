"""A built-in sponsored-search catalogue, so the demo runs on a fresh machine with no data files.

Ads are composed from small vocabularies (product type, brand, attributes) and titled the way a home-improvement
retailer titles them; queries are typed the way people search (synonyms, partial names, attribute combinations,
the odd typo). Labels are on the Home Depot scale (relevance − 1: 0 … 2, in thirds) and computed from the
structured attributes. For a query asking for a type and k attributes (a brand counts as one), an ad matching m:

* 2.0 — same type, all k match (or k = 0);
* 2·m/k in thirds, at least 0.33 — same type otherwise: k=2 gives 0.33/1.0, k=3 gives 0.33/0.67/1.33;
* 0.0 — another type: the judged negatives (a same-brand ad, one sharing a colour or size, a random one).

Every ad of the query's type is judged, so P/R at relevance level 1.0 are exact. A query is drawn from a real
ad (so some ad scores 2.0) and redrawn until 3–30 ads score ≥ 1.0, when the catalogue is large enough for that.
An ad's ``keywords`` are its canonical type, then one "<attribute> <type>" per attribute, brand first.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from hlm.data import ADS, LABELS, QUERIES, validate
from hlm.importers import Dataset
from hlm.products import BRANDS, DEPARTMENTS, TYPES, ProductType, Value

logger = logging.getLogger(__name__)

MIN_RELEVANT, MAX_RELEVANT = 3, 30  # ads with label >= 1.0 per query: enough for P@10, few enough for R@10
TYPO_RATE = 0.12  # share of queries with one misspelt word, as in real search logs
K_WEIGHTS = (1, 6, 8, 3)  # how many attributes a query asks for: 0, 1, 2, 3


@dataclass(frozen=True)
class _Ad:
    ad_id: str
    ptype: ProductType
    attrs: dict[str, Value]  # "brand" plus one value per axis of its type


def _grade(ptype: ProductType, wants: dict[str, Value], ad: _Ad) -> float:
    """The label of `ad` for a query asking for `ptype` with attributes `wants` (the table in the module doc)."""
    if ad.ptype is not ptype:
        return 0.0
    m, k = sum([ad.attrs[axis] is v for axis, v in wants.items()]), len(wants)
    return 2.0 if m == k else round(max(1, round(6 * m / k)) / 3, 2)  # 2·m/k in thirds, at least 1/3


def _joined(words: list[str]) -> str:
    return ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else "".join(words)


def _make_ad(rng: random.Random, ad_id: str, ptype: ProductType) -> tuple[_Ad, dict[str, str]]:
    """The structured ad and its contract row; the title carries some attributes, the description the rest."""
    attrs = {"brand": rng.choice(BRANDS[ptype.dept]), **{axis: rng.choice(vals) for axis, vals in ptype.axes}}
    brand, values, name = attrs["brand"].ad, list(attrs.values())[1:], rng.choice(ptype.ad_names)
    rng.shuffle(values)
    in_title = values[:rng.randint(1, len(values))]
    rest = [v.ad.removeprefix("with ").removeprefix("for ") for v in values[len(in_title):]]
    lead, post = [v.ad for v in in_title if not v.trails], " ".join(v.ad for v in in_title if v.trails)
    pre = " ".join(lead)
    title = rng.choice([f"{brand} {pre} {name} {post}", f"{pre} {name} {post} by {brand}",
                        f"{brand} {name} {post}, {', '.join(lead)}"])
    benefit = rng.choice(DEPARTMENTS[ptype.dept][1])
    description = f"{brand} {name}, {benefit}." if not rest else rng.choice(
        [f"{brand} {name} featuring {_joined(rest)}, {benefit}.", f"This {name} from {brand} comes in {_joined(rest)} "
         f"and is {benefit}."])
    title = " ".join(title.replace(" ,", ",").split()).rstrip(",")
    keywords = ", ".join([ptype.name, *(f"{v.query[0]} {ptype.name}" for v in attrs.values())])
    return _Ad(ad_id, ptype, attrs), {"title": title, "description": description, "text": f"{title} - {description}",
                                      "keywords": keywords}


def _typo(rng: random.Random, text: str) -> str:
    """Drop, double or swap one letter of one longer word ("cordles drill", "faucte")."""
    words = text.split()
    spots = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
    if not spots:
        return text
    i = rng.choice(spots)
    w, j = words[i], rng.randrange(1, len(words[i]) - 1)
    words[i] = rng.choice([w[:j] + w[j + 1:], w[:j] + w[j] + w[j:], w[:j] + w[j + 1] + w[j] + w[j + 2:]])
    return " ".join(words)


def _query_text(rng: random.Random, ptype: ProductType, wants: dict[str, Value]) -> str:
    """Lower case, attributes mostly before the name, the brand mostly first, sometimes a typo."""
    typed = {axis: rng.choice(v.query) for axis, v in wants.items()}
    lead = [t for axis, t in typed.items() if axis != "brand" and not wants[axis].trails]
    cut = rng.choice([len(lead)] * 3 + list(range(len(lead) + 1)))
    words = lead[:cut] + [rng.choice(ptype.query_names)] + lead[cut:]
    words += [t for axis, t in typed.items() if axis != "brand" and wants[axis].trails]
    if "brand" in typed:
        words.insert(0 if rng.random() < 0.85 else len(words), typed["brand"])
    text = " ".join(words)
    return _typo(rng, text) if rng.random() < TYPO_RATE else text


def _make_query(rng: random.Random, ads: list[_Ad], by_type: dict[str, list[_Ad]],
                seen: set[str]) -> tuple[str, _Ad, list[float]]:
    """Ask for some attributes of a real ad; redraw (up to 30 times) until 3–30 ads are relevant and the text is new.

    Returns the text, the ad it was drawn from and the grades of every ad of its type (in `by_type` order).
    """
    best: tuple[int, str, _Ad, list[float]] | None = None
    for _ in range(30):
        target = rng.choice(ads)
        axes = ["brand", *(axis for axis, _ in target.ptype.axes)]
        k = min(rng.choices(range(len(K_WEIGHTS)), weights=K_WEIGHTS)[0], len(axes))
        wants = {axis: target.attrs[axis] for axis in rng.sample(axes, k)}
        text = _query_text(rng, target.ptype, wants)
        grades = [_grade(target.ptype, wants, ad) for ad in by_type[target.ptype.name]]
        n = sum(g >= 1.0 for g in grades)
        miss = max(MIN_RELEVANT - n, n - MAX_RELEVANT, 0) + (1000 if text in seen else 0)
        if best is None or miss < best[0]:
            best = (miss, text, target, grades)
        if miss == 0:
            break
    assert best is not None
    return best[1:]


def _negatives(rng: random.Random, target: _Ad, ads: list[_Ad], by_value: dict[str, list[_Ad]]) -> list[_Ad]:
    """Judged 0.0, each of another type: a same-brand ad, one sharing a colour/finish/size, a random one."""
    shared = rng.choice(list(target.attrs.values())[1:])
    picked: dict[str, _Ad] = {}
    for pool in (by_value[target.attrs["brand"].ad], by_value[shared.ad], ads):
        for ad in (rng.choice(pool) for _ in range(20)):  # a few draws, not a scan: most of a pool is another type
            if ad.ptype is not target.ptype:
                picked.setdefault(ad.ad_id, ad)
                break
    return list(picked.values())


def generate_catalog(n_ads: int = 2000, n_queries: int = 400, seed: int = 0) -> Dataset:
    """Ads `ad-000000…`, queries `q-0000…` and graded labels, all determined by `seed`; no I/O.

    The ads depend only on `n_ads` and `seed`, and queries are drawn after them, one at a time: a larger
    `n_queries` extends the same catalogue's queries (say, unlabelled ones for alignment) without changing any.
    """
    if n_ads < 1 or n_queries < 0:
        raise ValueError(f"need n_ads >= 1 and n_queries >= 0, got {n_ads} and {n_queries}")
    rng = random.Random(seed)
    types = [TYPES[i % len(TYPES)] for i in range(n_ads)]  # balanced, then shuffled so ids do not encode the type
    rng.shuffle(types)
    ads, rows, texts = [], [], set()
    for i, ptype in enumerate(types):
        for _ in range(10):  # redraw the rare exact duplicate text
            ad, row = _make_ad(rng, f"ad-{i:06d}", ptype)
            if row["text"] not in texts:
                break
        texts.add(row["text"])
        ads.append(ad)
        rows.append(row)
    by_type: dict[str, list[_Ad]] = defaultdict(list)
    by_value: dict[str, list[_Ad]] = defaultdict(list)  # ads sharing a brand, colour, size … for judged negatives
    for ad in ads:
        by_type[ad.ptype.name].append(ad)
        for v in ad.attrs.values():
            by_value[v.ad].append(ad)

    queries: dict[str, str] = {}
    seen: set[str] = set()
    labels: list[tuple[str, str, float]] = []
    for i in range(n_queries):
        text, target, grades = _make_query(rng, ads, by_type, seen)
        qid = f"q-{i:04d}"
        queries[qid] = text
        seen.add(text)
        labels += [(qid, ad.ad_id, g) for ad, g in zip(by_type[target.ptype.name], grades, strict=True)]
        labels += [(qid, ad.ad_id, 0.0) for ad in _negatives(rng, target, ads, by_value)]

    ad_table = pa.table({"ad_id": [a.ad_id for a in ads], **{c: [r[c] for r in rows] for c in
                                                              ("text", "title", "description", "keywords")}})
    query_table = pa.table([list(queries), list(queries.values())], schema=QUERIES.schema)
    label_table = pa.table([list(col) for col in zip(*labels, strict=True)] if labels else [[], [], []],
                           schema=LABELS.schema)
    logger.debug("catalogue: %d ads, %d queries, %d labels", len(ads), len(queries), len(labels))
    return Dataset(validate(ad_table, ADS, "catalog ads"), validate(query_table, QUERIES, "catalog queries"),
                   validate(label_table, LABELS, "catalog labels"))


def split_queries(ds: Dataset, dev_fraction: float = 0.25, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, dev) by query: each query and its labels go to one side; both keep every ad."""
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction}")
    ids = ds.queries["query_id"].to_pylist()
    n_dev = min(max(round(len(ids) * dev_fraction), 1), len(ids) - 1) if len(ids) > 1 else 0
    dev = pa.array(sorted(random.Random(seed).sample(ids, n_dev)), pa.string())
    q_dev, l_dev = (pc.is_in(t["query_id"], value_set=dev) for t in (ds.queries, ds.labels))
    return (Dataset(ds.ads, ds.queries.filter(pc.invert(q_dev)), ds.labels.filter(pc.invert(l_dev))),
            Dataset(ds.ads, ds.queries.filter(q_dev), ds.labels.filter(l_dev)))
