"""``content_type_from``: the content type other code puts in a header, under the spellings in use."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from msgbus.adapter import content_type_from


@pytest.mark.parametrize("name", ["content-type", "Content-Type", "contentType", "content_type", "CONTENTTYPE"])
def test_common_spellings(name: str) -> None:
    assert content_type_from({"x": "1", name: " application/json "}) == "application/json"


@pytest.mark.parametrize(
    "headers",
    [{}, {"ce_type": "a"}, {"x-content-type": "application/json"}, {"content-type": ""}, {"content-type": "a\nb"}],
)
def test_none_named(headers: dict[str, str]) -> None:
    assert content_type_from(headers) is None


def test_too_long_is_untyped() -> None:
    assert content_type_from({"content-type": "a" * 257}) is None


@given(st.dictionaries(st.text(), st.text()))
def test_never_raises(headers: dict[str, str]) -> None:
    found = content_type_from(headers)
    assert found is None or (0 < len(found) <= 256 and found.isprintable())
