"""Retry policy: how often a failing message is retried and how long to wait between tries."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter, then dead-letter after ``max_attempts`` deliveries."""

    max_attempts: int = 5
    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.5  # fraction of the delay randomised away (0 = none, 1 = "full jitter")

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or isinstance(self.max_attempts, bool) or self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be an int >= 1, got {self.max_attempts!r:.40}")
        for name in ("initial_backoff", "max_backoff", "multiplier", "jitter"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < math.inf:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r:.40}")
        if self.multiplier < 1:
            raise ConfigError(f"multiplier must be >= 1, got {self.multiplier!r}")
        if self.jitter > 1:
            raise ConfigError(f"jitter must be between 0 and 1, got {self.jitter!r}")

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before the delivery after ``attempt`` (1-based); never more than ``max_backoff``."""
        if not isinstance(attempt, int) or isinstance(attempt, bool):
            raise ConfigError(f"attempt must be an int, got {attempt!r:.40}")
        if self.initial_backoff == 0:
            return 0.0
        try:
            base = min(self.max_backoff, self.initial_backoff * self.multiplier ** max(0, attempt - 1))
        except OverflowError:  # the exponential passed what a float holds long ago: it is capped anyway
            base = self.max_backoff
        return base * (1 - self.jitter * random.random())
