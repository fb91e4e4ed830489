"""The one way our jobs reach Ray: join the cluster they were submitted to, or start a local one.

Token authentication (on by default since Ray 2.60): `ray.init` reads the token from RAY_AUTH_TOKEN,
the file RAY_AUTH_TOKEN_PATH names, or `~/.ray/auth_token`; a submitted job gets it from its cluster.
Joining a token cluster by an explicit address needs RAY_AUTH_MODE=token exported as well.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("jobs.cluster")

# Environment a worker needs to reach the same object store as the driver.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "FSSPEC_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION")


def connect(address: str) -> bool:
    """Join a cluster (`ray job submit` sets RAY_ADDRESS) or start a local Ray.

    True when this call initialised Ray in this process (so the job shuts it down at the end);
    False when the caller had already initialised it (a notebook, a test, a bigger driver)."""
    import ray

    if ray.is_initialized():
        return False
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    # A submitted job already has its runtime env (working_dir...); a second one would replace it.
    runtime_env = {"env_vars": env} if env and "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ else None
    if address == "local":
        ray.init(address="local", runtime_env=runtime_env)
        return True
    try:
        ray.init(address=address, runtime_env=runtime_env)
    except ConnectionError as e:
        if address != "auto":
            raise
        log.info("no single Ray cluster to join (%s): starting a local one for this job", e)
        ray.init(runtime_env=runtime_env)
    return True
