"""A contract check: the promise it proves, what it needs from the backend, and its total deadline."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from msgbus import Capabilities
from msgbus._capabilities import has

from ._context import ContractContext

__all__ = ["Check", "CheckFn", "missing_capability", "slugify"]

CheckFn = Callable[[ContractContext], Awaitable[None]]


def slugify(name: str) -> str:
    """``"at-least-once after consumer crash"`` -> ``"at_least_once_after_consumer_crash"``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def missing_capability(caps: Capabilities, name: str) -> bool:
    """Whether ``caps`` lacks capability ``name`` (any flag of ``Capabilities``, or a name ``has()`` knows)."""
    try:
        return not has(caps, name)
    except ValueError:
        if not hasattr(caps, name):
            raise ValueError(f"unknown capability {name!r}") from None
        return not bool(getattr(caps, name))


@dataclass(frozen=True, slots=True)
class Check:
    """One promise, proved by ``fn`` within ``deadline`` seconds (plus ``lock_waits`` x the lock duration).

    ``requires`` names capabilities; a backend that lacks one skips the check with that name as the reason.
    """

    name: str
    fn: CheckFn
    requires: tuple[str, ...] = ()
    deadline: float = 60.0
    lock_waits: float = 0.0  # how many lock expiries the check may legitimately wait out
    alone: bool = False  # restarts the broker: never runs while other checks do

    @property
    def slug(self) -> str:
        return slugify(self.name)

    @property
    def doc(self) -> str:
        return (self.fn.__doc__ or self.name).strip().splitlines()[0]

    def skip_reason(self, caps: Capabilities) -> str | None:
        missing = [n for n in self.requires if missing_capability(caps, n)]
        return ", ".join(missing) if missing else None

    def total_deadline(self, caps: Capabilities) -> float:
        return self.deadline + self.lock_waits * (caps.lock_duration or 0.0)
