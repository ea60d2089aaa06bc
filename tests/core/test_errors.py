"""onnxopt.errors: the one-line messages every user-facing error is made of."""

from __future__ import annotations

from onnxopt.errors import OnnxoptError, one_line


def test_one_line_joins_whitespace_and_cuts_at_the_limit():
    assert one_line(ValueError("a\n  b\tc"), 300) == "a b c"
    assert one_line("x" * 500, 10) == "x" * 10
    assert one_line("  many\n\nlines  ", None) == "many lines"


def test_one_line_of_an_exception_without_text_is_its_type():
    assert one_line(KeyError(), 50) == "KeyError"
    assert one_line("", 50) == ""


def test_onnxopt_error_message_is_one_line():
    assert str(OnnxoptError("first\nsecond   third")) == "first second third"
