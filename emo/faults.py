"""Fault points: where a test or the chaos run kills a process on purpose.

``fault_point("nightly.registered")`` does nothing unless ``EMO_FAULT_POINT`` names that point;
then the process kills itself with SIGKILL there, as an OOM kill or a lost node would, with no
chance to clean up. It is how the kill points of a reliability claim are reached exactly
(``tests/flows/test_recovery.py``, ``bench/chaos.py``) instead of by timing.
"""

from __future__ import annotations

import os
import signal

ENV = "EMO_FAULT_POINT"


def fault_point(name: str) -> None:
    """Die here (SIGKILL) if ``EMO_FAULT_POINT`` is ``name``."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
