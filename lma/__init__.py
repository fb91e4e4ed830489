"""Language Model Adaptation: a Video LLM that reads LiteFrame student tokens.

`VideoLLM` = student (frozen by default) -> `VideoProjector` -> any causal LM with LoRA (peft).
Jobs: `python -m lma.finetune` (training), `python -m lma.generate` (ask about a video).
"""

from lma.modeling import VideoLLM, VideoLLMConfig, VideoProjector

__all__ = ["VideoLLM", "VideoLLMConfig", "VideoProjector"]
