"""LMA fine-tuning on a Ray cluster: the loop of `python -m lma.finetune` on a Ray Train worker
group (jobs.ray_train), one rank per GPU with --use-gpu, data-parallel as under torchrun.

    ray job submit --working-dir . -- python -m jobs.lma_finetune --student /shared/student \\
        --llm /models/Qwen2.5-7B-Instruct --data s3://bucket/lma.jsonl --output /shared/runs/lma \\
        --frames 256 --ray-workers 8 --grad-accum 16 --use-gpu --max-failures 2

An optimizer step sees --ray-workers x --batch-size x --grad-accum videos (the run above: 128).
The driver only validates the flags and waits. OUTPUT must be a filesystem every worker writes and
you can read. `ray job submit` never retries a job; with --max-failures N Ray Train restarts the
worker group after a worker dies (node loss, OOM kill) and the loop resumes from the last checkpoint
in OUTPUT (--max-failures > 0 turns --resume on). A restarted or rerun job may have another number
of workers: give it the same effective batch and it continues the same sample order.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

from jobs.ray_train import WorkerGroup, fit, loop_config
from lma.finetune import FinetuneConfig, finetune
from pipeline.config import config_from_dict, log_to_stderr, parse_config


@dataclass
class RayFinetuneConfig(FinetuneConfig):
    """Run lma.finetune on a Ray Train worker group (one GPU per worker with --use-gpu)."""

    ray_workers: int = field(default=1, metadata={"min": 1,
                                                  "help": "data-parallel ranks (one per GPU with --use-gpu)"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker (and train on it)"})
    num_cpus: float = field(default=2.0, metadata={"min": 0, "help": "CPUs reserved per worker (video decode threads)"})
    address: str = field(default="auto", metadata={"help": "Ray address; 'auto' joins a cluster or starts one"})
    max_failures: int = field(default=0, metadata={"min": 0, "help": "worker-group restarts Ray may make (each resumes)"})


def _finetune(config: dict[str, Any]) -> None:
    log_to_stderr()
    finetune(config_from_dict(FinetuneConfig, config))


def run(cfg: RayFinetuneConfig) -> str:
    group = WorkerGroup(workers=cfg.ray_workers, use_gpu=cfg.use_gpu, max_failures=cfg.max_failures,
                        address=cfg.address, cpus_per_worker=cfg.num_cpus)
    config = loop_config(cfg, FinetuneConfig, cfg.max_failures, device="cuda" if cfg.use_gpu else "cpu")
    fit(_finetune, config, group, name="lma")
    return config["output"]


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(RayFinetuneConfig, argv)
    print(json.dumps({"output": run(cfg)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
