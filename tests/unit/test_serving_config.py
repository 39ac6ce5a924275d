"""serving/config.yaml and the RayService are valid `serve deploy` configs whose args fit the typed builder, and
the Serve options come from one pure function of those args (`hlm.deployment.deployment_options`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from hlm.deployment import AppArgs, deployment_options, replica_threads
from tests.conftest import assert_valid_serve_config

REPO = Path(__file__).resolve().parents[2]


def shipped_configs() -> dict[str, dict]:
    service = next(d for d in yaml.safe_load_all((REPO / "infra/kuberay/rayservice.yaml").read_text())
                   if d["kind"] == "RayService")
    return {"serving/config.yaml": yaml.safe_load((REPO / "serving" / "config.yaml").read_text()),
            "rayservice serveConfigV2": yaml.safe_load(service["spec"]["serveConfigV2"])}


def test_serve_config_validates_against_the_serve_schema_and_the_builder_args():
    assert_valid_serve_config(shipped_configs()["serving/config.yaml"])


@pytest.mark.parametrize("where", ["serving/config.yaml", "rayservice serveConfigV2"])
def test_the_shipped_deployments_entries_are_the_options_computed_from_their_args(where):
    for app in shipped_configs()[where]["applications"]:
        computed = deployment_options(AppArgs.model_validate(app["args"]))
        shown = {entry["name"]: {k: v for k, v in entry.items() if k != "name"} for entry in app["deployments"]}
        assert shown == computed, where


CPU_API = {
    "autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 32,
                           "upscale_delay_s": 10.0, "downscale_delay_s": 120.0, "look_back_period_s": 30.0},
    "max_ongoing_requests": 64, "max_queued_requests": 64, "ray_actor_options": {"num_cpus": 1, "num_gpus": 0},
    "logging_config": {"enable_access_log": False}}


def test_the_cpu_profile_is_one_autoscaled_hop_with_one_cpu_and_one_thread():
    args = AppArgs(max_replicas=4)
    options = deployment_options(args)
    assert options == {"Api": CPU_API}
    assert replica_threads(args, options["Api"]) == 1


def test_the_gpu_profile_gives_the_one_hop_replica_an_a100_and_cpus_for_tokenising_and_faiss():
    args = AppArgs(profile="gpu", max_replicas=4)
    options = deployment_options(args)
    assert options == {"Api": {**CPU_API, "ray_actor_options": {"num_cpus": 6, "num_gpus": 1}}}
    assert replica_threads(args, options["Api"]) == 6


def test_the_split_topology_sizes_the_encoder_tier_for_one_call_per_batch_per_api_replica():
    options = deployment_options(AppArgs(profile="gpu", topology="split", max_replicas=4))
    assert options["Api"]["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0}
    encoder = options["QueryEncoder"]
    assert encoder["ray_actor_options"] == {"num_cpus": 6, "num_gpus": 1}
    assert encoder["autoscaling_config"]["target_ongoing_requests"] == 2
    assert encoder["max_ongoing_requests"] >= 4 * 2  # every Api replica's batch and an /v1/embed call each


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
@pytest.mark.parametrize("topology", ["one_hop", "split"])
def test_every_deployment_on_the_request_path_autoscales_with_room_above_its_target(profile, topology):
    args = AppArgs(profile=profile, topology=topology, max_batch_size=16, upscale_delay_s=3, downscale_delay_s=7)
    for name, options in deployment_options(args).items():
        scaling = options["autoscaling_config"]
        assert scaling["upscale_delay_s"] == 3 and scaling["downscale_delay_s"] == 7, name
        assert options["max_ongoing_requests"] > scaling["target_ongoing_requests"], name
    assert deployment_options(args)["Api"]["autoscaling_config"]["target_ongoing_requests"] >= 16


def test_a_target_below_the_batch_size_is_refused_naming_the_field():
    with pytest.raises(ValidationError, match="target_ongoing_requests"):
        AppArgs(max_batch_size=32, target_ongoing_requests=8)
    with pytest.raises(ValidationError, match="min_replicas"):
        AppArgs(min_replicas=3, max_replicas=2)


def test_explicit_cpus_and_threads_win_over_the_profile_defaults():
    args = AppArgs(replica_cpus=0.25, threads=2, access_log=True)
    options = deployment_options(args)["Api"]
    assert options["ray_actor_options"]["num_cpus"] == 0.25 and options["logging_config"]["enable_access_log"]
    assert replica_threads(args, options) == 2 and replica_threads(AppArgs(replica_cpus=0.25), options) == 1
