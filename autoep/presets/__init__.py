"""The family table (autoep/presets/table.py), by preset name and by ``model.config.model_type``."""

from autoep.presets.base import Family, Preset, Refusal, Routing
from autoep.presets.table import ALIASES, FAMILIES, REFUSED

PRESETS: dict[str, Preset] = {family.name: family for family in FAMILIES}
PRESETS.update({alias: PRESETS[target] for alias, target in ALIASES.items()})

MODEL_TYPE_TO_PRESET: dict[str, str] = {
    model_type: family.name for family in FAMILIES for model_type in family.block_classes
}

REFUSED_MODEL_TYPES: dict[str, Refusal] = {
    model_type: refusal for refusal in REFUSED for model_type in refusal.model_types
}

__all__ = ["PRESETS", "MODEL_TYPE_TO_PRESET", "REFUSED_MODEL_TYPES", "FAMILIES", "REFUSED", "Family", "Preset",
           "Refusal", "Routing"]
