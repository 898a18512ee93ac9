"""Progress of a long CLI command: a tqdm bar on a terminal (the ``msgbus[cli]`` extra), else nothing until the
command's summary line. One place, so every command that counts (redrive, purge, demo, contract) shows it the
same way."""

from __future__ import annotations

import importlib
from types import TracebackType
from typing import Any, TextIO


class Progress:
    """Counts ``done`` out of ``total`` (``None``: unknown) on ``out``; a context manager that closes the bar."""

    def __init__(self, what: str, out: TextIO, total: int | None = None, unit: str = "msg") -> None:
        self._bar: Any = None
        self._out = out
        if out.isatty():
            try:
                tqdm = importlib.import_module("tqdm").tqdm
            except ImportError:  # the extra is not installed: the summary line is enough
                return
            self._bar = tqdm(total=total, desc=what, unit=unit, file=out, leave=True, dynamic_ncols=True)

    @property
    def shown(self) -> bool:
        """Whether a bar is drawn (a terminal, and tqdm installed)."""
        return self._bar is not None

    def update(self, done: int, note: str | None = None) -> None:
        """Show ``done`` so far (a running total, not an increment), and ``note`` after the bar."""
        if self._bar is not None:
            if note is not None:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(done - self._bar.n)

    def write(self, line: str) -> None:
        """Print ``line`` above the bar (or just print it, without one)."""
        if self._bar is not None:
            self._bar.write(line, file=self._out)
        else:
            print(line, file=self._out, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.close()
