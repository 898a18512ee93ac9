"""``python -m msgbus._bench``: a benchmark run's child process (``--child SPEC``), or ``msgbus bench``'s arguments."""

from __future__ import annotations

import sys

from ._command import main

sys.exit(main())
