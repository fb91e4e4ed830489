"""Process helpers for tests that start real servers (Ray clusters, moto) and must stop exactly those."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """Stop a process we started in its own session, with everything it spawned: SIGTERM to the
    group, then SIGKILL to whatever is left of it after `grace` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + grace
    while time.time() < deadline:
        proc.poll()                      # reap the leader so it stops counting as a member
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float) -> bool:
    """True once `url` answers; False if `proc` died or `timeout` passed first."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return True
        except OSError:
            time.sleep(0.5)
    return False
