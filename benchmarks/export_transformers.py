"""Export transformer models with random weights to ONNX for fusion benchmarks and tests.

Needs the `export` extra (torch==2.13.0, the CPU build on local disk, and transformers):

    python -m pip install -e ".[export]"
    python benchmarks/export_transformers.py OUT_DIR [--variants legacy-eager,legacy-sdpa,dynamo-eager,dynamo-sdpa]

Writes minilm-<exporter>-<attention>.onnx: a MiniLM-size BERT encoder (6 layers, hidden 384,
12 heads, intermediate 1536), seeded random weights, dynamic batch and sequence, opset 17.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

VARIANTS = ("legacy-eager", "legacy-sdpa", "dynamo-eager", "dynamo-sdpa")


def minilm(attention: str):
    """A MiniLM-size BertModel with seeded random weights and the given attention implementation."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        attn_implementation=attention,
    )
    return BertModel(config).eval()


def export(variant: str, out_dir: Path) -> Path:
    """Export one variant ("legacy-eager", ...) and return the file written."""
    import torch

    class Encoder(torch.nn.Module):
        """Positional (input_ids, attention_mask) -> last_hidden_state, as exporters expect."""

        def __init__(self, bert) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    exporter, attention = variant.split("-")
    model = Encoder(minilm(attention)).eval()
    ids = torch.randint(0, 30522, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    path = out_dir / f"minilm-{variant}.onnx"
    kwargs = dict(
        input_names=["input_ids", "attention_mask"],
        output_names=["last_hidden_state"],
        opset_version=17,
    )
    if exporter == "legacy":
        axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "last_hidden_state": {0: "batch", 1: "seq"}}
        torch.onnx.export(model, (ids, mask), str(path), dynamo=False, dynamic_axes=axes, **kwargs)
    else:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", min=2, max=512)
        shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
        torch.onnx.export(model, (ids, mask), str(path), dynamo=True, dynamic_shapes=shapes, external_data=False, **kwargs)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            parser.error(f"unknown variant '{variant}' (choose from {', '.join(VARIANTS)})")
        print(export(variant, args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
