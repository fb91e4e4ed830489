"""LiteFrame Video LLMs as an lmms-eval model, through lmms-eval's own plugin mechanism.

lmms-eval 0.7.3 finds external models through the Python entry-point group `lmms_eval.models`:
each entry point loads to a `ModelManifest` (or a callable returning them), read when
`lmms_eval.models` is imported. This package's entry point (pyproject.toml) is

    [project.entry-points."lmms_eval.models"]
    liteframe = "lma.lmms_eval:manifests"

so once `liteframe` is installed beside lmms-eval, `lmms-eval --model liteframe` loads
`lma.lmms_eval.model.LiteFrameVideoLLM`. Tasks are not registered by entry points in 0.7.3; a
folder of task YAMLs is passed with `--include_path` (`TASKS_DIR` is the small local video QA task
shipped here):

    lmms-eval --model liteframe --model_args pretrained=runs/lma,frames=256 \
        --include_path "$(python -c 'import lma.lmms_eval as m; print(m.TASKS_DIR)')" \
        --tasks liteframe_videoqa --batch_size 1 --output_path eval-out

Nothing here imports lmms-eval at module level: the training environment does not have it.
"""

from __future__ import annotations

from pathlib import Path

MODEL_ID = "liteframe"
ALIASES = ("liteframe_video_llm",)
CLASS_PATH = "lma.lmms_eval.model.LiteFrameVideoLLM"
TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def manifests():
    """The `lmms_eval.models` entry point: this package's models, as lmms-eval's manifests."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH, aliases=ALIASES)]
