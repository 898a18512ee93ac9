"""tools/lower_bounds.py reads each adapter's lower bounds right, so the run can tell an install above them."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lower_bounds", ROOT / "tools" / "lower_bounds.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclass looks its module up there
    spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


@pytest.mark.parametrize(
    ("spec", "bound"),
    [
        ("msgbus>=0.1.0,<0.2", "0.1.0"),
        ("azure-servicebus==7.15.*", "7.15"),
        ("redis[hiredis]>=5", "5"),
        ("aio-pika>=9.4,<11", "9.4"),
        ("foo~=1.2", "1.2"),
        ("foo<3", None),
    ],
)
def test_lower_bound(spec: str, bound: str | None) -> None:
    got = _tool().lower_bound(Requirement(spec))
    assert got == (None if bound is None else Version(bound))


def test_an_install_above_the_bound_is_told_apart() -> None:
    release = _tool()._release
    assert release(Version("5.0.0")) == release(Version("5"))
    assert release(Version("7.15.0")) == release(Version("7.15"))
    assert release(Version("5.0.1")) != release(Version("5"))
    assert release(Version("2.16.0")) != release(Version("2.7"))


def test_every_adapter_declares_a_lower_bound_for_each_dependency() -> None:
    tool = _tool()
    for pyproject in sorted(ROOT.glob("adapters/*/pyproject.toml")):
        for dep in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
            assert tool.lower_bound(Requirement(dep)) is not None, f"{pyproject.parent.name}: {dep} has no lower bound"
