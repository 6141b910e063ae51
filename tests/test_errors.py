"""Quoting an exception inside another error message: one line, never empty."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError, field_validator

from interleave_thinker.errors import one_line


class _Line(BaseModel):
    id: str
    count: int = 0

    @field_validator("id")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the id is\n  blank")
        return value


def _validation_error(data: object) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        _Line.model_validate(data)
    return caught.value


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ValueError("plain"), "plain"),
        (RuntimeError("  first line  \nTraceback (most recent call last):\n  more"), "first line"),
        (OSError("tabs\tand   runs  of spaces"), "tabs and runs of spaces"),
        (ValueError(""), "ValueError"),
        (TimeoutError("  \n "), "TimeoutError"),
        (KeyError("name"), "'name'"),
    ],
)
def test_other_exceptions_give_their_first_line(error: BaseException, expected: str) -> None:
    assert one_line(error) == expected


def test_validation_errors_give_the_first_field_and_its_message() -> None:
    assert one_line(_validation_error({"id": " "})) == "id: the id is blank"
    assert one_line(_validation_error({"count": "x"})) == "id: Field required (and 1 more)"
    # An error of the whole object has no field to name.
    assert one_line(_validation_error([1])).startswith("Input should be a valid dictionary")
