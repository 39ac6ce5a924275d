"""serving/config.yaml is a valid `serve deploy` config whose args fit the typed builder."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.conftest import assert_valid_serve_config

REPO = Path(__file__).resolve().parents[2]


def test_serve_config_validates_against_the_serve_schema_and_the_builder_args():
    assert_valid_serve_config(yaml.safe_load((REPO / "serving" / "config.yaml").read_text()))
