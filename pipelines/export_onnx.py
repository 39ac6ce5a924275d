"""Export an encoder to ONNX, fp32 and int8, so that `precision: onnx` or `onnx_int8` runs it on ONNX Runtime.

    python -m pipelines.export_onnx --model runs/refine/model
    python -m pipelines.export_onnx --model student-default --out runs/student-onnx

Writes MODEL/hlm_onnx/encoder.onnx and encoder_int8.onnx (with --out: saves the model there first, for a model
that is not a folder of yours), then loads both back and prints how close they are to torch fp32 on probe texts.
Use it by config, e.g. `student: {model: runs/refine/model, precision: onnx_int8}` in serving/config.yaml, or
`--set student.precision=onnx` for a job.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

from hlm.cli import command_parser, setup_logging
from hlm.config import ModelRef, Precision
from hlm.encoder import Encoder
from hlm.onnx_runtime import export_onnx
from hlm.pretrained import WeightsError

PROBES = ["cordless drill 18v", "white ceiling paint", "brass floor lamp with a linen shade", "oak door"]


def main(argv: list[str] | None = None) -> int:
    parser = command_parser(__doc__, __file__)
    parser.add_argument("--model", required=True, help="encoder folder, or a default name with --out")
    parser.add_argument("--out", type=Path, help="save the model here with its ONNX graphs (default: --model)")
    args = parser.parse_args(argv)
    setup_logging()
    logging.getLogger("onnxscript").setLevel(logging.WARNING)  # its optimiser logs every constant it keeps
    try:
        encoder = Encoder.load(ModelRef(model=args.model, precision=Precision.fp32))
        folder = encoder.save(args.out) if args.out else Path(args.model)
        if not (folder / "hlm_encoder.json").exists() and not args.out:
            raise WeightsError(f"{folder} is not a folder saved by HLM; pass --out to save the model with its graphs")
        files = export_onnx(encoder, folder)
        reference = encoder.encode(PROBES)  # (n, d)
        for precision, path in zip((Precision.onnx, Precision.onnx_int8), files, strict=True):
            emb = Encoder.load(ModelRef(model=str(folder), precision=precision)).encode(PROBES)  # (n, d)
            cosine = (emb * reference).sum(axis=1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(reference, axis=1))
            print(f"wrote {path}: {precision.value}, max |Δ| {np.abs(emb - reference).max():.2e}, "
                  f"min cosine to torch fp32 {cosine.min():.4f} on {len(PROBES)} probe texts")
    except (WeightsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"use it with precision onnx or onnx_int8, e.g. --set student.model={folder} --set student.precision=onnx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
