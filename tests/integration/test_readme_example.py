"""The README's "From Python" example runs as written, on the files the walkthrough leaves (tiny stand-ins)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from hlm.data import read_embeddings
from hlm.encoder import Encoder
from hlm.index import AdIndex
from hlm.redis_client import redis_client
from hlm.store import IndexStore
from hlm.tiny import save_tiny_encoder

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def readme_python_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("### From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_example_runs_on_the_walkthrough_outputs(catalog_split, redis_url, tmp_path,
                                                                   monkeypatch, capsys):
    # Given the walkthrough's outputs: emb/ads from the teacher, runs/refine/model aligned to it, the index published
    monkeypatch.chdir(tmp_path)
    (tmp_path / "emb/ads").mkdir(parents=True)
    shutil.copy(catalog_split["ads_emb"], tmp_path / "emb/ads/part-0.parquet")
    student = Encoder.load(save_tiny_encoder(tmp_path / "raw", "bert", hidden=48, seed=7))
    student.settings.target_space = catalog_split["space"]
    student.save(tmp_path / "runs/refine/model")
    ids, emb, space = read_embeddings("emb/ads")
    IndexStore(redis_client(redis_url), "readme").publish(AdIndex.build(ids, emb, space["fingerprint"]))
    # When the example runs (against this session's Redis and an index name no other test uses)
    code = readme_python_example()
    assert '"redis://127.0.0.1:6379/0"' in code and '"ads")' in code
    exec(compile(code.replace('"redis://127.0.0.1:6379/0"', repr(redis_url)).replace('"ads")', '"readme")'),
                 "README.md", "exec"), {})
    # Then it prints both queries' hits and the served index's, five (ad_id, score) each
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 3 and all(line.count("', ") == 5 for line in printed)
