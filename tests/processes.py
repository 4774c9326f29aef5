"""Shared handling of the real server processes the tests start."""

from __future__ import annotations

import signal
import subprocess


def terminate(process: subprocess.Popen, timeout: float) -> int:
    """Stop a process as twistd expects (SIGTERM: graceful shutdown), killing it if it outlives ``timeout``.

    Closes its stdout pipe, if any, and returns its exit status.
    """
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout:
        process.stdout.close()
    return process.returncode
