"""``python -m msgbus``: the same command line as the ``msgbus`` script."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
