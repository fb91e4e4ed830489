"""CTD training on a Ray cluster: Ray Train starts one worker per GPU (or CPU slot), makes the
process group, and each worker runs exactly the loop of `python -m student.train` (jobs.ray_train).

    python -m jobs.train_student --data s3://bucket/store --output /shared/runs/ctd \\
        --ray-workers 8 --use-gpu --preset vitb --batch-size 64 --max-steps 200000

OUTPUT must be a filesystem all workers see (checkpoints and the final model are written there by
rank 0). With --max-failures N, Ray restarts the worker group after a failure and the loop
resumes from the last checkpoint in OUTPUT, with the same exact-resume guarantee as --resume.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from jobs.ray_train import WorkerGroup, fit, loop_config
from pipeline.config import config_from_dict, parse_config
from student.train import TrainConfig, train


@dataclass
class RayTrainConfig(TrainConfig):
    """Train the LiteFrame student with Ray Train (TorchTrainer), the same loop as student.train."""

    ray_workers: int = field(default=1, metadata={"min": 1, "help": "training processes (one per GPU with --use-gpu)"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per Ray worker"})
    address: str = field(default="auto", metadata={"help": "Ray address; 'auto' joins a cluster or starts one"})
    max_failures: int = field(default=0, metadata={"min": 0, "help": "worker-group restarts Ray may make (each resumes)"})


def _train(config: dict[str, Any]) -> None:
    import ray.train

    train(config_from_dict(TrainConfig, config),
          on_log=lambda step, metrics: ray.train.report({"step": step, **metrics}))


def run(cfg: RayTrainConfig) -> Any:
    group = WorkerGroup(workers=cfg.ray_workers, use_gpu=cfg.use_gpu, max_failures=cfg.max_failures,
                        address=cfg.address)
    return fit(_train, loop_config(cfg, TrainConfig, cfg.max_failures), group, name="ctd")


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(RayTrainConfig, argv)
    run(cfg)
    out = Path(cfg.output).resolve()
    evaluation = json.loads((out / "eval.json").read_text()) if (out / "eval.json").exists() else None
    print(json.dumps({"output": str(out), "eval": evaluation}), flush=True)


if __name__ == "__main__":
    main()
