"""Shared test fixtures: real clips, one Ray cluster and one moto S3 server per session.

Every test that needs Ray in this process takes `ray_driver`; a test module that lets Ray start
itself (Ray Data does on first use) gets it shut down at the module's end, so no module inherits
another's Ray instance.

Ray runs with token authentication, as on a real cluster: the session makes a token of its own in a
temporary file and sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH before any test imports Ray, so
every Ray this session starts or joins (`ray start`, `ray.init()`, `ray job submit`, subprocesses)
uses it, and ~/.ray/auth_token is neither read nor written.
"""

from __future__ import annotations

import os
import secrets
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

_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
_auth_before: dict[str, str | None] = {}
_auth_dir: list[str] = []


def pytest_configure(config):
    """Token auth for the whole session (before collection: Ray caches the mode and the token per
    process, so they must be set before the first import of Ray)."""
    folder = tempfile.mkdtemp(prefix="lfauth")        # mode 0700
    token = Path(folder, "auth_token")
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    _auth_dir.append(folder)
    _auth_before.update({k: os.environ.get(k) for k in _AUTH_VARS})
    os.environ.pop("RAY_AUTH_TOKEN", None)            # would take precedence over the file
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)


def pytest_unconfigure(config):
    for k, v in _auth_before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    for folder in _auth_dir:
        shutil.rmtree(folder, ignore_errors=True)


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
    (not `ray stop`, which would stop every Ray on the machine). Token authentication is on
    (pytest_configure): `env` carries RAY_AUTH_MODE and RAY_AUTH_TOKEN_PATH, as a user's shell would."""
    port, dash, agent = free_port(), free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="lfray", dir="/tmp")   # short: Ray's socket paths have a length limit
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(REPO)}
    log = open(os.path.join(temp, "ray-start.log"), "wb")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
         "--node-ip-address=127.0.0.1", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--temp-dir={temp}", "--disable-usage-stats",
         # not the fixed default 52365: with a second Ray on the machine, the job agent could not bind
         # and every `ray job submit` would fail with "No available agent to submit job"
         f"--dashboard-agent-listen-port={agent}"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # /api/gcs_healthz answers without a token; /api/version would answer 401
        if not wait_for_http(f"http://127.0.0.1:{dash}/api/gcs_healthz", proc, 120):
            raise RuntimeError("ray start failed:\n" + Path(temp, "ray-start.log").read_text()[-3000:])
        yield Cluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", env)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        stop_group(proc, grace=5)
        log.close()
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
