"""How a trained phase scores on held-out queries: exact top-k over the teacher ad embeddings, and recovery.

`evaluate_retrieval` is the slow exact reference (every query against every ad); `evaluate_dev` is what
`pipelines.train` reports after a phase: the trained model's dev metrics, the teacher's row and `recovery/*`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from hlm.config import Phase, Runtime
from hlm.data import qrels_from_labels, read_ads, read_labels, read_queries
from hlm.encoder import Encoder
from hlm.metrics import evaluate, recovery_table, run_from_search
from hlm.phase_data import PhaseInputs
from hlm.space import Embeddings, check_same_space, space_at_width, truncate


@torch.no_grad()
def evaluate_retrieval(query_emb: np.ndarray, query_ids: list[str], ad_emb: np.ndarray, ad_ids: list[str],
                       qrels: dict[str, dict[str, float]], k: int = 100, *,
                       teacher_metrics: dict[str, float] | None = None, chunk: int | None = None) -> dict[str, float]:
    """Exact inner-product top-k of every query over all ads, scored by `hlm.metrics.evaluate` at k.

    The slow reference for a FAISS index: query_emb (B, d) against ad_emb (N, d), `chunk` query rows at a time
    (default: ~2^28 scores per chunk). With teacher_metrics, adds `recovery/<metric>` = student / teacher.
    """
    ads = torch.from_numpy(np.ascontiguousarray(ad_emb, dtype=np.float32))  # (N, d)
    chunk = chunk or max(1, (1 << 28) // max(1, len(ad_ids)))
    top = min(k, len(ad_ids))
    D_parts, I_parts = [], []
    for start in range(0, len(query_emb), chunk):
        q = torch.from_numpy(np.ascontiguousarray(query_emb[start:start + chunk], dtype=np.float32))  # (b, d)
        scores, positions = (q @ ads.T).topk(top, dim=1)  # (b, N) -> 2 × (b, k)
        D_parts.append(scores.numpy())
        I_parts.append(positions.numpy())
    run = run_from_search(query_ids, np.concatenate(D_parts), np.concatenate(I_parts), ad_ids)
    metrics = evaluate(run, qrels, ks=(k,))
    if teacher_metrics:
        metrics |= {f"recovery/{name}": v for name, v in recovery_table(metrics, teacher_metrics).items()}
    return metrics


def evaluate_dev(model: Path, phase: Phase, inputs: PhaseInputs, k: int, runtime: Runtime) -> dict[str, Any]:
    """{"dev": the model's metrics at k (+ recovery/*), "dev_teacher": the teacher's (with dev_teacher_queries)}.

    Phase teacher changes the space, so its model re-embeds the `ads` texts and is compared with the teacher it
    started from (when `ads_emb` and `dev_teacher_queries` are given); a student searches the teacher ad
    embeddings, cut to its width in truncate mode.
    """
    queries = read_queries(inputs.dev_queries)
    qids, texts = queries["query_id"].to_pylist(), queries["text"].to_pylist()
    qrels = qrels_from_labels(read_labels(inputs.dev_labels))
    usable = runtime.device != "cuda" or torch.cuda.is_available()  # a CPU head node evaluates on CPU
    encoder = Encoder.load(model, runtime if usable else Runtime())
    ads = Embeddings.read(inputs.ads_emb) if inputs.ads_emb else None
    teacher = None
    if ads is not None and inputs.dev_teacher_queries:
        t_emb = Embeddings.read(inputs.dev_teacher_queries).rows_for(qids)
        teacher = evaluate_retrieval(t_emb, qids, ads.emb, ads.ids, qrels, k)
    if phase is Phase.teacher:
        ad_table = read_ads(inputs.ads)
        ad_ids, ad_emb = ad_table["ad_id"].to_pylist(), encoder.encode(ad_table["text"].to_pylist(), kind="ad")
    else:  # in truncate mode the student's space is the teacher's first d dims
        check_same_space(space_at_width(ads.space, ads.emb.shape[1], encoder.dim), encoder.space, f"model {model}")
        ad_ids, ad_emb = ads.ids, truncate(ads.emb, encoder.dim)
    reference = {name: v for name, v in (teacher or {}).items() if v > 0}  # recovery is undefined over a 0
    student = evaluate_retrieval(encoder.encode(texts), qids, ad_emb, ad_ids, qrels, k, teacher_metrics=reference)
    return {"dev": student, **({"dev_teacher": teacher} if teacher else {})}
