"""Send ad upserts and deletes to an index's event stream, from Parquet or JSON lines.

    python -m pipelines.ad_events --input changes.jsonl [--index ads] [--redis-url redis://…]
    python -m pipelines.ad_events --input changes.parquet

Each row is one event: `op` (upsert | delete; missing = upsert), `ad_id`, `text` (upserts). Every row is checked
by the rule the updater applies (`hlm.events.parse`) before anything is sent; a bad row is printed with its file,
row and reason, nothing is sent, and the exit status is 2. The events go out in file order, in one pipeline.

Writes one XADD per row to the Redis stream hlm:{index}:ad_events and prints how many it sent; no files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

from hlm.cli import command_parser, setup_logging
from hlm.events import AdEventProducer, EventError, events_key
from hlm.redis_client import redis_client


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    rows = []
    for n, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise EventError(f"{path} row {n}: not JSON ({e})") from e
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = command_parser(__doc__, __file__)
    parser.add_argument("--input", required=True, type=Path, help="Parquet file or JSON lines (.jsonl)")
    parser.add_argument("--index", default="ads", help="index name: the stream is hlm:{index}:ad_events")
    parser.add_argument("--redis-url", help="default $HLM_REDIS_URL, else redis://127.0.0.1:6379/0")
    args = parser.parse_args(argv)
    setup_logging()
    producer = AdEventProducer(redis_client(args.redis_url), args.index)
    try:
        rows = read_rows(args.input)
        events = [producer.check({"op": "upsert", **{k: v for k, v in r.items() if v is not None}},
                                 f"{args.input} row {n}") for n, r in enumerate(rows)]
    except EventError as e:
        print(f"error: {e}; nothing sent", file=sys.stderr)
        return 2
    ids = producer.send(events)
    print(f"sent {len(ids)} events ({sum(e['op'] == 'delete' for e in events)} deletes) to "
          f"{events_key(args.index)}" + (f", ids {ids[0]} … {ids[-1]}" if ids else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
