"""Pre-flight: what TensorRT's ONNX parser will reject, and which pass fixes it.

:func:`check_model` looks at the ONNX graph for features the parser is known to reject
(custom-domain ops, asymmetric Q/DQ, non-tensor inputs); :func:`parse_network` runs the
back end's parser and turns every parser error into a :class:`ParserIssue` with the node's
name, op type and the parser's message. :func:`preflight` does both without building.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from onnx import ModelProto, numpy_helper

from onnxopt.engine.backends import Backend, load_backend, make_logger, quiet_stdout
from onnxopt.errors import OnnxoptError, one_line

_STANDARD_DOMAINS = ("", "ai.onnx")
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_CONTRIB_HINT = "rerun onnxopt with --target trt (com.microsoft contrib ops run only in onnxruntime)"
_QDQ_HINT = "requantize symmetrically for TensorRT: --passes qdq:target=trt (zero points 0, int8)"


@dataclass
class Finding:
    """A graph feature the parser is known to reject (``error``) or to change (``warning``)."""

    level: str
    node: str
    op_type: str
    message: str
    suggestion: str = ""

    def line(self) -> str:
        """``node 'n' (Op): message; fix: suggestion``."""
        text = f"node '{self.node}' ({self.op_type}): {self.message}" if self.node else self.message
        return text + (f"; fix: {self.suggestion}" if self.suggestion else "")


@dataclass
class ParserIssue:
    """One error of the ONNX parser."""

    node_index: int
    node: str
    op_type: str
    code: str
    message: str
    suggestion: str = ""

    def line(self) -> str:
        """``node 'n' (Op): message [CODE]; fix: suggestion``."""
        where = f"node '{self.node}' ({self.op_type})" if self.node or self.op_type else "model"
        return f"{where}: {self.message} [{self.code}]" + (f"; fix: {self.suggestion}" if self.suggestion else "")


@dataclass
class PreflightReport:
    """What the static checks and the parser said about a model."""

    backend: str
    findings: list[Finding] = field(default_factory=list)
    parser_errors: list[ParserIssue] = field(default_factory=list)
    parsed: bool = False

    @property
    def ok(self) -> bool:
        """The parser accepted the model."""
        return self.parsed and not self.parser_errors

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "backend": self.backend,
            "ok": self.ok,
            "findings": [asdict(f) for f in self.findings],
            "parser_errors": [asdict(e) for e in self.parser_errors],
        }


class PreflightError(OnnxoptError):
    """The ONNX parser rejected the model; the message lists every error with its node."""

    def __init__(self, report: PreflightReport) -> None:
        self.report = report
        errors = report.parser_errors
        noun = "error" if len(errors) == 1 else "errors"
        listing = "; ".join(f"({i}) {e.line()}" for i, e in enumerate(errors, 1)) or "the parser gave no reason"
        super().__init__(f"the ONNX parser of {report.backend} rejected the model with {len(errors)} {noun}: {listing}")


def _zero_point(model: ModelProto, name: str, inits: dict[str, Any]) -> np.ndarray | None:
    tensor = inits.get(name)
    return None if tensor is None else numpy_helper.to_array(tensor)


def check_model(model: ModelProto) -> list[Finding]:
    """Graph features TensorRT's parser rejects or changes, each with the pass or option that fixes it."""
    from onnxopt.graph import iter_scopes

    findings: list[Finding] = []
    inits = {t.name: t for scope in iter_scopes(model.graph) for t in scope.graph.initializer}
    for scope in iter_scopes(model.graph):
        for node in scope.graph.node:
            op = node.op_type if node.domain in _STANDARD_DOMAINS else f"{node.domain}::{node.op_type}"
            if node.domain == "com.microsoft":
                findings.append(Finding("error", node.name, op, "onnxruntime contrib op, not an ONNX operator", _CONTRIB_HINT))
            elif node.domain not in _STANDARD_DOMAINS:
                findings.append(
                    Finding(
                        "error",
                        node.name,
                        op,
                        f"custom-domain op '{node.domain}'",
                        "register a TensorRT plugin of that name, or export it as ONNX ops",
                    )
                )
            elif node.op_type in _QDQ and len(node.input) > 2 and node.input[2]:
                zp = _zero_point(model, node.input[2], inits)
                if zp is None:
                    continue
                if zp.dtype == np.uint8:
                    findings.append(Finding("error", node.name, op, "uint8 Q/DQ (TensorRT takes int8 or fp8 only)", _QDQ_HINT))
                elif zp.size and np.any(zp.astype(np.int64) != 0):
                    findings.append(Finding("error", node.name, op, "asymmetric Q/DQ: non-zero zero point", _QDQ_HINT))
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name in inits:
            continue
        kind = value.type.WhichOneof("value")
        if kind != "tensor_type":
            findings.append(
                Finding("error", "", "", f"graph value '{value.name}' is a {kind or 'untyped'} value; TensorRT takes tensors only")
            )
        elif value.type.tensor_type.elem_type == 11:  # DOUBLE
            findings.append(
                Finding("warning", "", "", f"graph value '{value.name}' is float64; TensorRT has no float64 and casts it to float32")
            )
        elif value.type.tensor_type.elem_type == 8:  # STRING
            findings.append(Finding("error", "", "", f"graph value '{value.name}' holds strings; TensorRT takes numeric tensors only"))
    return findings


def _op_types(model: ModelProto) -> dict[str, str]:
    from onnxopt.graph import iter_scopes

    ops = {}
    for scope in iter_scopes(model.graph):
        for node in scope.graph.node:
            if node.name:
                ops[node.name] = node.op_type if node.domain in _STANDARD_DOMAINS else f"{node.domain}::{node.op_type}"
    return ops


def _message(desc: str, op_type: str) -> str:
    text = one_line(desc, None)
    if text.startswith("Assertion failed: "):
        text = text[len("Assertion failed: ") :]
    if text in ("", "false", "0"):
        return f"TensorRT has no importer for {op_type or 'this node'} in this configuration"
    if "Plugin not found" in text:
        return f"no importer and no plugin named '{op_type.split('::')[-1]}'"
    return text[:300]


def _issues(parser: Any, model: ModelProto, findings: list[Finding]) -> list[ParserIssue]:
    ops = _op_types(model)
    by_node = {f.node: f for f in findings if f.node}
    issues = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        name = str(error.node_name() or "")
        op = ops.get(name) or str(error.node_operator() or "")
        code = str(error.code()).rsplit(".", 1)[-1]
        finding = by_node.get(name)
        suggestion = finding.suggestion if finding else ""
        if not suggestion and op.split("::")[-1] in _QDQ and "zero point" in str(error.desc()).lower():
            suggestion = _QDQ_HINT
        issues.append(ParserIssue(int(error.node()), name, op, code, _message(error.desc(), op), suggestion))
    return issues


def parse_network(backend: Backend, builder: Any, network: Any, logger: Any, model: ModelProto, report: PreflightReport) -> Any:
    """Parse ``model`` into ``network``; returns the parser (keep it alive until the build ends: it owns the weights)."""
    trt = backend.module
    parser = trt.OnnxParser(network, logger)
    size = model.ByteSize()
    with quiet_stdout():
        if size < 2**31 - 1:
            ok = parser.parse(model.SerializeToString())
        else:  # over protobuf's limit: hand the parser a file with external data
            from onnxopt.io import save

            with tempfile.TemporaryDirectory(prefix="onnxopt-build-") as tmp:
                path = Path(tmp) / "model.onnx"
                save(model, path, external_data=True)
                ok = parser.parse_from_file(os.fspath(path))
    report.parsed = True
    report.parser_errors = _issues(parser, model, report.findings)
    if not ok and not report.parser_errors:
        errors = getattr(logger, "errors", [])
        report.parser_errors = [ParserIssue(-1, "", "", "UNKNOWN", "; ".join(errors[:3]) or "the parser failed without a message")]
    return parser


def preflight(model: ModelProto | str | os.PathLike[str], *, backend: str | Backend = "auto") -> PreflightReport:
    """Static checks plus a parse with the back end's ONNX parser; nothing is built."""
    from onnxopt.io import load

    be = backend if isinstance(backend, Backend) else load_backend(backend)
    proto = model if isinstance(model, ModelProto) else load(model)
    report = PreflightReport(be.label, check_model(proto))
    logger = make_logger(be)
    builder = be.module.Builder(logger)
    network = builder.create_network(be.network_flags())
    parse_network(be, builder, network, logger, proto, report)
    return report
