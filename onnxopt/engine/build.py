"""Build a TensorRT / TensorRT-RTX engine from an ONNX model: ``build_engine(model) -> BuildResult``.

Networks are always strongly typed: the precision each layer runs in is the one the graph
writes (fp16 weights and Casts, Q/DQ pairs), so FP16/INT8 come from onnxopt's passes, not
from builder flags. Dynamic inputs need an optimization profile (``shapes``). The runtime is
never touched without a CUDA device: the engine inspector runs only when one answers.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from onnx import ModelProto, numpy_helper

from onnxopt.engine.backends import Backend, EngineBuildError, cuda_device_status, load_backend, make_logger, quiet_stdout
from onnxopt.engine.preflight import PreflightError, PreflightReport, check_model, parse_network
from onnxopt.engine.report import BuildReport, TensorInfo
from onnxopt.errors import OnnxoptError, OptionError

SPARSITY_MODES = ("auto", "on", "off")
HARDWARE_COMPAT = {"none": "NONE", "ampere+": "AMPERE_PLUS", "same-cc": "SAME_COMPUTE_CAPABILITY"}
_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "UINT8": "uint8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "FP8": "float8e4m3",
    "INT4": "int4",
    "FP4": "float4e2m1",
    "E8M0": "float8e8m0",
}
_COMPUTE_LAYERS = ("CONVOLUTION", "DECONVOLUTION", "MATRIX_MULTIPLY", "ATTENTION")


class ShapeProfileError(OptionError):
    """An optimization profile is missing, names no input, or does not fit the input."""


@dataclass(frozen=True)
class ShapeProfile:
    """Min / opt / max shapes of one input."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_dict(self) -> dict[str, list[int]]:
        """``{"min": [...], "opt": [...], "max": [...]}``."""
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def _dims(text: str, item: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise ShapeProfileError(f"bad --shapes '{item}': dimensions must be integers joined by 'x'") from None
    if any(d < 1 for d in dims):
        raise ShapeProfileError(f"bad --shapes '{item}': dimensions must be positive")
    return dims


def parse_shapes(items: Sequence[str]) -> dict[str, ShapeProfile]:
    """Parse ``name:MIN/OPT/MAX`` (each ``DxDxD``) or ``name:SHAPE`` (min = opt = max); the name may contain ':'."""
    profiles: dict[str, ShapeProfile] = {}
    for item in items:
        name, sep, spec = item.rpartition(":")
        if not sep or not name or not spec:
            raise ShapeProfileError(f"bad --shapes '{item}': expected NAME:MIN/OPT/MAX, e.g. x:1x3x224x224/4x3x224x224/8x3x224x224")
        parts = spec.split("/")
        if len(parts) not in (1, 3):
            raise ShapeProfileError(f"bad --shapes '{item}': give one shape or three (MIN/OPT/MAX)")
        shapes = [_dims(p, item) for p in parts]
        if len(shapes) == 1:
            shapes *= 3
        profiles[name] = _profile(name, *shapes, item=item)
    return profiles


def _profile(name: str, lo: Sequence[int], opt: Sequence[int], hi: Sequence[int], *, item: str = "") -> ShapeProfile:
    label = item or name
    lo, opt, hi = tuple(int(d) for d in lo), tuple(int(d) for d in opt), tuple(int(d) for d in hi)
    if not len(lo) == len(opt) == len(hi):
        raise ShapeProfileError(f"bad shapes for '{label}': MIN, OPT and MAX must have the same rank")
    if any(not (a <= b <= c) for a, b, c in zip(lo, opt, hi)):
        raise ShapeProfileError(f"bad shapes for '{label}': need MIN <= OPT <= MAX in every dimension")
    return ShapeProfile(name, lo, opt, hi)


ShapesArg = Sequence[str] | Mapping[str, "ShapeProfile | Sequence[int] | Sequence[Sequence[int]]"] | None


def coerce_shapes(shapes: ShapesArg) -> dict[str, ShapeProfile]:
    """Profiles from ``--shapes`` strings, or a mapping of name -> ShapeProfile, one shape, or (min, opt, max)."""
    if not shapes:
        return {}
    if isinstance(shapes, str):
        return parse_shapes([shapes])
    if not isinstance(shapes, Mapping):
        return parse_shapes(list(shapes))
    out = {}
    for name, value in shapes.items():
        if isinstance(value, ShapeProfile):
            out[name] = value
        elif len(value) == 3 and all(isinstance(v, (list, tuple)) for v in value):
            out[name] = _profile(name, *value)  # type: ignore[misc]
        else:
            out[name] = _profile(name, value, value, value)  # type: ignore[arg-type]
    return out


def parse_workspace(value: int | str | None) -> int | None:
    """Bytes from ``268435456``, ``256M``, ``2G`` or ``512K`` (binary units)."""
    if value is None or value == "":
        return None
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)i?b?\s*", str(value).lower())
        if not match:
            raise OptionError(f"bad workspace '{value}': give bytes or a size such as 512M or 2G")
        size = int(match.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[match.group(2)]
    if size <= 0:
        raise OptionError("the workspace limit must be positive")
    return size


def _sparse_axis(node: Any, index: int) -> int | None:
    """The reduction axis of a Conv/ConvTranspose/MatMul/Gemm weight input, along which 2:4 groups run."""
    if index != 1:
        return None
    if node.op_type == "Conv":
        return 1
    if node.op_type == "ConvTranspose":
        return 0
    if node.op_type == "MatMul":
        return -2
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 1 if trans_b else 0
    return None


def is_2to4(weight: np.ndarray, axis: int) -> bool:
    """Every group of 4 consecutive values along ``axis`` has at most 2 non-zeros (and the axis splits into groups of 4)."""
    if weight.ndim < 2 or weight.shape[axis] % 4 or weight.size == 0:
        return False
    moved = np.moveaxis(weight, axis, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // 4, 4)
    return bool(np.all(np.count_nonzero(groups, axis=-1) <= 2))


def sparse_weights(model: ModelProto) -> tuple[list[str], int]:
    """Names of Conv/MatMul/Gemm weights that are 2:4 sparse (through a DequantizeLinear too), and how many were eligible.

    Weights are initializers or Constant nodes' ``value`` tensors (exporters such as paddle2onnx use the latter).
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                inits.setdefault(node.output[0], value)
    producers = {o: n for n in graph.node for o in n.output}
    sparse, eligible = [], 0
    for node in graph.node:
        for index, name in enumerate(node.input):
            axis = _sparse_axis(node, index)
            if axis is None:
                continue
            source = producers.get(name)
            if source is not None and source.op_type == "DequantizeLinear":
                name = source.input[0]
            if name not in inits:
                continue
            weight = numpy_helper.to_array(inits[name])
            if weight.ndim < 2 or weight.shape[axis] % 4:
                continue
            eligible += 1
            if is_2to4(weight, axis):
                sparse.append(name)
    return sparse, eligible


@dataclass
class BuildResult:
    """A serialized engine (``plan``) and the report of its build."""

    plan: bytes
    report: BuildReport

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan atomically (temporary file, then rename)."""
        from onnxopt.io import _write_atomic

        target = Path(path)
        _write_atomic(target, [self.plan])
        return target


def _dtype(value: Any) -> str:
    name = str(value).rsplit(".", 1)[-1]
    return _DTYPES.get(name, name.lower())


def _dim_names(model: ModelProto) -> dict[str, list[str]]:
    names = {}
    for value in model.graph.input:
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            names[value.name] = [d.dim_param if d.HasField("dim_param") else "" for d in value.type.tensor_type.shape.dim]
    return names


def untie_dims(model: ModelProto, profiles: dict[str, ShapeProfile]) -> tuple[ModelProto, list[str]]:
    """Rename dim_params that several input dims share (``?`` in many exports) when the profiles give them different sizes.

    TensorRT's parser treats equal names as one dimension, so ``x[1,3,?,?]`` with a 48x192 profile
    would not build. The given model is not modified; a copy is returned when anything is renamed.
    """
    sizes: dict[str, set[tuple[int, int, int]]] = {}
    for value in model.graph.input:
        prof = profiles.get(value.name)
        if prof is None or not value.type.HasField("tensor_type"):
            continue
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_param") and i < len(prof.min):
                sizes.setdefault(dim.dim_param, set()).add((prof.min[i], prof.opt[i], prof.max[i]))
    conflicting = {name for name, seen in sizes.items() if len(seen) > 1}
    if not conflicting:
        return model, []
    copy = ModelProto()
    copy.CopyFrom(model)
    for value in copy.graph.input:
        if not value.type.HasField("tensor_type"):
            continue
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_param") and dim.dim_param in conflicting:
                dim.dim_param = f"{value.name}_dim{i}"
    for value in copy.graph.value_info:  # intermediate shapes that reuse the names no longer hold
        if value.type.HasField("tensor_type"):
            for dim in value.type.tensor_type.shape.dim:
                if dim.HasField("dim_param") and dim.dim_param in conflicting:
                    dim.ClearField("dim_param")
    names = ", ".join(f"'{n}'" for n in sorted(conflicting))
    return copy, [f"input dims named {names} get different sizes from the profiles; they were treated as independent dims"]


def _apply_profiles(
    backend: Backend, builder: Any, network: Any, config: Any, model: ModelProto, profiles: dict[str, ShapeProfile], hint: str
) -> dict:
    """Check ``profiles`` against the network's inputs and add them; returns name -> profile used."""
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    names = {t.name for t in inputs}
    unknown = sorted(set(profiles) - names)
    if unknown:
        raise ShapeProfileError(f"shapes given for '{unknown[0]}', which is not an engine input (inputs: {', '.join(sorted(names))})")
    dim_names = _dim_names(model)
    missing, used = [], {}
    profile = builder.create_optimization_profile()
    for tensor in inputs:
        shape = tuple(tensor.shape)
        dynamic = [i for i, d in enumerate(shape) if d < 0]
        given = profiles.get(tensor.name)
        if given is None:
            if dynamic:
                labels = dim_names.get(tensor.name, [])
                dims = ", ".join(f"{i}" + (f" ({labels[i]})" if i < len(labels) and labels[i] else "") for i in dynamic)
                missing.append(f"'{tensor.name}' {list(shape)} dims {dims}")
            continue
        if len(given.min) != len(shape):
            raise ShapeProfileError(f"shapes for '{tensor.name}' have rank {len(given.min)}, the input has rank {len(shape)} {list(shape)}")
        for i, d in enumerate(shape):
            if d >= 0 and not (given.min[i] == given.opt[i] == given.max[i] == d):
                raise ShapeProfileError(
                    f"shapes for '{tensor.name}' set dim {i} to {given.min[i]}/{given.opt[i]}/{given.max[i]}, but it is fixed at {d}"
                )
        if getattr(tensor, "is_shape_tensor", False):
            raise ShapeProfileError(f"input '{tensor.name}' is a shape tensor; profiles for shape-tensor values are not supported yet")
        if dynamic:
            profile.set_shape(tensor.name, given.min, given.opt, given.max)
        used[tensor.name] = given
    if missing:
        raise ShapeProfileError(f"dynamic inputs need an optimization profile ({hint} NAME:MIN/OPT/MAX): " + "; ".join(missing))
    if any(any(d < 0 for d in t.shape) for t in inputs):
        config.add_optimization_profile(profile)
    return used


def _network_summary(backend: Backend, network: Any) -> dict[str, Any]:
    """Layer counts from the network definition (no GPU needed): compute layers by input dtype (Q/DQ-fed ones by their
    quantized dtype), Q/DQ layers. The engine's own per-layer precision needs the inspector (GPU)."""
    compute: Counter[str] = Counter()
    qdq = 0
    dequantized: dict[str, str] = {}  # DequantizeLinear output -> the quantized dtype it came from
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind = str(layer.type).rsplit(".", 1)[-1]
        if kind in ("QUANTIZE", "DEQUANTIZE"):
            qdq += 1
            if kind == "DEQUANTIZE" and layer.num_inputs and layer.get_input(0) is not None:
                dequantized[layer.get_output(0).name] = _dtype(layer.get_input(0).dtype)
        elif kind in _COMPUTE_LAYERS and layer.num_inputs:
            tensor = layer.get_input(0)
            if tensor is not None:
                source = dequantized.get(tensor.name)
                compute[f"{source} (Q/DQ)" if source else _dtype(tensor.dtype)] += 1
    return {"layers": int(network.num_layers), "compute_layers": dict(sorted(compute.items())), "qdq_layers": qdq}


def _timing_cache(backend: Backend, config: Any, path: str | None) -> tuple[Any, dict[str, Any]]:
    """Load ``path`` into the config's timing cache (full TensorRT); TensorRT-RTX has none and is told so."""
    if not path:
        return None, {}
    if not backend.supports_timing_cache:  # setting it would make the CPU-only build query for a GPU
        return None, {
            "path": str(path),
            "used": False,
            "summary": "not used: TensorRT-RTX has no build-time timing cache (its API is a no-op that queries for a GPU); "
            "it compiles kernels at run time and keeps them in its runtime cache",
        }
    data = b""
    if os.path.isfile(path):
        data = Path(path).read_bytes()
    cache = config.create_timing_cache(data)
    if cache is None:
        raise OnnxoptError(f"timing cache '{path}' is not a timing cache of {backend.label}")
    config.set_timing_cache(cache, False)
    entries = _cache_entries(cache)
    return cache, {"path": str(path), "used": True, "loaded_bytes": len(data), "entries_loaded": entries}


def _cache_entries(cache: Any) -> int | None:
    try:
        return len(cache.queryKeys())
    except Exception:  # noqa: BLE001  (older bindings lack queryKeys)
        return None


def _save_timing_cache(backend: Backend, config: Any, cache: Any, info: dict[str, Any]) -> None:
    """Merge what another build wrote meanwhile, then save atomically."""
    from onnxopt.io import _write_atomic

    path = Path(info["path"])
    if path.is_file() and path.stat().st_size != info["loaded_bytes"]:
        other = config.create_timing_cache(path.read_bytes())
        if other is not None:
            cache.combine(other, False)
            info["merged"] = True
    blob = bytes(cache.serialize())
    _write_atomic(path, [blob])
    info["saved_bytes"] = len(blob)
    info["entries_saved"] = _cache_entries(cache)
    loaded, saved = info.get("entries_loaded"), info.get("entries_saved")
    hits = f"{loaded} entries loaded" if loaded is not None else f"{info['loaded_bytes']} bytes loaded"
    added = f", {saved - loaded} added" if loaded is not None and saved is not None else ""
    info["summary"] = f"{path}: {hits}{added}, {len(blob)} bytes saved"


def _inspect(backend: Backend, plan: bytes, logger: Any) -> dict[str, Any]:
    """Per-layer precision from the engine inspector (GPU only: the caller has checked for a CUDA device)."""
    import json

    trt = backend.module
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise EngineBuildError("the runtime could not deserialize the engine it just built: " + "; ".join(logger.errors[-3:]))
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    layers = info.get("Layers", [])
    counts: Counter[str] = Counter()
    for layer in layers:
        if not isinstance(layer, dict):
            continue
        formats = [str(x.get("Format/Datatype", "")) for x in layer.get("Outputs", []) if isinstance(x, dict)]
        text = " ".join(formats).lower()
        precision = (
            "int8"
            if "int8" in text
            else "fp16"
            if ("half" in text or "fp16" in text)
            else "fp32"
            if ("float" in text or "fp32" in text)
            else "other"
        )
        counts[precision] += 1
    total = sum(counts.values()) or 1
    return {"layers": len(layers), "by_precision": dict(counts), "share": {k: v / total for k, v in counts.items()}}


def build_engine(
    model_or_path: ModelProto | str | os.PathLike[str],
    *,
    backend: str | Backend = "auto",
    workspace: int | str | None = None,
    opt_level: int | None = None,
    shapes: ShapesArg = None,
    timing_cache: str | os.PathLike[str] | None = None,
    sparsity: str = "auto",
    hardware_compat: str = "none",
    version_compatible: bool = False,
    inspect: bool = True,
    shapes_hint: str = "--shapes",
) -> BuildResult:
    """Parse (pre-flight), configure and build a strongly typed engine; returns the plan and its report.

    ``shapes`` gives optimization profiles (``["x:1x3x32x32/4x3x64x64/8x3x128x128"]`` or a mapping),
    required for every dynamic input. ``workspace`` is bytes or ``"512M"``; ``opt_level`` is the
    builder optimization level 0-5. ``timing_cache`` is a file loaded, merged and saved back (full
    TensorRT; TensorRT-RTX has none and says so). ``sparsity`` ``auto`` sets the sparse-weights flag
    when Conv/MatMul/Gemm weights are 2:4 sparse. ``hardware_compat`` (``none``, ``ampere+``,
    ``same-cc``) and ``version_compatible`` are full-TensorRT options. With a CUDA device,
    ``inspect`` adds per-layer precision from the engine inspector; without one it is skipped
    (the runtime is never called) and the report says why.
    """
    from onnxopt.io import load

    if sparsity not in SPARSITY_MODES:
        raise OptionError(f"unknown sparsity '{sparsity}' (choose from {', '.join(SPARSITY_MODES)})")
    if hardware_compat not in HARDWARE_COMPAT:
        raise OptionError(f"unknown hardware compatibility '{hardware_compat}' (choose from {', '.join(HARDWARE_COMPAT)})")
    if opt_level is not None and not 0 <= int(opt_level) <= 5:
        raise OptionError(f"the builder optimization level must be 0-5, not {opt_level}")
    workspace_bytes = parse_workspace(workspace)
    profiles = coerce_shapes(shapes)
    be = backend if isinstance(backend, Backend) else load_backend(backend)
    if not be.supports_hardware_compat and (hardware_compat != "none" or version_compatible):
        raise OptionError(f"{be.label} builds no hardware- or version-compatible engines; drop those options or use --backend tensorrt")
    model = model_or_path if isinstance(model_or_path, ModelProto) else load(model_or_path)
    label = "" if isinstance(model_or_path, ModelProto) else os.fspath(model_or_path)
    model, untie_notes = untie_dims(model, profiles)
    trt = be.module

    pre = PreflightReport(be.label, check_model(model))
    logger = make_logger(be)
    builder = trt.Builder(logger)
    network = builder.create_network(be.network_flags())
    started = time.perf_counter()
    parser = parse_network(be, builder, network, logger, model, pre)
    parse_seconds = time.perf_counter() - started
    if not pre.ok:
        raise PreflightError(pre)
    strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    strongly_typed = True if strong is None else bool(network.get_flag(strong))
    if not strongly_typed:
        raise EngineBuildError(f"{be.label} did not create a strongly typed network; onnxopt builds only strongly typed engines")

    config = builder.create_builder_config()
    used = _apply_profiles(be, builder, network, config, model, profiles, shapes_hint)
    flags: list[str] = []
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if opt_level is not None:
        config.builder_optimization_level = int(opt_level)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    sparse, eligible = sparse_weights(model) if sparsity != "off" else ([], 0)
    enable_sparse = sparsity == "on" or (sparsity == "auto" and bool(sparse))
    if enable_sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
        flags.append("SPARSE_WEIGHTS")
    if hardware_compat != "none":
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, HARDWARE_COMPAT[hardware_compat])
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        flags.append("VERSION_COMPATIBLE")
    cache, cache_info = _timing_cache(be, config, os.fspath(timing_cache) if timing_cache else None)

    started = time.perf_counter()
    with quiet_stdout():
        serialized = builder.build_serialized_network(network, config)
    build_seconds = time.perf_counter() - started
    if serialized is None:
        reason = "; ".join(logger.errors[-3:]) or "no message from the builder"
        raise EngineBuildError(f"{be.label} failed to build the engine: {reason}")
    plan = bytes(serialized)
    del parser  # the network's weights may be released now
    if cache is not None:
        _save_timing_cache(be, config, cache, cache_info)
        cache_info["build_seconds"] = round(build_seconds, 4)

    report = BuildReport(
        backend=be.name,
        backend_version=be.version,
        parser_version=be.parser_version,
        model=label,
        strongly_typed=strongly_typed,
        parse_seconds=round(parse_seconds, 4),
        build_seconds=round(build_seconds, 4),
        engine_bytes=len(plan),
        options={
            "workspace": workspace_bytes,
            "opt_level": opt_level,
            "hardware_compat": hardware_compat,
            "version_compatible": version_compatible,
            "sparsity": sparsity,
        },
        flags=flags,
        network=_network_summary(be, network),
        timing_cache=cache_info,
        preflight=pre.to_dict(),
    )
    for i in range(network.num_inputs):
        t = network.get_input(i)
        prof = used.get(t.name)
        report.inputs.append(TensorInfo(t.name, _dtype(t.dtype), list(t.shape), prof.to_dict() if prof else None))
    for i in range(network.num_outputs):
        t = network.get_output(i)
        report.outputs.append(TensorInfo(t.name, _dtype(t.dtype), list(t.shape)))
    if sparsity != "off":
        state = "flag on" if enable_sparse else "flag off"
        report.sparsity = {
            "mode": sparsity,
            "enabled": enable_sparse,
            "sparse_weights": sparse,
            "eligible_weights": eligible,
            "summary": f"{sparsity}: {len(sparse)} of {eligible} eligible weights are 2:4 sparse, {state}",
        }
    report.warnings = untie_notes + [f.line() for f in pre.findings if f.level == "warning"] + list(dict.fromkeys(logger.warnings))[:20]
    if cache_info and not cache_info.get("used"):
        report.warnings.append(f"timing cache {cache_info['path']} {cache_info['summary']}")
    _gpu_section(be, plan, logger, report, inspect)
    return BuildResult(plan, report)


def _gpu_section(backend: Backend, plan: bytes, logger: Any, report: BuildReport, inspect: bool) -> None:
    """Run the engine inspector only when a CUDA device answers; otherwise record why it was skipped."""
    status = cuda_device_status()
    report.gpu = {"devices": status.devices}
    if not inspect:
        report.gpu["skipped"] = "engine inspector not requested"
        return
    if not status.available:
        report.gpu["skipped"] = (
            f"engine inspector needs the TensorRT runtime, which is never called without a CUDA device ({status.reason})"
        )
        return
    try:
        report.engine_layers = _inspect(backend, plan, logger)
    except OnnxoptError as exc:
        report.gpu["skipped"] = f"engine inspector failed: {exc}"
