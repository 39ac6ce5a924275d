"""The sentence-transformers folder format: what `SentenceTransformer(path)` reads, written and read by HLM.

An HLM encoder is Transformer → Pooling → [Dense] → [Normalize], which is exactly a sentence-transformers
module chain, so a saved encoder is also a complete sentence-transformers folder::

    model.safetensors, config.json, tokenizer*.json   the HF backbone (module 0, at the folder's root)
    modules.json                                      the module chain, in order
    1_Pooling/config.json                             the pooling mode
    2_Dense/config.json, 2_Dense/model.safetensors    the projection head (`linear.weight`, identity activation)
    N_Normalize/                                      L2 normalisation
    sentence_bert_config.json                         max_seq_length (HLM's `max_length`)
    config_sentence_transformers.json                 prompts: {"query": <query_prompt>, "document": ""}

It is written with the legacy type names and `pooling_mode_*` keys, which every sentence-transformers release
from 2.x to 6.x reads. :func:`read_st_folder` accepts those and the 6.x forms (`pooling_mode: "lasttoken"`,
`sentence_transformers.base.modules.*` types, max length in tokenizer_config.json), so a teacher published as a
sentence-transformers model (Qwen3-Embedding: last-token pooling and a query instruction) loads as it was meant.
A chain HLM cannot compute the same way (another pooling, a Tanh Dense, two Dense, a document prompt) is refused
with the file and field that say so, rather than loaded into another space.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hlm.config import Pooling

MODULES_FILE = "modules.json"
ST_CONFIG_FILE = "config_sentence_transformers.json"
BERT_CONFIG_FILE = "sentence_bert_config.json"
DENSE_WEIGHTS = "model.safetensors"
IDENTITY = "torch.nn.modules.linear.Identity"
# sentence-transformers' pooling modes as HLM names them; the others (max, weightedmean, …) HLM does not compute
POOLING_OF = {"cls": Pooling.cls, "mean": Pooling.mean, "lasttoken": Pooling.last_token}
LEGACY_KEY = {Pooling.cls: "pooling_mode_cls_token", Pooling.mean: "pooling_mode_mean_tokens",
              Pooling.last_token: "pooling_mode_lasttoken"}
LEGACY_KEYS = [*LEGACY_KEY.values(), "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
               "pooling_mode_weightedmean_tokens"]


class StFormatError(ValueError):
    """A sentence-transformers folder HLM cannot load without changing what it computes."""


@dataclass(frozen=True)
class StFolder:
    """What an HLM encoder takes from a sentence-transformers folder."""

    pooling: Pooling
    normalize: bool
    max_length: int | None  # None: the folder does not say
    query_prompt: str
    dense: Path | None  # folder of the one Dense module (the projection head), None = no head
    dense_features: tuple[int, int] | None  # (in, out)
    dense_bias: bool


def write_st_folder(folder: Path, *, width: int, pooling: Pooling, normalize: bool, max_length: int,
                    query_prompt: str, projection: torch.nn.Linear | None) -> None:
    """Add the sentence-transformers files beside the HF backbone already saved in `folder`."""
    modules = [("", "sentence_transformers.models.Transformer"), ("1_Pooling", "sentence_transformers.models.Pooling")]
    pooling_cfg = {"word_embedding_dimension": width, **{key: False for key in LEGACY_KEYS},
                   LEGACY_KEY[pooling]: True, "include_prompt": True}
    _write_json(folder / "1_Pooling" / "config.json", pooling_cfg)
    if projection is not None:
        dense = folder / f"{len(modules)}_Dense"
        modules.append((dense.name, "sentence_transformers.models.Dense"))
        has_bias = projection.bias is not None
        _write_json(dense / "config.json", {"in_features": projection.in_features,
                                            "out_features": projection.out_features, "bias": has_bias,
                                            "activation_function": IDENTITY})
        tensors = {"linear.weight": projection.weight.detach().float().cpu().contiguous()}
        if has_bias:
            tensors["linear.bias"] = projection.bias.detach().float().cpu().contiguous()
        save_file(tensors, dense / DENSE_WEIGHTS)
    if normalize:
        modules.append((f"{len(modules)}_Normalize", "sentence_transformers.models.Normalize"))
        (folder / modules[-1][0]).mkdir(exist_ok=True)
    _write_json(folder / MODULES_FILE, [{"idx": i, "name": str(i), "path": path, "type": type_}
                                        for i, (path, type_) in enumerate(modules)])
    _write_json(folder / BERT_CONFIG_FILE, {"max_seq_length": max_length, "do_lower_case": False})
    _write_json(folder / ST_CONFIG_FILE, {"prompts": {"query": query_prompt, "document": ""},
                                          "default_prompt_name": None,
                                          "similarity_fn_name": "cosine" if normalize else "dot"})


def read_st_folder(folder: Path) -> StFolder | None:
    """The settings a sentence-transformers folder describes, or None for a plain HF folder (no modules.json)."""
    path = folder / MODULES_FILE
    if not path.exists():
        return None
    modules = _read_json(path)
    if not isinstance(modules, list) or not modules:
        raise StFormatError(f"{path}: expected a non-empty list of modules")
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    first = modules[0]
    if kinds[0] != "Transformer" or first.get("path", "") != "":
        raise StFormatError(f"{path}: module 0 must be a Transformer at the folder's root (path \"\"), got "
                            f"{first.get('type')} at {first.get('path')!r}")
    pooling, dense, normalize = Pooling.mean, None, False  # a bare Transformer: sentence-transformers adds mean
    expected = ["Pooling", "Dense", "Normalize"]  # the order HLM computes them in
    for module, kind in zip(modules[1:], kinds[1:], strict=True):
        where = f"{path}: module {module.get('idx')} ({module.get('type')})"
        if kind not in expected:
            raise StFormatError(f"{where}: HLM encoders are Transformer → Pooling → [Dense] → [Normalize]; "
                                f"this module is unsupported or out of that order")
        expected = expected[expected.index(kind) + 1:]
        sub = folder / module.get("path", "")
        if kind == "Pooling":
            pooling = _read_pooling(sub / "config.json")
        elif kind == "Dense":
            dense = sub
        else:
            normalize = True
    features, bias = _read_dense(dense / "config.json") if dense is not None else (None, False)
    return StFolder(pooling=pooling, normalize=normalize, max_length=_read_max_length(folder),
                    query_prompt=_read_query_prompt(folder / ST_CONFIG_FILE), dense=dense, dense_features=features,
                    dense_bias=bias)


def load_dense(dense: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in), bias (out,) or None) of a Dense module folder."""
    path = dense / DENSE_WEIGHTS
    if not path.exists():
        raise StFormatError(f"{dense}: no {DENSE_WEIGHTS} (HLM reads Dense weights in safetensors only)")
    tensors = load_file(path)
    if "linear.weight" not in tensors:
        raise StFormatError(f"{path}: no tensor 'linear.weight' (has {sorted(tensors)})")
    return tensors["linear.weight"], tensors.get("linear.bias")


def _read_pooling(path: Path) -> Pooling:
    cfg = _read_json(path)
    if "pooling_mode" in cfg:  # sentence-transformers 6.x: one string (or a list of them)
        modes = cfg["pooling_mode"] if isinstance(cfg["pooling_mode"], list) else [cfg["pooling_mode"]]
    else:
        modes = [key.removeprefix("pooling_mode_").removesuffix("_tokens").removesuffix("_token")
                 for key in LEGACY_KEYS if cfg.get(key)]
    if len(modes) != 1 or modes[0] not in POOLING_OF:
        raise StFormatError(f"{path}: pooling {modes or 'none'}; HLM computes exactly one of {sorted(POOLING_OF)}")
    if cfg.get("include_prompt", True) is False:
        raise StFormatError(f"{path}: include_prompt false (prompt tokens left out of the pooling) is not supported")
    return POOLING_OF[modes[0]]


def _read_dense(path: Path) -> tuple[tuple[int, int], bool]:
    cfg = _read_json(path)
    activation = cfg.get("activation_function", IDENTITY)
    if activation != IDENTITY:
        raise StFormatError(f"{path}: activation_function {activation}; HLM's projection head is linear ({IDENTITY})")
    try:
        return (int(cfg["in_features"]), int(cfg["out_features"])), bool(cfg.get("bias", True))
    except KeyError as e:
        raise StFormatError(f"{path}: missing field {e}") from e


def _read_max_length(folder: Path) -> int | None:
    """sentence_bert_config.json's max_seq_length (legacy), else the tokenizer's model_max_length (6.x)."""
    for name, key in ((BERT_CONFIG_FILE, "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
        value = _read_json(folder / name).get(key) if (folder / name).exists() else None
        if isinstance(value, int) and 0 < value < 1_000_000:  # HF writes ~1e30 for "no limit"
            return value
    return None


def _read_query_prompt(path: Path) -> str:
    """prompts["query"]; a non-empty document prompt is refused: HLM embeds ads as they are."""
    if not path.exists():
        return ""
    prompts = _read_json(path).get("prompts") or {}
    for name in ("document", "passage", "corpus"):
        if prompts.get(name):
            raise StFormatError(f"{path}: prompts.{name} = {prompts[name]!r}; HLM applies a prompt to queries only, "
                                "so ads would land in another space")
    return prompts.get("query", "")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise StFormatError(f"{path}: missing") from e
    except ValueError as e:
        raise StFormatError(f"{path}: not valid JSON ({e})") from e


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")
