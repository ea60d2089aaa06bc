"""Export transformer models with random weights to ONNX for fusion benchmarks and tests.

Needs the `export` extra (torch==2.13.0, the CPU build on local disk, and transformers):

    python -m pip install -e ".[export]"
    python benchmarks/export_transformers.py OUT_DIR [--variants minilm-legacy-eager,resnet50-dynamo,...]

Text (the default set): minilm-<exporter>-<attention>.onnx, a MiniLM-size BERT encoder (6 layers,
hidden 384, 12 heads, intermediate 1536), dynamic batch and sequence, opset 17; the variants are
named legacy-eager, legacy-sdpa, dynamo-eager, dynamo-sdpa (without the "minilm-" prefix).

Vision (``--variants vision`` for all eight): <model>-<exporter>.onnx for model in vit (ViTModel,
4 layers, hidden 192, 3 heads, 224x224), resnet50 (ResNetModel, the resnet-50 config: bottleneck,
depths 3,4,6,3), mobilenetv2 (MobileNetV2Model, width 1.0, 224) and convnext (ConvNextModel, the
convnext-tiny config, 224); input ``pixel_values`` [batch, 3, 224, 224] with a dynamic batch,
outputs ``last_hidden_state`` and ``pooler_output``. Exporter ``legacy``: dynamo=False, opset 17;
``dynamo``: dynamo=True at its default opset (20 with torch 2.13), external_data=False.

All weights are seeded random (torch.manual_seed(0)); vision weights get seeded noise on top of
their initialization (so biases are not zero, norm scales not all ones and BatchNorm statistics
not trivial, as in a trained checkpoint). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

TEXT_VARIANTS = ("legacy-eager", "legacy-sdpa", "dynamo-eager", "dynamo-sdpa")
VISION_MODELS = ("vit", "resnet50", "mobilenetv2", "convnext")
VISION_VARIANTS = tuple(f"{model}-{exporter}" for model in VISION_MODELS for exporter in ("legacy", "dynamo"))
VARIANTS = TEXT_VARIANTS + VISION_VARIANTS
GROUPS = {"text": TEXT_VARIANTS, "vision": VISION_VARIANTS, "all": VARIANTS}
IMAGE = 224


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


def vision_model(name: str):
    """A transformers vision backbone ("vit", "resnet50", "mobilenetv2", "convnext") with seeded random weights."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if name == "vit":
        config = tf.ViTConfig(
            hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768, image_size=IMAGE, patch_size=16
        )
        model = tf.ViTModel(config)
    elif name == "resnet50":
        config = tf.ResNetConfig(
            embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3], layer_type="bottleneck", hidden_act="relu"
        )
        model = tf.ResNetModel(config)
    elif name == "mobilenetv2":
        config = tf.MobileNetV2Config(image_size=IMAGE, depth_multiplier=1.0)
        model = tf.MobileNetV2Model(config)
    elif name == "convnext":
        config = tf.ConvNextConfig(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768], image_size=IMAGE)
        model = tf.ConvNextModel(config)
    else:
        raise ValueError(f"unknown vision model '{name}'")
    model.eval()
    with torch.no_grad():  # like a trained checkpoint: no zero bias, no all-ones norm scale, real BatchNorm statistics
        generator = torch.Generator().manual_seed(1)
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


def export_text(variant: str, out_dir: Path) -> Path:
    """Export one MiniLM variant ("legacy-eager", ...) and return the file written."""
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


def export_vision(variant: str, out_dir: Path) -> Path:
    """Export one vision variant ("resnet50-dynamo", ...) and return the file written."""
    import torch

    class Backbone(torch.nn.Module):
        """Positional pixel_values -> (last_hidden_state, pooler_output)."""

        def __init__(self, model) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            out = self.model(pixel_values=pixel_values)
            return out.last_hidden_state, out.pooler_output

    name, exporter = variant.split("-")
    model = Backbone(vision_model(name)).eval()
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    path = out_dir / f"{variant}.onnx"
    names = dict(input_names=["pixel_values"], output_names=["last_hidden_state", "pooler_output"])
    with torch.no_grad():
        if exporter == "legacy":
            axes = {"pixel_values": {0: "batch"}, "last_hidden_state": {0: "batch"}, "pooler_output": {0: "batch"}}
            torch.onnx.export(model, (pixels,), str(path), dynamo=False, opset_version=17, dynamic_axes=axes, **names)
        else:
            shapes = {"pixel_values": {0: torch.export.Dim("batch", min=1, max=64)}}
            torch.onnx.export(model, (pixels,), str(path), dynamo=True, dynamic_shapes=shapes, external_data=False, **names)
    return path


def export(variant: str, out_dir: Path) -> Path:
    """Export one variant (a text one such as "legacy-eager" or a vision one such as "vit-dynamo")."""
    if variant in TEXT_VARIANTS:
        return export_text(variant, out_dir)
    return export_vision(variant, out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--variants",
        default=",".join(TEXT_VARIANTS),
        help="comma-separated variants, or the groups 'text' (the default), 'vision', 'all'",
    )
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    chosen: list[str] = []
    for item in args.variants.split(","):
        item = item.removeprefix("minilm-")
        if item not in VARIANTS and item not in GROUPS:
            parser.error(f"unknown variant '{item}' (choose from {', '.join(VARIANTS)} or {', '.join(GROUPS)})")
        chosen.extend(v for v in GROUPS.get(item, (item,)) if v not in chosen)
    for variant in chosen:
        start = time.perf_counter()
        path = export(variant, args.out_dir)
        print(f"{path}  ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
