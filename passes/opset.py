"""Opset upgrade with onnx's version converter, checked numerically."""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import ModelProto
from onnx.version_converter import convert_version

from onnxopt.errors import OnnxoptError, OptionError, one_line
from onnxopt.graph import opset_version
from onnxopt.io import serialized_size
from onnxopt.passbase import Pass, PassContext, PassOptions, PassResult, option
from onnxopt.registry import register_pass


def convert_opset(model: ModelProto, version: int) -> ModelProto:
    """``model`` converted to opset ``version`` by onnx's version converter and checked; the model's own value_info
    is kept as it was (the converter adds the shapes it inferred, partly with made-up dim names, to the file)."""
    converted = convert_version(model, version)
    del converted.graph.value_info[:]
    converted.graph.value_info.extend(model.graph.value_info)
    onnx.checker.check_model(converted)
    return converted


@dataclass
class UpgradeOpsetOptions(PassOptions):
    """Options of :class:`UpgradeOpset`."""

    version: int = option(0, "the ai.onnx opset to upgrade to (required)")
    verify: bool = option(True, "compare outputs before and after in onnxruntime; refuse a converted model that differs")
    strict: bool = option(True, "fail the run when the model cannot be upgraded (false: keep its opset and note why)")

    def validate(self) -> None:
        """The target must be a real opset this onnx knows."""
        latest = onnx.defs.onnx_opset_version()
        if not 1 <= self.version <= latest:
            raise OptionError(f"option 'version' of pass 'upgrade_opset' must be in 1..{latest} (e.g. upgrade_opset:version=17)")


@register_pass
class UpgradeOpset(Pass):
    """Upgrade the model's ai.onnx opset with onnx's version converter, verified in onnxruntime.

    Newer opsets unlock newer standard ops for later passes (LayerNormalization at 17,
    Gelu at 20). Pre: a valid model under 2 GB. Post: the model imports ai.onnx opset
    ``version`` and, with ``verify``, computes the same outputs on generated inputs (dynamic
    dims set to 1). A model already at or above ``version`` is left alone (never downgraded).
    Without ``strict``, a model the converter cannot take (or that then differs) keeps its opset
    and the run goes on with a note saying why.
    """

    name = "upgrade_opset"
    Options = UpgradeOpsetOptions
    preserves_types = False

    def run(self, model: ModelProto, ctx: PassContext) -> PassResult:
        """Convert, verify, then replace the model's contents (or note why not, without ``strict``)."""
        options: UpgradeOpsetOptions = self.options  # type: ignore[assignment]
        try:
            return self._upgrade(model, options)
        except OnnxoptError as exc:
            if options.strict:
                raise
            return PassResult(warnings=[f"{exc}; the model keeps opset {opset_version(model) or 1}"])

    def _upgrade(self, model: ModelProto, options: UpgradeOpsetOptions) -> PassResult:
        result = PassResult()
        current = opset_version(model) or 1
        if current >= options.version:
            return result
        if serialized_size(model) is None:
            raise OnnxoptError("upgrade_opset: onnx's version converter cannot handle models over 2 GB")
        try:
            converted = convert_opset(model, options.version)
        except Exception as exc:  # the converter raises many types
            message = one_line(exc, 300)
            raise OnnxoptError(
                f"upgrade_opset: onnx's version converter cannot take this model from opset {current} to {options.version}: {message}"
            ) from exc
        if options.verify:
            note = _check_same_outputs(model, converted, current, options.version)
            if note:
                result.warnings.append(note)
        model.CopyFrom(converted)
        result.count(f"opset_{current}_to_{options.version}")
        return result


def _check_same_outputs(before: ModelProto, after: ModelProto, old: int, new: int) -> str | None:
    """Raise if the converted model computes other outputs; return a note if it cannot be checked."""
    from onnxopt.verify import compare_outputs, create_session, generate_inputs, run_model

    try:
        feeds, _ = generate_inputs(before)
        session = create_session(before)
    except Exception as exc:  # custom ops, non-tensor inputs: the original cannot be run here
        return f"upgrade_opset: conversion not verified, onnxruntime cannot run the original ({one_line(exc, 200)})"
    comparison = compare_outputs(run_model(before, feeds, session), run_model(after, feeds), "fp32")
    if not comparison.passed:
        bad = comparison.failures()[0]
        raise OnnxoptError(
            f"upgrade_opset: the model converted from opset {old} to {new} computes different outputs ('{bad.name}': {bad.reason})"
        )
    return None
