"""LiteFrame student: `import student` registers model_type "liteframe" with AutoConfig/AutoModel."""

from transformers import AutoConfig, AutoModel

from .configuration import GeometryError, LiteFrameConfig
from .init_from_teacher import TeacherLayoutError, init_from_teacher
from .modeling import LiteFrameModel
from .presets import PRESETS, config_for_store, preset_config

AutoConfig.register(LiteFrameConfig.model_type, LiteFrameConfig, exist_ok=True)
AutoModel.register(LiteFrameConfig, LiteFrameModel, exist_ok=True)

__all__ = ["GeometryError", "TeacherLayoutError", "init_from_teacher", "LiteFrameConfig", "LiteFrameModel", "PRESETS", "config_for_store", "preset_config"]
