"""Which MoE families the installed Transformers has, and what the family table says of each.

A family here is a Transformers model folder whose modeling code holds fused experts (a
``gate_up_proj`` 3-D parameter, or an experts class decorated ``@use_experts_implementation``).
The scan reads the installed package's source files (nothing is imported or built), so that
`autoep inspect --families` and the tests can show every such family supported or refused by
name, and a family added by a newer Transformers shows up as "unclassified" instead of being
silently absent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from autoep.presets import FAMILIES, REFUSED_MODEL_TYPES, Preset, Refusal
from autoep.versions import at_least, transformers_version

_FUSED_EXPERTS = re.compile(r"self\.gate_up_proj\s*=\s*nn\.Parameter|@use_experts_implementation")


@dataclass(frozen=True)
class InstalledFamily:
    folder: str  # transformers/models/<folder>
    model_types: tuple[str, ...]  # the config model types that live in the folder
    status: str  # "supported" | "needs newer transformers" | "refused" | "unclassified"
    family: Preset | None = None
    refusal: Refusal | None = None

    def row(self) -> dict[str, object]:
        types = ", ".join(self.model_types[:3]) + (f" (+{len(self.model_types) - 3})" if len(self.model_types) > 3 else "")
        base = {"folder": self.folder, "model_types": types, "status": self.status}
        if self.family is not None:
            return {**base, **{k: v for k, v in self.family.row().items() if k != "model_types"}, "reason": ""}
        reason = self.refusal.reason if self.refusal else "not in autoep/presets/table.py: neither a row nor a refusal"
        return {**base, "family": "-", "routing": "-", "renormalize": "-", "scale": "-", "shared": "-",
                "transformers": self.refusal.versions if self.refusal else "-", "reason": reason}


def _models_folder() -> Path:
    import transformers

    return Path(transformers.__file__).parent / "models"


def fused_expert_folders() -> list[str]:
    """Model folders of the installed Transformers whose modeling code holds fused experts."""
    found = []
    for folder in sorted(_models_folder().iterdir()):
        if folder.is_dir() and any(_FUSED_EXPERTS.search(path.read_text(encoding="utf-8", errors="replace"))
                                   for path in folder.glob("modeling_*.py")):
            found.append(folder.name)
    return found


def _model_types_by_folder() -> dict[str, tuple[str, ...]]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    by_folder: dict[str, list[str]] = {}
    for model_type in CONFIG_MAPPING_NAMES:
        by_folder.setdefault(model_type_to_module_name(model_type), []).append(model_type)
    return {folder: tuple(types) for folder, types in by_folder.items()}


def installed_families() -> list[InstalledFamily]:
    """Every fused-experts family of the installed Transformers with the table's verdict."""
    by_model_type = {model_type: family for family in FAMILIES for model_type in family.block_classes}
    types_by_folder = _model_types_by_folder()
    result = []
    for folder in fused_expert_folders():
        model_types = types_by_folder.get(folder, (folder,))
        family = next((by_model_type[t] for t in model_types if t in by_model_type), None)
        refusal = next((REFUSED_MODEL_TYPES[t] for t in model_types if t in REFUSED_MODEL_TYPES), None)
        if family is not None:
            status = "supported" if at_least(family.min_transformers) else "needs newer transformers"
        else:
            status = "refused" if refusal is not None else "unclassified"
        result.append(InstalledFamily(folder, model_types, status, family, refusal))
    return result


def summary(families: list[InstalledFamily]) -> str:
    counts: dict[str, int] = {}
    for family in families:
        counts[family.status] = counts.get(family.status, 0) + 1
    parts = ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
    return f"transformers {transformers_version()}: {len(families)} fused-experts MoE families: {parts}"
