"""Real architectures exported to ONNX: transformers' model classes with seeded random weights.

Needs the `export` extra (torch==2.13.0, the CPU build on this project's machines, transformers
and onnxscript); nothing is downloaded. Two sizes of each model:

* ``bench``: the benchmark sizes. MiniLM-size BERT encoder (6 layers, hidden 384, 12 heads,
  intermediate 1536), ViT (4 layers, hidden 192, 3 heads, 224x224), ResNet-50 (bottleneck,
  depths 3,4,6,3), MobileNetV2 (width 1.0, 224), ConvNeXt (the convnext-tiny config, 224).
* ``tiny``: the same architectures a few layers deep and a few channels wide, for tests.

Text variants are ``<exporter>-<attention>`` (legacy|dynamo x eager|sdpa), written as
``minilm-<variant>.onnx`` (``tinybert-`` for tiny); inputs ``input_ids`` / ``attention_mask``
with dynamic batch and sequence, output ``last_hidden_state``, opset 17. Vision variants are
``<model>-<exporter>``, input ``pixel_values`` with a dynamic batch, outputs
``last_hidden_state`` and ``pooler_output``. Exporter ``legacy``: dynamo=False, opset 17;
``dynamo``: dynamo=True at its default opset (20 with torch 2.13), external_data=False. Vision
weights get seeded noise on top of their initialization (biases not zero, norm scales not all
ones, BatchNorm statistics not trivial, as in a trained checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

TEXT_VARIANTS = ("legacy-eager", "legacy-sdpa", "dynamo-eager", "dynamo-sdpa")
VISION_MODELS = ("vit", "resnet50", "mobilenetv2", "convnext")
VISION_VARIANTS = tuple(f"{model}-{exporter}" for model in VISION_MODELS for exporter in ("legacy", "dynamo"))
VARIANTS = TEXT_VARIANTS + VISION_VARIANTS
Size = Literal["bench", "tiny"]
IMAGE = {"bench": 224, "tiny": 64}
VOCAB = {"bench": 30522, "tiny": 100}
TEXT_LAYERS = {"bench": 6, "tiny": 2}


def bert(attention: str, size: Size = "bench"):
    """A BertModel (MiniLM size, or tiny) with seeded random weights and the given attention implementation."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    dims = (
        {"hidden_size": 384, "num_attention_heads": 12, "intermediate_size": 1536}
        if size == "bench"
        else {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
    )
    config = BertConfig(vocab_size=VOCAB[size], num_hidden_layers=TEXT_LAYERS[size], attn_implementation=attention, **dims)
    return BertModel(config).eval()


def vision_model(name: str, size: Size = "bench"):
    """A transformers vision backbone ("vit", "resnet50", "mobilenetv2", "convnext") with seeded random weights."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    tiny = size == "tiny"
    if name == "vit":
        dims = (32, 2, 2, 64, 16) if tiny else (192, 4, 3, 768, 16)
        config = tf.ViTConfig(
            hidden_size=dims[0],
            num_hidden_layers=dims[1],
            num_attention_heads=dims[2],
            intermediate_size=dims[3],
            image_size=IMAGE[size],
            patch_size=dims[4],
        )
        model = tf.ViTModel(config)
    elif name == "resnet50":
        widths, depths = ([16, 32], [1, 1]) if tiny else ([256, 512, 1024, 2048], [3, 4, 6, 3])
        config = tf.ResNetConfig(
            embedding_size=16 if tiny else 64, hidden_sizes=widths, depths=depths, layer_type="bottleneck", hidden_act="relu"
        )
        model = tf.ResNetModel(config)
    elif name == "mobilenetv2":
        config = tf.MobileNetV2Config(image_size=IMAGE[size], depth_multiplier=0.35 if tiny else 1.0)
        model = tf.MobileNetV2Model(config)
    elif name == "convnext":
        widths, depths = ([16, 32], [1, 1]) if tiny else ([96, 192, 384, 768], [3, 3, 9, 3])
        config = tf.ConvNextConfig(depths=depths, hidden_sizes=widths, image_size=IMAGE[size], num_stages=len(depths))
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


def file_name(variant: str, size: Size = "bench") -> str:
    """The file ``export`` writes for ``variant``."""
    if variant in TEXT_VARIANTS:
        return f"{'minilm' if size == 'bench' else 'tinybert'}-{variant}.onnx"
    return f"{variant}.onnx" if size == "bench" else f"tiny{variant}.onnx"


def export_text(variant: str, out_dir: Path, size: Size = "bench") -> Path:
    """Export one BERT variant ("legacy-eager", ...) and return the file written."""
    import torch

    class Encoder(torch.nn.Module):
        """Positional (input_ids, attention_mask) -> last_hidden_state, as exporters expect."""

        def __init__(self, model) -> None:
            super().__init__()
            self.bert = model

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    exporter, attention = variant.split("-")
    model = Encoder(bert(attention, size)).eval()
    ids = torch.randint(0, VOCAB[size], (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    path = out_dir / file_name(variant, size)
    kwargs = dict(input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"], opset_version=17)
    if exporter == "legacy":
        axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "last_hidden_state": {0: "batch", 1: "seq"}}
        torch.onnx.export(model, (ids, mask), str(path), dynamo=False, dynamic_axes=axes, **kwargs)
    else:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", min=2, max=512)
        shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
        torch.onnx.export(model, (ids, mask), str(path), dynamo=True, dynamic_shapes=shapes, external_data=False, **kwargs)
    return path


def export_vision(variant: str, out_dir: Path, size: Size = "bench") -> Path:
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
    model = Backbone(vision_model(name, size)).eval()
    pixels = torch.randn(2, 3, IMAGE[size], IMAGE[size])
    path = out_dir / file_name(variant, size)
    names = dict(input_names=["pixel_values"], output_names=["last_hidden_state", "pooler_output"])
    with torch.no_grad():
        if exporter == "legacy":
            axes = {"pixel_values": {0: "batch"}, "last_hidden_state": {0: "batch"}, "pooler_output": {0: "batch"}}
            torch.onnx.export(model, (pixels,), str(path), dynamo=False, opset_version=17, dynamic_axes=axes, **names)
        else:
            shapes = {"pixel_values": {0: torch.export.Dim("batch", min=1, max=64)}}
            torch.onnx.export(model, (pixels,), str(path), dynamo=True, dynamic_shapes=shapes, external_data=False, **names)
    return path


def export(variant: str, out_dir: Path, size: Size = "bench") -> Path:
    """Export one variant (a text one such as "legacy-eager" or a vision one such as "vit-dynamo") into ``out_dir``."""
    if variant in TEXT_VARIANTS:
        return export_text(variant, out_dir, size)
    if variant in VISION_VARIANTS:
        return export_vision(variant, out_dir, size)
    raise ValueError(f"unknown variant '{variant}' (choose from {', '.join(VARIANTS)})")
