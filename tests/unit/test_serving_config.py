"""serving/config.yaml is a valid `serve deploy` config whose args fit the typed builder."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from serving.app import AppArgs

REPO = Path(__file__).resolve().parents[2]


def test_serve_config_validates_against_the_serve_schema_and_the_builder_args():
    config = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    for app in config["applications"]:
        module, attr = app["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), attr))
        AppArgs.model_validate(app["args"])
