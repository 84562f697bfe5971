"""Ties a managed `vllm serve` to the process that started it, however that one ends.

    python -m scanner_gateway.engine.tether GRACE_S -- vllm serve ...   (stdin: a pipe)

The starter holds the write end of the pipe on this process's stdin and never writes to
it. When the starter ends in any way (exit, crash, SIGKILL, the OOM killer) the kernel
closes that end; this process reads end-of-file and stops the engine: SIGTERM to the
engine's process group, SIGKILL to the group after GRACE_S (vLLM's engine-core and
worker processes are in it and would otherwise outlive their API server, holding memory
and the port). It does the same when the engine exits by itself (sweeping what the
engine left behind) or when it gets SIGTERM/SIGINT, then exits as the engine did.

Standard library only: it starts in well under a second and holds ~10 MB.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys

POLL_S = 0.2
_PR_SET_PDEATHSIG = 1


class _Stop(Exception):
    pass


def _raise_stop(_signum: int, _frame: object) -> None:
    raise _Stop


def _die_with_parent() -> None:
    """In the engine, before exec: SIGKILL if this tether itself is killed (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def run(grace_s: float, command: list[str]) -> int:
    # Its own process group, so that killpg reaches the engine's workers and not us.
    engine = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True,
                              preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    # Only now: a signal during Popen must not leave a started engine behind an exception
    # (until here SIGTERM just ends us, and the engine with us by its PDEATHSIG).
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        while engine.poll() is None:
            readable, _, _ = select.select([sys.stdin.fileno()], [], [], POLL_S)
            if readable and not os.read(sys.stdin.fileno(), 4096):
                break  # the starter is gone
    except _Stop:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if engine.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(engine.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            engine.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(engine.pid, signal.SIGKILL)  # stragglers, or an engine past its grace
    return engine.wait()


def main(argv: list[str]) -> None:
    if len(argv) < 4 or argv[2] != "--":
        sys.exit("usage: python -m scanner_gateway.engine.tether GRACE_S -- COMMAND...")
    code = run(float(argv[1]), argv[3:])
    if code < 0:  # killed by a signal: end the same way, so the starter sees what happened
        with contextlib.suppress(OSError, ValueError):  # SIGKILL's disposition cannot be set
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    main(sys.argv)
