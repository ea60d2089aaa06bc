"""``onnxopt passes`` (every pass, its options, the presets; also ``optimize --list-passes``) and ``onnxopt inspect``."""

from __future__ import annotations

import json

import click

from onnxopt.cli.common import _load_checked, _setup_logging, main, run_cli


def _print_passes() -> None:
    from onnxopt.registry import PRESETS, all_passes

    out = []
    for name, cls in all_passes().items():
        out.append(f"{name}\n    {cls.summary()}")
        for opt, typ, default, text in cls.Options.describe():
            out.append(f"    - {opt}: {typ} = {default}" + (f"  ({text})" if text else ""))
        if cls.requires:
            out.append(f"    requires: {', '.join(sorted(r.value for r in cls.requires))}")
    out.append("\npresets:")
    for name, items in PRESETS.items():
        flat = [" -> ".join(["(" + ", ".join(i) + ")*" if isinstance(i, list) else i for i in items])]
        out.append(f"  {name}: {flat[0]}")
    click.echo("\n".join(out))


@main.command("passes")
def passes_command() -> None:
    """List every pass with its options and every preset."""
    run_cli(_print_passes, False)


def _list_passes_callback(ctx: click.Context, _param, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        _print_passes()
        ctx.exit(0)


@main.command("inspect")
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print statistics as JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def inspect_command(model_path, as_json, debug) -> None:
    """Print a model's inputs, outputs, opsets and statistics (nodes, parameters, FLOPs, ops)."""
    _setup_logging(0, False)

    def work() -> None:
        from onnxopt.analysis import analyze
        from onnxopt.report import human_bytes, human_count
        from onnxopt.shapes import infer_types

        model = _load_checked(model_path)
        stats = analyze(model, infer_types(model))
        info = {
            "ir_version": model.ir_version,
            "opsets": {imp.domain or "ai.onnx": imp.version for imp in model.opset_import},
            "producer": f"{model.producer_name} {model.producer_version}".strip(),
            "inputs": [_describe_value(v) for v in _real_inputs(model)],
            "outputs": [_describe_value(v) for v in model.graph.output],
            "stats": stats.to_dict(),
        }
        if as_json:
            click.echo(json.dumps(info, indent=2, sort_keys=True))
            return
        click.echo(f"{model_path}: IR {info['ir_version']}, opsets {info['opsets']}, producer '{info['producer']}'")
        for kind in ("inputs", "outputs"):
            for v in info[kind]:
                click.echo(f"  {kind[:-1]} {v['name']}: {v['type']}")
        click.echo(
            f"  nodes {stats.nodes}, initializers {stats.initializers}, parameters {human_count(stats.parameters)}, "
            f"size {human_bytes(stats.bytes)}, FLOPs {human_count(stats.flops)}"
            + (f" ({stats.flops_unknown} nodes with unknown shapes)" if stats.flops_unknown else "")
        )
        click.echo("  ops: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.op_types.items(), key=lambda kv: (-kv[1], kv[0]))))

    run_cli(work, debug)


def _real_inputs(model):
    inits = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


def _describe_value(value) -> dict:
    from onnx import helper

    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return {"name": value.name, "type": kind or "unknown"}
    tensor = value.type.tensor_type
    try:
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    except (KeyError, ValueError, TypeError):
        dtype = str(tensor.elem_type)
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim] if tensor.HasField("shape") else "?"
    return {"name": value.name, "type": f"{dtype}{dims}"}
