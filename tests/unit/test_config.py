"""Job config: field defaults, then the profile, then the YAML file, then `--set` overrides (last wins)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hlm.config import Config, ConfigError, Pooling, Profile, load_config, parse_override


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_no_file_and_no_overrides_gives_the_cpu_profile_over_field_defaults() -> None:
    # Given nothing from the user / When loading / Then the cpu profile fills runtime, the rest are field defaults
    cfg = load_config()

    assert cfg.profile is Profile.cpu
    assert (cfg.runtime.device, cfg.runtime.dtype) == ("cpu", "float32")
    assert (cfg.embed.batch_size, cfg.embed.num_gpus) == (64, 0.0)
    assert cfg.teacher.model == "teacher-default" and cfg.student.model == "student-default"
    assert (cfg.train.phase, cfg.train.lr, cfg.train.prune_schedule) == ("align", 1e-4, [])


def test_yaml_file_overrides_defaults_and_set_overrides_the_file(tmp_path: Path) -> None:
    # Given a file that sets two fields
    path = write_yaml(tmp_path, "seed: 7\nembed:\n  batch_size: 16\n  num_actors: 3\n")

    # When one of them is also given with --set
    cfg = load_config(path, ["embed.batch_size=32"])

    # Then --set wins for that field, the file wins for the other, and untouched fields keep their defaults
    assert cfg.embed.batch_size == 32
    assert cfg.embed.num_actors == 3
    assert cfg.seed == 7
    assert cfg.embed.rows_per_file == 50_000


@pytest.mark.parametrize(
    ("override", "keys", "value"),
    [
        ("embed.batch_size=128", ["embed", "batch_size"], 128),
        ("runtime.device=cuda", ["runtime", "device"], "cuda"),
        ("train.min_lr=0.5", ["train", "min_lr"], 0.5),
        ("train.prune_schedule=[4, 3, 2]", ["train", "prune_schedule"], [4, 3, 2]),
        ("student.query_prompt=null", ["student", "query_prompt"], None),
        ("student.query_prompt=a=b", ["student", "query_prompt"], "a=b"),
    ],
)
def test_override_values_are_parsed_as_yaml_types(override: str, keys: list[str], value: object) -> None:
    # When / Then
    assert parse_override(override) == (keys, value)


def test_overridden_values_arrive_typed_in_the_config() -> None:
    cfg = load_config(overrides=["embed.batch_size=128", "runtime.device=cuda", "train.lr=3e-5",
                                 "student.pooling=cls", "train.prune_schedule=[4, 2]"])

    assert cfg.embed.batch_size == 128 and isinstance(cfg.embed.batch_size, int)
    assert cfg.runtime.device == "cuda"
    assert cfg.train.lr == pytest.approx(3e-5) and isinstance(cfg.train.lr, float)
    assert cfg.student.pooling is Pooling.cls
    assert cfg.train.prune_schedule == [4, 2]


def test_partial_model_section_keeps_the_default_model(tmp_path: Path) -> None:
    # Given one ModelRef field in the file and another with --set, but no `model`
    path = write_yaml(tmp_path, "teacher:\n  max_length: 64\n")

    # When
    cfg = load_config(path, ["student.pooling=cls", "student.query_prompt='Query: '"])

    # Then the sections keep their default models and take the user's fields
    assert (cfg.teacher.model, cfg.teacher.max_length) == ("teacher-default", 64)
    assert (cfg.student.model, cfg.student.pooling, cfg.student.query_prompt) == ("student-default", Pooling.cls,
                                                                                  "Query: ")


@pytest.mark.parametrize("source", ["file", "override"])
def test_gpu_profile_switches_runtime_and_embed_batch(tmp_path: Path, source: str) -> None:
    # Given profile: gpu, from the file or from --set
    path = write_yaml(tmp_path, "profile: gpu\n") if source == "file" else None
    overrides = ["profile=gpu"] if source == "override" else []

    # When
    cfg = load_config(path, overrides)

    # Then
    assert cfg.profile is Profile.gpu
    assert (cfg.runtime.device, cfg.runtime.dtype) == ("cuda", "bfloat16")
    assert (cfg.embed.batch_size, cfg.embed.num_gpus, cfg.embed.num_cpus) == (512, 1.0, 4.0)
    assert cfg.embed.num_actors == 1  # not part of the profile


def test_explicit_values_win_over_the_profile(tmp_path: Path) -> None:
    # Given a gpu profile with one embed field set in the file and the dtype set with --set
    path = write_yaml(tmp_path, "profile: gpu\nembed:\n  batch_size: 100\n")

    # When
    cfg = load_config(path, ["runtime.dtype=float16"])

    # Then the user's values win, and the profile still fills what the user left alone
    assert cfg.embed.batch_size == 100
    assert cfg.runtime.dtype == "float16"
    assert cfg.runtime.device == "cuda"
    assert cfg.embed.num_gpus == 1.0


@pytest.mark.parametrize(
    ("override", "named"),
    [("batch_sise=3", "batch_sise"), ("embed.batch_sise=3", "embed.batch_sise"),
     ("train.lrr=0.1", "train.lrr"), ("runtime.gpu.count=2", "runtime.gpu")],
)
def test_unknown_key_raises_config_error_naming_it(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(overrides=[override])


def test_unknown_key_in_the_file_names_the_file_and_the_key(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "embed:\n  batch_sise: 3\n")

    with pytest.raises(ConfigError) as err:
        load_config(path)

    assert str(path) in str(err.value) and "embed.batch_sise" in str(err.value)


@pytest.mark.parametrize(
    ("override", "field"),
    [("embed.batch_size=-1", "embed.batch_size"), ("embed.batch_size=0", "embed.batch_size"),
     ("train.lr=0", "train.lr"), ("runtime.device=tpu", "runtime.device"),
     ("embed.batch_size=many", "embed.batch_size"), ("train.prune_schedule=[2, 3]", "train.prune_schedule")],
)
def test_bad_value_raises_config_error_naming_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(overrides=[override])


@pytest.mark.parametrize("override", ["embed.batch_size", "=3", "  =3", "embed.batch_size=[1,"])
def test_malformed_override_raises_config_error(override: str) -> None:
    with pytest.raises(ConfigError, match="override"):
        load_config(overrides=[override])


def test_override_below_a_scalar_raises_config_error(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "seed: 3\n")

    with pytest.raises(ConfigError, match="'seed' is not a section"):
        load_config(path, ["seed.value=1"])


@pytest.mark.parametrize("text", ["- a\n- b\n", "key: [unclosed\n"])
def test_file_that_is_not_a_yaml_mapping_raises_config_error_naming_it(tmp_path: Path, text: str) -> None:
    path = write_yaml(tmp_path, text)

    with pytest.raises(ConfigError, match="job.yaml"):
        load_config(path)


def test_unknown_profile_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="profile"):
        load_config(overrides=["profile=tpu"])


def test_missing_config_file_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="absent.yaml"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_saved_config_loads_back_equal(tmp_path: Path, profile: str) -> None:
    # Given a config with values set at every level
    cfg = load_config(overrides=[f"profile={profile}", "seed=5", "runtime.device=cpu", "student.pooling=last_token",
                                 "student.query_prompt='Query: '", "train.prune_schedule=[4, 3]", "train.lr=2e-5"])

    # When it is saved and loaded again
    saved = cfg.save(tmp_path / "out" / "config.yaml")
    again = load_config(saved)

    # Then nothing changed
    assert saved.is_file()
    assert again == cfg
    assert isinstance(again, Config)


def test_an_override_of_one_yaml_alias_leaves_the_others_alone(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("student: &m {model: student-default}\nteacher: *m\n")
    cfg = load_config(path, ["student.max_length=16"])
    assert cfg.student.max_length == 16 and cfg.teacher.max_length is None


def test_the_shipped_defaults_restart_a_killed_train_worker() -> None:
    # test_train_worker_killed.py kills a worker under these same defaults, without overriding them
    assert load_config().cluster.max_failures >= 1
