"""Command-line interface (click).

``onnxopt IN OUT [--passes ...]`` optimizes (the default command); ``onnxopt passes``,
``onnxopt verify A B`` and ``onnxopt inspect M`` are subcommands. Every user error is one
line on stderr with a non-zero exit; ``--debug`` shows tracebacks instead.

The group and the helpers every command shares are in :mod:`onnxopt.cli.common`; each module
below registers its subcommands on ``main`` when imported. Heavy modules (onnxruntime, rich,
the engine back ends) are imported inside the commands, so ``onnxopt --help`` stays fast.
"""

from onnxopt.cli import bench_command, build, info, optimize, verify  # noqa: F401  (register the subcommands on main)
from onnxopt.cli.common import main

__all__ = ["main"]
