"""``python -m onnxopt`` runs the command-line interface."""

from onnxopt.cli import main

main()
