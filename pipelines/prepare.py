r"""Convert a public relevance dataset into HLM's ads / queries / labels Parquet files.

    python -m pipelines.prepare homedepot --pairs PAIRS.csv --products PRODUCTS.csv --out DIR
    python -m pipelines.prepare beir --dir BEIR_DIR --split test --out DIR
    python -m pipelines.prepare esci --examples EXAMPLES.parquet --products PRODUCTS.parquet --out DIR \
        [--locale us] [--split test]

Writes OUT/ads.parquet, OUT/queries.parquet and OUT/labels.parquet, in the contracts of `hlm/data.py`
(`pandas.read_parquet` reads them), and prints the row counts.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from hlm.cli import command_parser
from hlm.data import DataError
from hlm.importers import from_beir, from_esci, from_homedepot, write_dataset


def _parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__, __file__)
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")

    p = formats.add_parser("homedepot", help="Home Depot search relevance CSVs")
    p.add_argument("--pairs", required=True, help="judged pairs: product_uid, search_term, relevance, …")
    p.add_argument("--products", required=True, help="the catalogue: product_uid, product_title")
    p.set_defaults(load=lambda a: from_homedepot(a.pairs, a.products))

    p = formats.add_parser("beir", help="a BEIR folder: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv")
    p.add_argument("--dir", required=True)
    p.add_argument("--split", default="test", help="which qrels file, and so which queries, to import")
    p.set_defaults(load=lambda a: from_beir(a.dir, a.split))

    p = formats.add_parser("esci", help="Amazon Shopping Queries (ESCI) Parquet files")
    p.add_argument("--examples", required=True)
    p.add_argument("--products", required=True)
    p.add_argument("--locale", default="us", help="us, es or jp; 'all' keeps every locale")
    p.add_argument("--split", default=None, help="train or test (default: both)")
    p.set_defaults(load=lambda a: from_esci(a.examples, a.products, locale=None if a.locale == "all" else a.locale,
                                            split=a.split))

    for p in formats.choices.values():
        p.add_argument("--out", required=True, help="output folder for ads/queries/labels.parquet")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        counts = write_dataset(args.load(args), args.out)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = ", ".join(f"{n:,} {name}" for name, n in counts.items())
    print(f"prepared {args.format}: {summary} -> {args.out}/{{ads,queries,labels}}.parquet "
          f"({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
