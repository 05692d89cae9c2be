"""The embedded Prefect setup: without ``PREFECT_API_URL``, each ``emo`` command runs its flows
against an ephemeral Prefect server of its own, with Prefect's files under EMO_HOME.

Prefect starts that server as a child process and stops it when the command exits normally.
A command killed with SIGKILL (``kill -9``, the OOM killer) cannot stop it, and the orphaned
server would run on, holding memory and Prefect's SQLite database, beside the server of the
command that resumes the render. So each ephemeral server gets a watchdog: a small process that
stops the server as soon as the command that started it is gone.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

# The watchdog's whole program. Its parent is the emo command: once the watchdog's parent
# changes (the command died and the watchdog was re-parented), it stops the server, TERM then
# KILL. It holds the server through a pidfd where Linux has them, so a server that already
# exited can never be confused with a new process that reused its pid. It ends by itself when
# the server ends first (the command stopped it on a normal exit).
WATCHDOG = """
import os, select, signal, sys, time
parent, server = int(sys.argv[1]), int(sys.argv[2])
try:
    handle = os.pidfd_open(server)
except (AttributeError, OSError):
    handle = None
def running():
    if handle is not None:
        return not select.select([handle], [], [], 0)[0]
    try:
        os.kill(server, 0)
    except ProcessLookupError:
        return False
    return True
def send(sig):
    try:
        if handle is not None:
            signal.pidfd_send_signal(handle, sig)
        else:
            os.kill(server, sig)
    except ProcessLookupError:
        pass
while running():
    if os.getppid() != parent:
        send(signal.SIGTERM)
        for _ in range(50):
            time.sleep(0.1)
            if not running():
                sys.exit(0)
        send(signal.SIGKILL)
        sys.exit(0)
    time.sleep(0.5)
"""
_watchdogs: list[subprocess.Popen] = []  # kept, so they are not reported as leaked


def configure(home: Path) -> None:
    """Keep Prefect's files under EMO_HOME, and Prefect and the model libraries quiet."""
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect gives its ephemeral server 20 s to start; a busy laptop (or a render resumed
    # while another one runs) can take longer, and a timeout there fails the whole command.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def _start_watchdog(server: subprocess.Popen) -> None:
    try:
        watchdog = subprocess.Popen(
            [sys.executable, "-c", WATCHDOG, str(os.getpid()), str(server.pid)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # outlives a kill of this command's process group
        )
    except OSError as error:  # the server runs on unwatched, as without this module
        log.warning("could not watch the ephemeral Prefect server: %s", error)
        return
    _watchdogs.append(watchdog)


def watch_ephemeral_servers() -> None:
    """Give every ephemeral server this process starts a watchdog (see the module docstring).

    Called by the commands that run flows, just before: importing Prefect's server module
    takes seconds, which a command that starts no server should not pay. Does nothing when
    ``PREFECT_API_URL`` names a server.

    Wraps the method of Prefect's ``SubprocessASGIServer`` that spawns the server process
    (prefect 3.8); if a Prefect release renames it, servers run unwatched, as before.
    """
    if os.environ.get("PREFECT_API_URL"):
        return
    from prefect.server.api.server import SubprocessASGIServer

    spawn = getattr(SubprocessASGIServer, "_run_uvicorn_command", None)
    if spawn is None or getattr(spawn, "emo_watched", False):
        if spawn is None:
            log.debug("Prefect's ephemeral server cannot be watched in this release")
        return

    def spawn_watched(self: SubprocessASGIServer) -> subprocess.Popen:
        server = spawn(self)
        _start_watchdog(server)
        return server

    spawn_watched.emo_watched = True  # type: ignore[attr-defined]
    SubprocessASGIServer._run_uvicorn_command = spawn_watched  # type: ignore[method-assign]
