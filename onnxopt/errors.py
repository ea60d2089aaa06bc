"""Exceptions raised for user-facing problems.

Every error a user can cause (a bad file, a bad option, a shape that does not match)
is an :class:`OnnxoptError` whose message is one readable line. The CLI prints that
line and exits non-zero; anything else is an internal error.
"""

from __future__ import annotations


def one_line(error: object, limit: int | None = 300) -> str:
    """``error`` (an exception or text) as one line of at most ``limit`` characters (None: any length).

    An exception without text gives its type's name.
    """
    text = " ".join(str(error).split())[:limit]
    if not text and isinstance(error, BaseException):
        return type(error).__name__
    return text


class OnnxoptError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message, None))


class ModelLoadError(OnnxoptError):
    """The model file is missing, unreadable, corrupt or not ONNX."""


class InvalidModelError(OnnxoptError):
    """The model parsed but violates the ONNX spec (cycles, undefined names, bad types)."""


class OptionError(OnnxoptError):
    """An unknown pass, an unknown option, or an option value that does not validate."""

    exit_code = 2


class RequirementError(OnnxoptError):
    """A pass needs something (calibration data, a target) the run does not provide."""


class VerificationError(OnnxoptError):
    """The optimized model's outputs differ from the original's past the tolerance."""

    exit_code = 3
