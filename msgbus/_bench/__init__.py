"""The benchmark engine behind ``msgbus bench`` and the repository's ``benchmarks/``, kept out of the core:
only that command (``msgbus.cli`` imports it lazily) and the benchmarks load it. ``python -m msgbus._bench``
runs its child processes. The engine is ``_engine``; peer contenders stay in ``benchmarks/contenders/``.
"""

from __future__ import annotations

from ._engine import (
    Contender,
    Figure,
    LostMessages,
    MsgbusContender,
    OnBody,
    Plan,
    Tally,
    bench,
    drain,
    main,
    make_body,
    render_text,
)

__all__ = [
    "Contender",
    "Figure",
    "LostMessages",
    "MsgbusContender",
    "OnBody",
    "Plan",
    "Tally",
    "bench",
    "drain",
    "main",
    "make_body",
    "render_text",
]
