"""The one ``WxH`` parser."""

from __future__ import annotations

import pytest
from ditstream.engine.errors import ValidationError
from ditstream.engine.sizes import parse_size


@pytest.mark.parametrize("text, size", [("512x512", (512, 512)), ("768X512", (768, 512)), (" 64 × 48 ", (64, 48))])
def test_parses_width_by_height(text, size):
    assert parse_size(text) == size


def test_square_form_only_when_asked():
    assert parse_size("512", square=True) == (512, 512)
    with pytest.raises(ValidationError, match="512x512"):
        parse_size("512")


@pytest.mark.parametrize("text", ["", "x", "12", "0x64", "64x0", "64x64x3", "-64x64", "1e3x64", "123456x1"])
def test_refuses_with_the_field_named(text):
    with pytest.raises(ValidationError) as info:
        parse_size(text)
    assert info.value.field == "size"
