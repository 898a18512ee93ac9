"""The benchmark engine behind ``msgbus bench`` and the repository's ``benchmarks/``, kept out of the core:
only that command (``msgbus.cli`` imports it lazily) and the benchmarks load it. ``python -m msgbus._bench``
runs its child processes. Peer contenders stay in ``benchmarks/contenders/``.

The engine runs workloads against a ``Contender`` and counts every message: each body carries a run tag and an
index, and a run that loses, duplicates or mixes up a message raises ``LostMessages`` instead of reporting a
figure. Its modules, each using only those before it: ``_contender`` (the interface, bodies, the tally),
``_workloads`` (publish and latency, in process), ``_processes`` (consume and pipeline, in child processes),
``_report`` (the table), ``_session`` (a plan run over contenders: figures), ``_command`` (``msgbus bench``).
"""

from __future__ import annotations

from ._command import main
from ._contender import Contender, LostMessages, MsgbusContender, OnBody, Tally, make_body
from ._report import render_text
from ._session import Figure, Plan, bench
from ._workloads import drain

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
