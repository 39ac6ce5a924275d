"""Tiny randomly initialised encoders built from a config, so tests run in seconds without any weights.

Two families: a BERT-like bidirectional encoder (mean pooling, like the defaults) and a Qwen3-like
decoder (last-token pooling with a query instruction, the shape of a billion-scale teacher). The
tokenizer is a character-level WordPiece built in memory, so any text tokenises and nothing is fetched.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import AutoModel, BertConfig, PreTrainedTokenizerFast, Qwen3Config

from hlm.config import Pooling
from hlm.encoder import Encoder, EncoderSettings

Family = Literal["bert", "qwen3"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["drill", "cordless", "lamp", "paint", "door", "tile", "water", "light", "wood", "steel", "white", "black"]


def tiny_tokenizer(family: Family) -> PreTrainedTokenizerFast:
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars + [f"##{c}" for c in chars] + WORDS)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=50))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_, sep = ("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])
    # BERT wraps in [CLS] … [SEP]; a decoder ends on an EOS token that last-token pooling reads.
    if family == "bert":
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[cls_, sep])
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A [SEP]", special_tokens=[sep])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", eos_token="[SEP]", model_max_length=128)


def tiny_encoder(family: Family = "bert", *, hidden: int = 32, layers: int = 2, projection_dim: int | None = None,
                 seed: int = 0, max_length: int = 32) -> Encoder:
    """A random encoder of width `hidden` (or `projection_dim` with a projection head); deterministic per seed."""
    tokenizer = tiny_tokenizer(family)
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                  intermediate_size=2 * hidden, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    if family == "bert":
        config = BertConfig(**common)
        settings = EncoderSettings(pooling=Pooling.mean, normalize=True, max_length=max_length)
    else:
        config = Qwen3Config(**common, num_key_value_heads=1, head_dim=hidden // 2, tie_word_embeddings=False)
        settings = EncoderSettings(pooling=Pooling.last_token, normalize=True, max_length=max_length,
                                   query_prompt="Instruct: find relevant ads\nQuery: ")
    settings.projection_dim = projection_dim
    settings.source = f"tiny-{family}-{hidden}x{layers}-seed{seed}"
    backbone = AutoModel.from_config(config)
    return Encoder(backbone, tokenizer, settings).eval()


def save_tiny_encoder(folder: str | Path, family: Family = "bert", **kwargs) -> Path:
    """Build and save a tiny encoder; Ray actors and jobs load it by path like any other model."""
    return tiny_encoder(family, **kwargs).save(folder)
