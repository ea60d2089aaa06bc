"""Matching and weight arithmetic of ``fold_conv_input_affine`` (:mod:`onnxopt.passes.fuse_conv`): per-channel
Mul/Add/Sub/Div by constants *before* an unpadded Conv, folded into its weights and bias.

``Conv(x * s + t) = Conv_{W * s}(x) + sum(W * t)`` holds exactly when no output position reads
padding (the padded zeros would otherwise become ``t``), so the rule takes Convs whose pads are
all zero (1x1 pointwise convolutions, mostly): the scalar "learnable affine" after each
activation of PP-LCNet-style backbones, or a normalisation ``(x - mean) / std`` before the stem
when it has no padding. The weight of input channel ``c`` is scaled by ``s[c]``; each output's
bias grows by its weights times ``t`` summed over the channels and the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import NodeProto

from onnxopt.graph import GraphView, is_standard
from onnxopt.passbase import PassContext
from onnxopt.passes.fuse_conv_rules import affine_step, cast_back, compose_affine, conv_bias, float_constant, int_attr, sole_reader
from onnxopt.passes.noop_rules import NoMatch, constant_tensor, default_opset, get_attr, require


@dataclass
class InputFold:
    """A Conv reading ``source`` directly, with the weight and bias that absorb the affine ``chain`` (in graph order)."""

    conv: NodeProto
    source: str
    weight: np.ndarray
    bias: np.ndarray
    chain: list[NodeProto] = field(default_factory=list)


def _unpadded(conv: NodeProto) -> None:
    """NoMatch unless no output position of ``conv`` reads padding."""
    auto_pad = get_attr(conv, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    require(auto_pad in ("NOTSET", "VALID"), f"auto_pad={auto_pad} pads the input")
    pads = get_attr(conv, "pads", None)
    require(not pads or not any(pads), "the Conv pads its input (the padded zeros would read the shift)")


def _operand_source(node: NodeProto, view: GraphView) -> str:
    """The non-constant operand of a binary step (NoMatch when both or neither are constant)."""
    require(len(node.input) == 2, "not a binary node")
    variable = [name for name in node.input if constant_tensor(view, name) is None]
    require(len(variable) == 1, "the step has no single non-constant operand")
    return variable[0]


def _clip_gated(view: GraphView, name: str) -> bool:
    """Whether ``name`` is written by ``Mul(x, Clip(...))``: the hard-swish Clip form, whose / 6 comes next."""
    producer = view.producer.get(name)
    if producer is None or producer.op_type != "Mul":
        return False
    return any(i in view.producer and view.producer[i].op_type == "Clip" for i in producer.input)


def match_input_affine(conv: NodeProto, view: GraphView, ctx: PassContext) -> InputFold:
    """The run of per-input-channel Mul/Add/Sub/Div feeding ``conv`` (each value read only by the next step), folded."""
    require(default_opset(ctx) >= 7, "Mul/Add before opset 7 have the 'broadcast' attribute")
    require(is_standard(conv) and conv.op_type == "Conv" and len(conv.input) >= 2 and len(conv.output) == 1, "not a standard Conv")
    _unpadded(conv)
    weight = float_constant(view, conv.input[1], "weight")
    require(weight.ndim >= 3, "the weight has rank < 3")
    group = int_attr(conv, "group", 1)
    channels = weight.shape[1] * group
    require(group >= 1 and weight.shape[0] % group == 0, "the weight does not split into the groups")
    chain: list[NodeProto] = []
    steps: list[tuple[str, np.ndarray]] = []
    current = conv.input[0]
    while True:
        producer = view.producer.get(current)
        try:
            require(producer is not None, "no producer")
            require(sole_reader(view, current) is (chain[0] if chain else conv), "the value has other readers")
            source = _operand_source(producer, view)  # type: ignore[arg-type]
            op, vector = affine_step(producer, source, view, weight.ndim, channels, weight.dtype)  # type: ignore[arg-type]
        except NoMatch as exc:
            require(bool(chain), str(exc))
            break
        chain.insert(0, producer)  # type: ignore[arg-type]
        steps.insert(0, (op, vector))
        current = source
    if chain and chain[0].op_type in ("Mul", "Div") and _clip_gated(view, current):
        # x * Clip(x + 3, 0, 6) / 6: the / 6 belongs to the hard-swish fuse_activations (or qdq, on ort-cpu) fuses
        current, chain, steps = chain[0].output[0], chain[1:], steps[1:]
        require(bool(chain), "the only step is the / 6 of a Clip-form hard-swish")
    scale, shift = np.ones(channels), np.zeros(channels)
    for op, vector in steps:
        scale, shift = compose_affine(scale, shift, op, vector)
    new_weight, new_bias = _fold(conv, view, weight, group, scale, shift)
    return InputFold(conv, current, new_weight, new_bias, chain)


def _fold(conv: NodeProto, view: GraphView, weight: np.ndarray, group: int, scale: np.ndarray, shift: np.ndarray):
    """(weight, bias) of ``conv`` reading ``x * scale + shift`` per input channel, computed in float64."""
    out_channels, per_group = weight.shape[0], weight.shape[1]
    w = weight.astype(np.float64)
    # input channel of weight [m, j]: (m // (M / group)) * (C / group) + j
    index = (np.arange(out_channels)[:, None] // (out_channels // group)) * per_group + np.arange(per_group)[None, :]
    expand = (slice(None), slice(None)) + (None,) * (w.ndim - 2)
    new_weight = w * scale[index][expand]
    added = (w * shift[index][expand]).reshape(out_channels, -1).sum(axis=1)
    bias = conv_bias(conv, view, weight, out_channels)
    return cast_back(new_weight, weight, "weight"), cast_back(bias.astype(np.float64) + added, weight, "bias")
