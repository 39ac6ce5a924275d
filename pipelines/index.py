"""Inspect and operate the versioned FAISS indexes in Redis: list, show, export, rollback.

    python -m pipelines.index list --index ads
    python -m pipelines.index show --index ads [--version VERSION]
    python -m pipelines.index export --index ads [--version VERSION] --out EXPORT/
    python -m pipelines.index rollback --index ads [--to VERSION]

`list` and `show` only print. `rollback` moves `current` to the version published before it (or `--to`);
serving replicas pick it up on their next poll. Every command reads Redis at `--redis-url`, else `$HLM_REDIS_URL`.

Writes, for `export` only, OUT/index.faiss and OUT/ids.parquet (FAISS id → ad id), which plain FAISS and
pyarrow read, plus the version's manifest.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hlm.cli import command_parser, setup_logging
from hlm.redis_client import redis_client
from hlm.store import IndexStore, IntegrityError, StoreError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--index", required=True, help="index name: keys hlm:{index}:*")
    common.add_argument("--redis-url", help="default: $HLM_REDIS_URL, else redis://127.0.0.1:6379/0")
    parser = command_parser(__doc__, __file__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", parents=[common], help="every published version, newest first; * marks current")
    show = commands.add_parser("show", parents=[common], help="one version's manifest as JSON")
    show.add_argument("--version", help="default: current")
    export = commands.add_parser("export", parents=[common], help="index.faiss + ids.parquet + manifest.json")
    export.add_argument("--version", help="default: current")
    export.add_argument("--out", required=True, type=Path, help="a new or empty folder")
    rollback = commands.add_parser("rollback", parents=[common], help="move current to an older version")
    rollback.add_argument("--to", help="default: the version published before the current one")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    store = IndexStore(redis_client(args.redis_url), args.index)
    try:
        if args.command == "list":
            list_versions(store)
        elif args.command == "show":
            print(json.dumps(store.manifest(args.version or _current(store)), indent=2, sort_keys=True))
        elif args.command == "export":
            export(store, args.version or _current(store), args.out)
        else:
            before = store.current()
            after = store.rollback(args.to)
            print(f"index '{store.name}': current {before} -> {after}; serving replicas switch on their next poll")
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _current(store: IndexStore) -> str:
    if (version := store.current()) is None:
        raise StoreError(f"index '{store.name}': nothing published yet")
    return version


def list_versions(store: IndexStore) -> None:
    current, versions = store.current(), store.versions()
    print(f"index '{store.name}': {len(versions)} version(s), current {current}")
    for version in versions:
        try:
            m = store.manifest(version)
        except IntegrityError as e:  # unsigned, forged or out of bounds: replicas refuse it, the list goes on
            print(f"{'*' if version == current else ' '} {version}  REFUSED: {e}")
            continue
        state = "" if store.is_complete(version) else "  INCOMPLETE"
        print(f"{'*' if version == current else ' '} {version}  {m['count']} ads  dim {m['dim']}  {m['factory']}  "
              f"space {m['space']}  {m['created_at']}  {m.get('source', '')}{state}")


def export(store: IndexStore, version: str, out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise StoreError(f"{out} is not empty; export into a new folder")
    manifest = store.manifest(version)
    files = store.load(version).export(out)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    print(f"exported index '{store.name}' version {version} ({manifest['count']} ads, dim {manifest['dim']}, "
          f"{manifest['factory']}): wrote {', '.join(str(f) for f in [*files, out / 'manifest.json'])}")


if __name__ == "__main__":
    sys.exit(main())
