"""TREC run and qrels files: the plain-text form that trec_eval, ir_measures, ranx and pytrec_eval read.

    run:    <query_id> Q0 <ad_id> <rank> <score> <run_name>    one line per retrieved ad, rank 1 = best
    qrels:  <query_id> 0 <ad_id> <label>

A run file holds exactly the ranking the report scored: `hlm.metrics`' order (score descending, ties by ad_id
descending), which is also the order trec_eval sorts a run into before scoring, so the tools and the report rank
tied ads alike. Scores are written in full (`repr`, the shortest text that reads back as the same float), so the
file has no ties the run did not have.

Ids. TREC fields are separated by whitespace, and trec_eval skips a line that starts with '#'. An id holding
whitespace, a control character, '#' or '%' is written with those characters percent-encoded (`trec_id`:
"drill set" -> "drill%20set"; `urllib.parse.unquote` gives the id back); any other id is written as it is. Run and
qrels files encode alike, so the tools match them. An empty id is an error (it would shift every field after it).

Labels are written as given: 2 as `2`, an averaged rating as `1.33`. trec_eval reads a label as an integer (C
`atol`: 1.33 -> 1), so on fractional labels its nDCG differs from the report's; its binary metrics at relevance
level 1 (P, R, MRR) do not, since a label counts as relevant when it is at least 1 in both.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote

from hlm.metrics import Qrels, Run, ranked

_NEEDS_ESCAPE = re.compile(r"[%#\s\x00-\x1f\x7f-\x9f]")  # \s is Unicode whitespace, as str.split() sees it


def trec_id(value: str) -> str:
    """`value` with whitespace, control characters, '#' and '%' percent-encoded; raises ValueError when empty."""
    if not value:
        raise ValueError("an empty id cannot be written to a TREC file")
    return _NEEDS_ESCAPE.sub(lambda m: quote(m.group(), safe=""), value)


def run_name(name: str) -> str:
    """A model's name as a run tag and file stem: runs of anything but letters, digits, '.', '+' and '-' become '_'
    ("student align/model" -> "student_align_model")."""
    tag = re.sub(r"[^\w.+-]+", "_", name).strip("_")
    if not tag:
        raise ValueError(f"model name {name!r} leaves no run name")
    return tag


def _label(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def write_run(run: Run, path: str | Path, name: str) -> Path:
    """Every query of `run`, its ads in rank order, as a TREC run file tagged `name` (a `run_name`)."""
    lines = []
    for qid, scores in run.items():
        q = trec_id(qid)
        lines += [f"{q} Q0 {trec_id(ad)} {rank} {float(scores[ad])!r} {name}\n"
                  for rank, ad in enumerate(ranked(scores), start=1)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines))
    return path


def write_qrels(qrels: Qrels, path: str | Path) -> Path:
    """Every judgement of `qrels` as a TREC qrels file, in query and ad order."""
    lines = [f"{trec_id(qid)} 0 {trec_id(ad)} {_label(label)}\n"
             for qid in sorted(qrels) for ad, label in sorted(qrels[qid].items())]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines))
    return path


def write_runs(runs: dict[str, Run], out: str | Path) -> dict[str, Path]:
    """OUT/<run_name>.trec for each model of `runs` ({model name: run}); returns {model name: file}.

    Raises ValueError before writing anything when two model names give the same run name.
    """
    names = {model: run_name(model) for model in runs}
    clashes = sorted(model for model, tag in names.items() if list(names.values()).count(tag) > 1)
    if clashes:
        raise ValueError(f"models {clashes} would share a run file: rename one")
    return {model: write_run(run, Path(out) / f"{names[model]}.trec", names[model]) for model, run in runs.items()}
