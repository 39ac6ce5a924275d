r"""Evaluate the teacher and students on one split over the full ad index: quality, latency and throughput.

    python -m pipelines.evaluate --ads-emb EMB/ads --queries DEV/queries.parquet --labels DEV/labels.parquet \
        --student runs/align/model --student runs/refine/model --out runs/eval

The teacher is `teacher.model` from the config; its ad embeddings (`--ads-emb`, written by pipelines.embed) are
the index every model searches, so students must live in the teacher's space.

Writes OUT/report.md, OUT/report.json, OUT/quality_vs_latency.png and, for trec_eval / ir_measures / ranx, the
ranking each model was scored on as OUT/runs/<model>.trec (`qid Q0 ad_id rank score run`, top 100) with the
labels as OUT/qrels.trec (`qid 0 ad_id label`; ids with spaces, '#' or '%' are percent-encoded, see hlm/trec.py):
    trec_eval -m recall.100 -m ndcg_cut.10 OUT/qrels.trec OUT/runs/teacher.trec
"""

from __future__ import annotations

import sys
from pathlib import Path

from hlm.cli import job_parser, start_job
from hlm.data import DataError, qrels_from_labels, read_embeddings, read_labels, read_queries
from hlm.encoder import Encoder
from hlm.evaluation import Candidate, compare, model_labels, write_report
from hlm.index import AdIndex
from hlm.space import SpaceMismatch, check_same_space


def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__, __file__)
    parser.add_argument("--ads-emb", required=True, type=Path, help="teacher ad embeddings (pipelines.embed)")
    parser.add_argument("--queries", required=True, type=Path)
    parser.add_argument("--labels", required=True, type=Path)
    parser.add_argument("--student", action="append", default=[], help="student folder (repeatable)")
    parser.add_argument("--factory", default="Flat", help="FAISS index to evaluate through")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        labels = model_labels(args.student)  # folders are often all called model/: name them by their parents
    except ValueError as e:
        parser.error(str(e))
    cfg = start_job("evaluate", args, args.out)
    try:
        ad_ids, ad_emb, space = read_embeddings(args.ads_emb)
        queries, qrels = read_queries(args.queries), qrels_from_labels(read_labels(args.labels))
        index = AdIndex.build(ad_ids, ad_emb, space["fingerprint"], args.factory)
        teacher = Encoder.load(cfg.teacher, cfg.runtime)
        candidates = [Candidate("teacher", teacher, index, "teacher")]
        for path, label in zip(args.student, labels, strict=True):
            student = Encoder.load(path, cfg.runtime)
            check_same_space(space["fingerprint"], student.space, f"student {path}")
            candidates.append(Candidate(f"student {label}", student, index, "students"))
        check_same_space(space["fingerprint"], teacher.space, f"teacher {cfg.teacher.model}")
    except (DataError, SpaceMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    reports = compare(candidates, queries["text"].to_pylist(), queries["query_id"].to_pylist(), qrels,
                      teacher="teacher")
    paths = write_report(reports, args.out, qrels)
    print(paths["md"].read_text())
    print(f"wrote {paths['md']}, {paths['json']}, {paths['plot']}, the labels as {paths['qrels']} and one TREC run "
          f"per model in {args.out / 'runs'}: {', '.join(p.name for p in paths['runs'].values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
