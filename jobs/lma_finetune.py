"""LMA fine-tuning on a Ray cluster: `lma.finetune` as one Ray task holding one GPU.

    ray job submit --working-dir . -- python -m jobs.lma_finetune --student /shared/student \\
        --llm /models/Qwen2.5-7B-Instruct --data s3://bucket/lma.jsonl --output /shared/runs/lma \\
        --frames 256 --grad-accum 128 --use-gpu --max-retries 2

The driver only validates the flags and waits; the task runs the same loop as
`python -m lma.finetune`. OUTPUT must be a filesystem the worker node writes and you can read.
`ray job submit` never retries a job, so with --max-retries N Ray re-runs a task whose worker died
(node loss, OOM kill) and the rerun resumes from the last checkpoint in OUTPUT.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from jobs.cluster import connect
from lma.finetune import FinetuneConfig, finetune
from pipeline.config import config_from_dict, log_to_stderr, parse_config, to_dict


@dataclass
class RayFinetuneConfig(FinetuneConfig):
    """Run lma.finetune as a Ray task (one GPU with --use-gpu)."""

    use_gpu: bool = field(default=False, metadata={"help": "give the task one GPU (and train on it)"})
    num_cpus: float = field(default=2.0, metadata={"min": 0, "help": "CPUs reserved for the task (video decode threads)"})
    address: str = field(default="auto", metadata={"help": "Ray address; 'auto' joins a cluster or starts one"})
    max_retries: int = field(default=0, metadata={"min": 0, "help": "reruns of a task whose worker died (each resumes)"})


def task_config(cfg: RayFinetuneConfig) -> dict[str, Any]:
    """The FinetuneConfig the task runs: absolute output, and resume on when a rerun may happen."""
    own = {f.name for f in fields(FinetuneConfig)}
    data = {k: v for k, v in to_dict(cfg).items() if k in own}
    data["output"] = str(Path(cfg.output).resolve())
    data["resume"] = cfg.resume or cfg.max_retries > 0
    data["device"] = "cuda" if cfg.use_gpu else "cpu"
    return data


def _run(config: dict[str, Any]) -> str:
    log_to_stderr()
    return str(finetune(config_from_dict(FinetuneConfig, config)))


def run(cfg: RayFinetuneConfig) -> str:
    import ray

    started = connect(cfg.address)
    try:
        remote = ray.remote(num_gpus=1 if cfg.use_gpu else 0, num_cpus=cfg.num_cpus,
                            max_retries=cfg.max_retries)(_run)
        return ray.get(remote.remote(task_config(cfg)))
    finally:
        if started:
            ray.shutdown()


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(RayFinetuneConfig, argv)
    print(json.dumps({"output": run(cfg)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
