"""Built-in presets, by name and by ``model.config.model_type``."""

from autoep.presets import deepseek_v2, deepseek_v3, mixtral, qwen3_5_moe, qwen3_moe
from autoep.presets.base import Preset

PRESETS: dict[str, Preset] = {
    module.PRESET.name: module.PRESET for module in (mixtral, qwen3_moe, qwen3_5_moe, deepseek_v2, deepseek_v3)
}

MODEL_TYPE_TO_PRESET: dict[str, str] = {
    model_type: preset.name for preset in PRESETS.values() for model_type in preset.block_classes
}

__all__ = ["PRESETS", "MODEL_TYPE_TO_PRESET", "Preset"]
