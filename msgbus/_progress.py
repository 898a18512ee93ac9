"""Progress of a long CLI command: a tqdm bar on a terminal (the ``msgbus[cli]`` extra), else nothing until the
command's summary line. One place, so every command that counts (redrive, purge) shows it the same way."""

from __future__ import annotations

import importlib
from types import TracebackType
from typing import Any, TextIO


class Progress:
    """Counts ``done`` out of ``total`` (``None``: unknown) on ``out``; a context manager that closes the bar."""

    def __init__(self, what: str, out: TextIO, total: int | None = None) -> None:
        self._bar: Any = None
        if out.isatty():
            try:
                tqdm = importlib.import_module("tqdm").tqdm
            except ImportError:  # the extra is not installed: the summary line is enough
                return
            self._bar = tqdm(total=total, desc=what, unit="msg", file=out, leave=True, dynamic_ncols=True)

    def update(self, done: int) -> None:
        """Show ``done`` so far (a running total, not an increment)."""
        if self._bar is not None:
            self._bar.update(done - self._bar.n)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.close()
