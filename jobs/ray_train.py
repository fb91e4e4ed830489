"""The glue between a training loop and Ray Train, shared by jobs.train_student and jobs.lma_finetune:
a TorchTrainer worker group (one rank per GPU with --use-gpu) makes the process group, and each
worker runs the loop exactly as `torchrun` would, taking the GPU of its local rank.

OUTPUT must be a filesystem every worker sees: rank 0 writes checkpoints there, and after a failure
Ray Train restarts the whole group (up to --max-failures times), whose loop resumes from the last
checkpoint in OUTPUT (--max-failures > 0 turns --resume on).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

from jobs.cluster import connect
from pipeline.config import to_dict


@dataclass(frozen=True)
class WorkerGroup:
    workers: int
    use_gpu: bool
    max_failures: int
    address: str
    cpus_per_worker: float | None = None     # None: Ray Train's default (1)


def loop_config(cfg: Any, loop_cls: type, max_failures: int, **overrides: Any) -> dict[str, Any]:
    """The loop's own config (`loop_cls` fields of `cfg`) as the workers get it: an absolute output,
    and resume on when a restarted group may run it again."""
    own = {f.name for f in fields(loop_cls)}
    data = {k: v for k, v in to_dict(cfg).items() if k in own}
    data["output"] = str(Path(cfg.output).resolve())
    data["resume"] = cfg.resume or max_failures > 0
    return {**data, **overrides}


def _worker(config: dict[str, Any]) -> None:
    import ray.train

    os.environ["LOCAL_RANK"] = str(ray.train.get_context().get_local_rank())   # the GPU setup_distributed takes
    config["loop"](config["config"])


def fit(loop: Callable[[dict[str, Any]], None], config: dict[str, Any], group: WorkerGroup, name: str) -> Any:
    """Run `loop(config)` on every worker of the group; Ray Train's state goes to OUTPUT/ray."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": group.cpus_per_worker} if group.cpus_per_worker is not None else None
    started = connect(group.address)
    try:
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"loop": loop, "config": config},
            scaling_config=ScalingConfig(num_workers=group.workers, use_gpu=group.use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(name=name, storage_path=str(Path(config["output"]) / "ray"),
                                 failure_config=FailureConfig(max_failures=group.max_failures)),
        )
        return trainer.fit()
    finally:
        if started:
            ray.shutdown()
