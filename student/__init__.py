"""LiteFrame student: `import student` registers model_type "liteframe" with AutoConfig/AutoModel."""

from transformers import AutoConfig, AutoModel

from .configuration import GeometryError, LiteFrameConfig
from .fast import FastEncoder
from .init_from_teacher import TeacherLayoutError, init_from_teacher
from .modeling import LiteFrameModel
from .presets import PRESETS, config_for_store, preset_config

AutoConfig.register(LiteFrameConfig.model_type, LiteFrameConfig, exist_ok=True)
AutoModel.register(LiteFrameConfig, LiteFrameModel, exist_ok=True)

__all__ = ["FastEncoder", "GeometryError", "LiteFrameConfig", "LiteFrameModel", "PRESETS", "TeacherLayoutError",
           "config_for_store", "init_from_teacher", "preset_config"]
