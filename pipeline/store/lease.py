"""One job per store: a lease object with a heartbeat.

`<root>/_lease.json` names the job writing the store (host, pid, a random id) and when it last
renewed the lease. Another job on the same output is refused while the lease is fresh; a lease
whose holder crashed expires after `ttl` seconds, at once when the holder was a process on this
host that no longer runs (a rerun after `kill -9`). A lease held from another host is watched: a
renewal means its job lives (refused within one renewal period), expiry means it died. Object stores have no compare-and-swap here:
a job reads its own lease back after `settle` seconds, so two jobs started within the same instant
still end with one holder; beyond that this is a guard against mistakes, not a consensus protocol.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from pipeline.store.files import Layout, filesystem, read_json, write_atomic
from pipeline.store.schema import StoreError

log = logging.getLogger(__name__)


class StoreBusyError(StoreError):
    """Another live job holds the store's lease."""


def _alive_here(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True                          # cannot tell from here: trust the heartbeat
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, KeyError):
        return True
    return True


class Lease:
    """Held from `acquire()` to `release()`; a daemon thread renews it every ttl/4 seconds."""

    def __init__(self, root: str, ttl: float = 60.0, settle: float = 0.5, storage_options=None):
        self.fs, path = filesystem(root, storage_options)
        self.root, self.path = root, Layout(path).lease
        self.ttl, self.settle = ttl, settle
        self.me = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _holder(self) -> dict | None:
        try:
            return read_json(self.fs, self.path)
        except (FileNotFoundError, ValueError):
            return None

    def _write(self) -> None:
        write_atomic(self.fs, self.path, json.dumps({**self.me, "renewed": time.time(), "ttl": self.ttl}).encode())

    def _check_free(self) -> None:
        """Return when the lease is free, expired or ours; raise StoreBusyError while its holder lives.

        A holder on another host cannot be asked: a fresh lease is watched until it expires (the
        holder died: take over, as a retried job on a new cluster must) or is renewed (alive: refuse)."""
        first = self._holder()
        while True:
            holder = self._holder()
            if holder is None or holder.get("id") == self.me["id"]:
                return
            ttl = float(holder.get("ttl", self.ttl))
            age = time.time() - float(holder.get("renewed", 0))
            renewed = first is not None and holder.get("renewed") != first.get("renewed")
            if age >= ttl or not _alive_here(holder):
                log.warning("taking over the lease of a job that stopped (host %s, pid %s, renewed %.0f s ago)",
                            holder.get("host"), holder.get("pid"), age)
                return
            if renewed or holder.get("host") == socket.gethostname():
                raise StoreBusyError(
                    f"{self.root} is being written by another job (host {holder.get('host')}, pid "
                    f"{holder.get('pid')}, lease renewed {age:.0f} s ago); run one job per output")
            time.sleep(min(1.0, ttl / 8))

    def acquire(self) -> "Lease":
        self._check_free()
        self._write()
        time.sleep(self.settle)
        self._check_free()                   # a job that wrote in the same instant wins or loses here
        self._thread = threading.Thread(target=self._renew, name="store-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            holder = self._holder()
            if holder is not None and holder.get("id") != self.me["id"]:
                log.error("%s: another job took this store's lease; this job no longer owns it", self.root)
                return
            self._write()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self._holder()
        if holder is not None and holder.get("id") == self.me["id"]:
            self.fs.rm(self.path)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
