"""What a person at the command line sees: progress, results and one-line errors.

The libraries under emo talk a lot: Prefect logs every failed task and flow with its
traceback, and mediapipe's TensorFlow Lite and absl print start-up lines from C++. None of it
helps someone who gave emo a bad file, so the CLI (unless ``-v``) keeps Prefect's run logs for
the Prefect server, where the UI shows them, and silences the native chatter.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

_quiet = False
# Commands that run as services or operations (a worker, a served deployment, the sweep, the
# setup Jobs' deploy and migrations, garbage collection): their log is read by an operator, in
# full, so they are never quiet.
SERVICE_COMMANDS = frozenset({"serve", "worker", "sweep", "deploy", "db", "gc"})
# emo's own loggers: a retry or a re-rendered checkpoint is worth a line in a service's log,
# not on the console of someone waiting for one render.
OWN_LOGGERS = ("db", "emo", "flows")


def quiet_console() -> None:
    """Flow and task run logs go to the Prefect API only; emo's own messages below errors and
    the native libraries' chatter are dropped from the console."""
    global _quiet
    _quiet = True
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).propagate = False  # their own handler sends them to the API
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@contextlib.contextmanager
def native_output_silenced() -> Iterator[None]:
    """While quiet, send what C++ code writes to the process's stderr to /dev/null (Python's
    own ``sys.stderr`` is left alone)."""
    if not _quiet:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
