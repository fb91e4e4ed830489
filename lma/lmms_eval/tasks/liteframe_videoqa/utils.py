"""Task functions of liteframe_videoqa (lmms-eval loads this file by path from the YAMLs'
`!function utils.NAME`); the code lives in `lma.lmms_eval.videoqa`."""

from lma.lmms_eval.videoqa import doc_to_choice, doc_to_target, doc_to_text, doc_to_visual, process_results

__all__ = ["doc_to_choice", "doc_to_target", "doc_to_text", "doc_to_visual", "process_results"]
