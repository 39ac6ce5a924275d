"""The query encoder on ONNX Runtime: one exported graph from tokens to the final embedding, fp32 or int8.

`export_onnx` writes the whole `Encoder.forward` (backbone, pooling, projection head, normalisation) as one ONNX graph,
`input_ids (B, T), attention_mask (B, T) -> sentence_embedding (B, d)`, into the model folder's `hlm_onnx/`, plus an
int8 copy quantised by ONNX Runtime (dynamic quantisation: int8 weights, activations quantised per batch). The folder
is not sentence-transformers' `onnx/` (that one holds the backbone alone). `Encoder.load` with precision `onnx` or
`onnx_int8` returns an :class:`OnnxEncoder`: the same settings, space, width and `encode` contract, with the forward
pass run by an `onnxruntime.InferenceSession` on CPU. `python -m pipelines.export_onnx` is the command.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from hlm.config import Precision
from hlm.encoder import Encoder, Kind

logger = logging.getLogger(__name__)

ONNX_DIR = "hlm_onnx"
GRAPH_FILE = {Precision.onnx: "encoder.onnx", Precision.onnx_int8: "encoder_int8.onnx"}
INPUTS = ["input_ids", "attention_mask"]


class OnnxMissing(FileNotFoundError):
    """The folder has no exported ONNX graph for the requested precision."""


class _Graph(nn.Module):
    """`Encoder.forward` with positional tensor inputs, the form the ONNX exporter traces."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.encoder({"input_ids": input_ids, "attention_mask": attention_mask})  # (B, d)


def export_onnx(encoder: Encoder, folder: str | Path) -> list[Path]:
    """Write `folder/hlm_onnx/encoder.onnx` (fp32) and `encoder_int8.onnx` for a saved fp32 `encoder`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if encoder.settings.precision is not Precision.fp32 or encoder.device.type != "cpu":
        raise ValueError("export an fp32 encoder on CPU; the int8 graph is made from the fp32 one")
    out = Path(folder) / ONNX_DIR
    out.mkdir(parents=True, exist_ok=True)
    fp32, int8 = out / GRAPH_FILE[Precision.onnx], out / GRAPH_FILE[Precision.onnx_int8]
    sample = encoder.tokenize(["an example query", "a second, longer example query"])
    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens")
    was_training = encoder.training
    encoder.eval()
    with torch.no_grad():
        torch.onnx.export(_Graph(encoder), tuple(sample[k] for k in INPUTS), str(fp32), input_names=INPUTS,
                          output_names=["sentence_embedding"], dynamo=True, external_data=False,
                          dynamic_shapes={k: {0: batch, 1: tokens} for k in INPUTS})
    encoder.train(was_training)
    quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8, per_channel=True)
    logger.info("exported %s and %s", fp32, int8)
    return [fp32, int8]


class OnnxEncoder(Encoder):
    """An :class:`Encoder` whose forward pass runs in ONNX Runtime; tokenisation and the contract are unchanged.

    The torch backbone stays loaded (fp32, CPU): it is the reference, and parameter counts read it.
    """

    def __init__(self, encoder: Encoder, graph: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        super().__init__(encoder.backbone, encoder.tokenizer, encoder.settings)
        self.projection = encoder.projection
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()  # as many as torch: comparable speed
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])

    @classmethod
    def from_folder(cls, encoder: Encoder, folder: Path, precision: Precision) -> OnnxEncoder:
        graph = folder / ONNX_DIR / GRAPH_FILE[precision]
        if not graph.exists():
            raise OnnxMissing(f"{graph} does not exist: export it first with "
                              f"`python -m pipelines.export_onnx --model {folder}`")
        return cls(encoder, graph)

    def encode(self, texts: list[str], *, kind: Kind = "query", batch_size: int = 64) -> np.ndarray:
        """texts -> float32 (n, d), length-sorted batches as in `Encoder.encode`, computed by ONNX Runtime."""
        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            batch = self.tokenize([texts[i] for i in idx], kind)
            feeds = {k: batch[k].cpu().numpy() for k in INPUTS}
            out[idx] = self.session.run(None, feeds)[0]  # (b, d)
        return out
