"""CTD training on a Ray cluster: Ray Train starts one worker per GPU (or CPU slot), makes the
process group, and each worker runs exactly the loop of `python -m student.train`.

    python -m jobs.train_student --data s3://bucket/store --output /shared/runs/ctd \\
        --ray-workers 8 --use-gpu --preset vitb --batch-size 64 --max-steps 200000

OUTPUT must be a filesystem all workers see (checkpoints and the final model are written there by
rank 0). With --max-failures N, Ray restarts the worker group after a failure and the loop
resumes from the last checkpoint in OUTPUT, with the same exact-resume guarantee as --resume.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from jobs.cluster import connect
from pipeline.config import config_from_dict, parse_config, to_dict
from student.train import TrainConfig, train


@dataclass
class RayTrainConfig(TrainConfig):
    """Train the LiteFrame student with Ray Train (TorchTrainer), the same loop as student.train."""

    ray_workers: int = field(default=1, metadata={"min": 1, "help": "training processes (one per GPU with --use-gpu)"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per Ray worker"})
    address: str = field(default="auto", metadata={"help": "Ray address; 'auto' joins a cluster or starts one"})
    max_failures: int = field(default=0, metadata={"min": 0, "help": "worker-group restarts Ray may make (each resumes)"})


def _loop_config(cfg: RayTrainConfig) -> dict[str, Any]:
    own = {f.name for f in fields(TrainConfig)}
    data = {k: v for k, v in to_dict(cfg).items() if k in own}
    data["output"] = str(Path(cfg.output).resolve())
    data["resume"] = cfg.resume or cfg.max_failures > 0    # a restarted group must continue, not restart
    return data


def _worker(config: dict[str, Any]) -> None:
    import ray.train

    context = ray.train.get_context()
    os.environ["LOCAL_RANK"] = str(context.get_local_rank())   # picks this worker's GPU in setup_distributed
    cfg = config_from_dict(TrainConfig, config)
    train(cfg, on_log=lambda step, metrics: ray.train.report({"step": step, **metrics}))


def run(cfg: RayTrainConfig) -> Any:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = connect(cfg.address)
    try:
        trainer = TorchTrainer(
            _worker,
            train_loop_config=_loop_config(cfg),
            scaling_config=ScalingConfig(num_workers=cfg.ray_workers, use_gpu=cfg.use_gpu),
            run_config=RunConfig(name="ctd", storage_path=str(Path(cfg.output).resolve() / "ray"),
                                 failure_config=FailureConfig(max_failures=cfg.max_failures)),
        )
        return trainer.fit()
    finally:
        if started:
            ray.shutdown()


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(RayTrainConfig, argv)
    run(cfg)
    out = Path(cfg.output).resolve()
    evaluation = json.loads((out / "eval.json").read_text()) if (out / "eval.json").exists() else None
    print(json.dumps({"output": str(out), "eval": evaluation}), flush=True)


if __name__ == "__main__":
    main()
