"""One job per output: the store's lease refuses a second live job and expires for a dead one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.store.lease import Lease, StoreBusyError
from tests.support import stop_group

REPO = Path(__file__).resolve().parents[1]


def _holder(root: Path):
    """Another live process holding the lease, as a running job does."""
    code = (f"import time; from pipeline.store.lease import Lease; Lease({str(root)!r}, ttl=60, settle=0).acquire(); "
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_job_on_a_live_jobs_output_is_refused_and_touches_nothing(tmp_path, capsys):
    from jobs.extract import main

    root = tmp_path / "store"
    proc = _holder(root)
    try:
        before = {p.name: p.read_bytes() for p in root.iterdir()}
        argv = ["--input", str(tmp_path), "--output", str(root), "--teacher", str(tmp_path / "t")]
        assert main(argv) == 2
        assert "being written by another job" in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in root.iterdir()} == before
    finally:
        stop_group(proc, grace=1)
    # its holder killed: the lease of a dead process on this host is taken over at once
    with Lease(str(root), settle=0) as lease:
        assert json.loads((root / "_lease.json").read_text())["id"] == lease.me["id"]
    assert not (root / "_lease.json").exists()


def test_a_lease_from_another_host_is_watched_until_renewed_or_expired(tmp_path):
    import threading

    def lease(renewed):
        """Written as the holder's job writes it: whole, by rename (a reader never sees half a file)."""
        tmp = tmp_path / "_lease.json.tmp"
        tmp.write_text(json.dumps({"id": "x", "host": "elsewhere", "pid": 1, "renewed": renewed, "ttl": 2}))
        os.replace(tmp, tmp_path / "_lease.json")

    stop = threading.Event()

    def heartbeat():          # its job is alive: renewed every ttl/8, however late the watcher looks
        while not stop.wait(0.25):
            lease(time.time())

    lease(time.time())
    renewer = threading.Thread(target=heartbeat)
    renewer.start()
    try:
        with pytest.raises(StoreBusyError, match="host elsewhere"):
            Lease(str(tmp_path), settle=0).acquire()
    finally:
        stop.set()
        renewer.join()
    lease(time.time())                                            # its job died: no renewal comes
    start = time.time()
    Lease(str(tmp_path), settle=0).acquire().release()
    assert 1 < time.time() - start < 10


def test_the_heartbeat_renews_and_two_simultaneous_starts_leave_one_holder(tmp_path):
    a = Lease(str(tmp_path), ttl=0.4, settle=0.3)
    b = Lease(str(tmp_path), ttl=0.4, settle=0.3)
    a._write()          # both found the output free and wrote in the same instant; b wrote last
    b._write()
    time.sleep(0.3)
    with pytest.raises(StoreBusyError):
        a._check_free()
    b._check_free()
    b.release()
    assert not (tmp_path / "_lease.json").exists()
    with Lease(str(tmp_path), ttl=0.4, settle=0):
        first = json.loads((tmp_path / "_lease.json").read_text())["renewed"]
        time.sleep(0.5)      # past its ttl: only the heartbeat keeps it
        assert json.loads((tmp_path / "_lease.json").read_text())["renewed"] > first
        with pytest.raises(StoreBusyError):
            Lease(str(tmp_path), ttl=0.4, settle=0).acquire()


def test_lease_on_s3(s3_env):
    import s3fs

    s3fs.S3FileSystem(endpoint_url=s3_env["AWS_ENDPOINT_URL"]).mkdir("leases")
    with Lease("s3://leases/store", settle=0):
        with pytest.raises(StoreBusyError):
            Lease("s3://leases/store", settle=0).acquire()
