"""Shared test fixtures: real clips, one Ray cluster and one moto S3 server per session.

Every test that needs Ray in this process takes `ray_driver`; a test module that lets Ray start
itself (Ray Data does on first use) gets it shut down at the module's end, so no module inherits
another's Ray instance.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import free_port, stop_group, wait_for_http

REPO = Path(__file__).resolve().parents[1]
SHARED_VIDEOS = REPO.parent / "shared" / "videos"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def shared_videos() -> Path:
    """../shared/videos next to the repository (real clips); skips the test when absent."""
    if not SHARED_VIDEOS.is_dir():
        pytest.skip(f"real test videos not present at {SHARED_VIDEOS}")
    return SHARED_VIDEOS


@dataclass
class Cluster:
    address: str      # GCS address, for ray.init and --ray-address
    dashboard: str    # job-submission endpoint
    env: dict         # environment for processes that join it


@pytest.fixture(scope="session")
def ray_cluster():
    """One `ray start --head` cluster (with dashboard, for job submission) for the whole session.

    Started with --block in its own process session, so teardown stops exactly this cluster
    (not `ray stop`, which would stop every Ray on the machine)."""
    port, dash = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="lfray", dir="/tmp")   # short: Ray's socket paths have a length limit
    # A token in ~/.ray (from another cluster on this machine) would switch token auth on; this
    # cluster is local to the test and listens on 127.0.0.1 only.
    auth_before = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(REPO)}
    log = open(os.path.join(temp, "ray-start.log"), "wb")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
         "--node-ip-address=127.0.0.1", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--temp-dir={temp}", "--disable-usage-stats"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if not wait_for_http(f"http://127.0.0.1:{dash}/api/version", proc, 120):
            raise RuntimeError("ray start failed:\n" + Path(temp, "ray-start.log").read_text()[-3000:])
        yield Cluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", env)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        stop_group(proc, grace=5)
        log.close()
        if auth_before is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = auth_before
        shutil.rmtree(temp, ignore_errors=True)


_DRIVING: list[str] = []   # the session cluster's address while `ray_driver` is connected


@pytest.fixture(scope="session")
def ray_driver(ray_cluster):
    """This test process as a Ray driver of the session cluster (jobs run in-process reuse it)."""
    import ray

    if ray.is_initialized():          # Ray started itself earlier in this module (Ray Data does)
        ray.shutdown()
    ray.init(address=ray_cluster.address)
    _DRIVING.append(ray_cluster.address)
    yield ray_cluster
    _DRIVING.clear()
    ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def _no_stray_ray():
    """Shut down a Ray that a module let start by itself, so the next module starts clean."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized() and not _DRIVING:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's real S3 server on 127.0.0.1 for the session; each test uses buckets of its own."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """The usual AWS_* variables pointing at the session's moto server, as a user's shell would set them."""
    env = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env
