"""Pass registry: built-in passes, third-party passes from entry points, and presets."""

from __future__ import annotations

import logging
from importlib import metadata

from onnxopt.errors import OptionError
from onnxopt.passbase import Pass

log = logging.getLogger("onnxopt")

ENTRY_POINT_GROUP = "onnxopt.passes"

_REGISTRY: dict[str, type[Pass]] = {}
_LOADED = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator that registers a pass under its ``name``."""
    if not cls.name or not cls.name.replace("_", "").isalnum():
        raise ValueError(f"pass class {cls.__name__} needs a name of letters, digits and '_'")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"two passes are named '{cls.name}': {existing.__module__} and {cls.__module__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import onnxopt.passes  # noqa: F401  (registers the built-in passes)

    for entry in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            obj = entry.load()
        except Exception as exc:  # a broken plugin must not break the tool
            log.warning("could not load pass plugin '%s': %s", entry.name, exc)
            continue
        if isinstance(obj, type) and issubclass(obj, Pass):
            register_pass(obj)
        else:
            log.warning("pass plugin '%s' is not a Pass subclass; ignored", entry.name)


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as ``name``; raises :class:`OptionError` if none is."""
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        from difflib import get_close_matches

        hint = get_close_matches(name, list(_REGISTRY) + list(PRESETS), n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise OptionError(f"unknown pass '{name}'{suggestion}; run 'onnxopt passes' for the list") from None


def all_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name, sorted."""
    _load()
    return dict(sorted(_REGISTRY.items()))


# Presets: a name standing for a pipeline. A list inside the list is a fixpoint group,
# run repeatedly until no pass in it changes the model.
CLEANUP_GROUP = [
    "eliminate_noops",
    "fold_constants",
    "fold_shape_values",
    "constant_reshape_shapes",
    "lift_constants",
    "dedupe_initializers",
    "eliminate_common_subexpressions",
    "eliminate_dead_code",
]
# Fusions: each reads the run's target and the model's opset, and leaves alone what they do
# not allow (fuse_contrib does nothing unless the target is ort-*). div_to_mul comes last, so
# the GELU and attention matchers see the exporter's Div first (both take either form).
FUSION_GROUP = [
    "fold_batchnorm",
    "fold_conv_affine",
    "fold_matmul_affine",
    "fuse_pad_into_conv",
    "fuse_layernorm",
    "fuse_activations",
    "fold_conv_input_affine",
    "fuse_softmax",
    "fuse_reduce_mean",
    "fuse_contrib",
    "fuse_attention",
    "fuse_transpose_into_gemm",
    "fuse_matmul_add",
    "merge_layout_chains",
    "div_to_mul",
]
PRESETS: dict[str, list] = {
    "cleanup": [CLEANUP_GROUP, "sort_topologically"],
    "fuse": [FUSION_GROUP, "sort_topologically"],
    "default": [[*CLEANUP_GROUP, *FUSION_GROUP], "sort_topologically"],
}
