"""The one encoder contract for teacher, student, jobs and Serve: `encode(texts) -> float32 (n, d)`.

An :class:`Encoder` is a Hugging Face backbone plus pooling, optional L2 normalisation, an optional query
instruction and an optional linear projection into a wider (teacher) space. Its settings live in a small
JSON beside the HF files (`hlm_encoder.json`), so pooling, normalisation and the projection are never
silent defaults in callers. A saved encoder is also a complete sentence-transformers folder (`hlm.st_format`):
`SentenceTransformer(folder).encode_query(texts)` gives what `encode(texts)` gives. Precision (fp32 | bf16 | fp16 |
int8, `hlm.precision`) is chosen at load time and never saved: it changes how the encoder computes, not the space
its float32 outputs live in.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from hlm.config import ModelRef, Pooling, Precision, Runtime
from hlm.precision import ONNX, quantize_int8, resolve_precision, weight_dtype
from hlm.space import Space
from hlm.st_format import load_dense, read_st_folder, write_st_folder

logger = logging.getLogger(__name__)

SETTINGS_FILE = "hlm_encoder.json"
LEGACY_PROJECTION_FILE = "projection.safetensors"  # where encoders saved before the ST format kept the head
Kind = Literal["query", "ad"]


@dataclass
class EncoderSettings:
    pooling: Pooling = Pooling.mean
    normalize: bool = True
    max_length: int = 64
    query_prompt: str = ""
    projection_dim: int | None = None  # output width of the projection head; None = no head
    projection_bias: bool = False  # a sentence-transformers Dense with a bias (HLM's own heads have none)
    target_space: str | None = None  # fingerprint of the space a student was aligned to
    weights_sha256: str = ""  # of the backbone weights as saved; part of the space fingerprint
    source: str = ""  # where the weights came from, for people reading the folder
    extra: dict = field(default_factory=dict)
    precision: Precision = Precision.fp32  # how the loaded weights compute; set by `Encoder.load`, not saved

    def to_json(self) -> str:
        saved = {k: v for k, v in asdict(self).items() if k != "precision"}
        return json.dumps({**saved, "pooling": self.pooling.value}, indent=2, sort_keys=True)

    def space(self, dim: int) -> str:
        """Fingerprint of the space these settings produce at width `dim` (a student's is its teacher's)."""
        own = Space(self.weights_sha256, self.pooling.value, self.normalize, dim, self.query_prompt)
        return self.target_space or own.fingerprint

    def describe(self, dim: int) -> dict:
        return {"fingerprint": self.space(dim), "model": self.source, "pooling": self.pooling.value, "dim": dim,
                "normalized": self.normalize, "query_prompt": self.query_prompt}

    @classmethod
    def from_json(cls, text: str) -> EncoderSettings:
        raw = json.loads(text)
        return cls(**{**raw, "pooling": Pooling(raw["pooling"])})


def resolve_device(runtime: Runtime | None = None) -> tuple[torch.device, torch.dtype]:
    """'auto' → CUDA with bf16 when present, else CPU with fp32."""
    runtime = runtime or Runtime()
    cuda = torch.cuda.is_available() if runtime.device == "auto" else runtime.device == "cuda"
    dtype_name = runtime.dtype if runtime.dtype != "auto" else ("bfloat16" if cuda else "float32")
    return torch.device("cuda" if cuda else "cpu"), getattr(torch, dtype_name)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_sha256(folder: Path) -> str:
    """sha256 over the folder's weight files in name order (one file: that file's own sha256)."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    files = [f for f in files if f.name != LEGACY_PROJECTION_FILE]
    if len(files) == 1:
        return sha256_file(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def pool(hidden: Tensor, mask: Tensor, pooling: Pooling) -> Tensor:
    """hidden (B, T, h), mask (B, T) of right-padded tokens -> (B, h)."""
    if pooling is Pooling.cls:
        return hidden[:, 0]
    if pooling is Pooling.last_token:
        last = mask.sum(dim=1) - 1  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


class Encoder(nn.Module):
    def __init__(self, backbone: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: EncoderSettings):
        super().__init__()
        if not tokenizer.is_fast:  # a Python tokenizer costs more than the student's forward pass on short queries
            raise ValueError(f"{type(tokenizer).__name__} is a slow (Python) tokenizer; the encoder needs a fast "
                             "(Rust) one: save the model with its tokenizer.json")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"  # pool() indexes the last real token from the right
        self.settings = settings
        self.backbone.config.use_cache = False  # an encoder never generates: no KV cache (decoder backbones)
        width = backbone.config.hidden_size
        self.projection = (nn.Linear(width, settings.projection_dim, bias=settings.projection_bias)
                           if settings.projection_dim else None)
        if self.projection is not None:
            self.projection.to(device=backbone.device, dtype=backbone.dtype)

    # ------------------------------------------------------------------------------------------ identity
    @property
    def dim(self) -> int:
        return self.settings.projection_dim or self.backbone.config.hidden_size

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def space(self) -> str:
        """Fingerprint of the space this encoder's outputs live in (a student's is its teacher's)."""
        return self.settings.space(self.dim)

    def describe_space(self) -> dict:
        """What embeddings files and index manifests record about this encoder's space."""
        return self.settings.describe(self.dim)

    # ------------------------------------------------------------------------------------------ compute
    def tokenize(self, texts: list[str], kind: Kind = "query") -> dict[str, Tensor]:
        if kind == "query" and self.settings.query_prompt:
            texts = [self.settings.query_prompt + t for t in texts]
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.settings.max_length,
                               return_tensors="pt", return_token_type_ids=False)
        return {k: v.to(self.device) for k, v in batch.items()}

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Tokenised batch -> embeddings (B, d), with gradients; the training loops call this."""
        hidden = self.backbone(**batch).last_hidden_state  # (B, T, h)
        emb = pool(hidden, batch["attention_mask"], self.settings.pooling)  # (B, h)
        if self.projection is not None:
            emb = self.projection(emb)  # (B, d)
        return F.normalize(emb, dim=-1) if self.settings.normalize else emb

    @torch.inference_mode()
    def encode(self, texts: list[str], *, kind: Kind = "query", batch_size: int = 64) -> np.ndarray:
        """texts -> float32 (n, d) at every precision. Batches are formed by length to cut padding; output keeps
        input order."""
        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        was_training = self.training
        self.eval()
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            emb = self(self.tokenize([texts[i] for i in idx], kind))  # (b, d)
            out[idx] = emb.float().cpu().numpy()
        self.train(was_training)
        return out

    # ------------------------------------------------------------------------------------------ persistence
    def save(self, folder: str | Path) -> Path:
        """HF files + the sentence-transformers modules (the projection is its Dense) + `hlm_encoder.json`; the
        weights hash is recomputed from what was written."""
        if self.settings.precision is Precision.int8:
            raise ValueError("an int8 encoder holds quantised modules that HF cannot save; save the fp32 encoder "
                             "and load it with precision int8")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        (folder / LEGACY_PROJECTION_FILE).unlink(missing_ok=True)  # a stale head would win over the Dense on load
        s = self.settings
        write_st_folder(folder, width=self.backbone.config.hidden_size, pooling=s.pooling, normalize=s.normalize,
                        max_length=s.max_length, query_prompt=s.query_prompt, projection=self.projection)
        self.settings = replace(self.settings, weights_sha256=weights_sha256(folder))
        (folder / SETTINGS_FILE).write_text(self.settings.to_json())
        return folder

    @classmethod
    def load(cls, ref: str | Path | ModelRef, runtime: Runtime | None = None) -> Encoder:
        """Load a saved encoder, a plain HF folder, or `teacher-default`/`student-default` (never a hub).

        The precision is `ref.precision`, else the runtime's dtype; a precision the device cannot run
        (int8 or onnx on GPU, fp16 on CPU) raises `hlm.precision.PrecisionError` before the weights are loaded.
        Precision onnx / onnx_int8 returns an `hlm.onnx_runtime.OnnxEncoder` over the folder's exported graph.
        """
        ref = _as_ref(ref)
        folder, settings = _resolve(ref)
        device, runtime_dtype = resolve_device(runtime)
        precision = resolve_precision(ref.precision, device, runtime_dtype)
        dtype = weight_dtype(precision)
        backbone = AutoModel.from_pretrained(folder, dtype=dtype).to(device)
        if precision is Precision.int8:
            backbone = quantize_int8(backbone)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        encoder = cls(backbone, tokenizer, replace(settings, precision=precision))
        if encoder.projection is not None:
            weight, bias = _projection_weights(folder)
            encoder.projection.weight.data.copy_(weight.to(device=device, dtype=dtype))
            if bias is not None:
                encoder.projection.bias.data.copy_(bias.to(device=device, dtype=dtype))
        logger.info("loaded encoder %s (%s, dim %d, space %s) on %s/%s",
                    folder, settings.pooling.value, encoder.dim, encoder.space, device, precision.value)
        if precision in ONNX:
            from hlm.onnx_runtime import OnnxEncoder

            return OnnxEncoder.from_folder(encoder.eval(), folder, precision).eval()
        return encoder.eval()


def _projection_weights(folder: Path) -> tuple[Tensor, Tensor | None]:
    """The head's (weight (d, h), bias or None): the folder's sentence-transformers Dense module."""
    if (folder / LEGACY_PROJECTION_FILE).exists():
        return load_file(folder / LEGACY_PROJECTION_FILE)["weight"], None
    layout = read_st_folder(folder)
    if layout is None or layout.dense is None:
        raise FileNotFoundError(f"{folder}: the settings name a projection head but the folder has no Dense module")
    return load_dense(layout.dense)


def _as_ref(ref: str | Path | ModelRef) -> ModelRef:
    return ref if isinstance(ref, ModelRef) else ModelRef(model=str(ref))


def _resolve(ref: str | Path | ModelRef) -> tuple[Path, EncoderSettings]:
    """(folder, settings with the ModelRef's overrides applied; precision is resolved by `Encoder.load`)."""
    from hlm.pretrained import resolve_model

    ref = _as_ref(ref)
    folder, settings = resolve_model(ref.model)
    overrides = {k: v for k, v in (("pooling", ref.pooling), ("max_length", ref.max_length),
                                   ("query_prompt", ref.query_prompt)) if v is not None}
    return folder, replace(settings, **overrides)


def describe_space_of(ref: str | Path | ModelRef) -> dict:
    """`Encoder.describe_space()` without loading the weights: a CPU-only driver can wire GPU jobs and Serve."""
    folder, settings = _resolve(ref)
    return settings.describe(settings.projection_dim or AutoConfig.from_pretrained(folder).hidden_size)


def space_of(ref: str | Path | ModelRef) -> str:
    return describe_space_of(ref)["fingerprint"]


def read_settings(folder: Path) -> EncoderSettings | None:
    path = folder / SETTINGS_FILE
    return EncoderSettings.from_json(path.read_text()) if path.exists() else None
