"""Built-in passes, one module per family; importing this package registers them."""

from onnxopt.passes import (  # noqa: F401
    constants,
    cse,
    dead_code,
    fold_constants,
    fuse_activation,
    fuse_attention,
    fuse_contrib,
    fuse_conv,
    fuse_layout,
    fuse_linear,
    fuse_mean,
    fuse_norm,
    fuse_softmax,
    noops,
    opset,
    reshape_shapes,
    shape_inference,
    shape_values,
    topological_sort,
    woq,
)
