"""A layer left alone by a weight pass (prune, lowrank), with the count key and the reason for its report."""

from __future__ import annotations


class LayerSkipped(Exception):
    """A layer left alone: ``kind`` is the count key, ``reason`` a short phrase for the notes."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def require_layer(condition: bool, kind: str, reason: str) -> None:
    """Raise :class:`LayerSkipped` unless ``condition`` holds."""
    if not condition:
        raise LayerSkipped(kind, reason)
