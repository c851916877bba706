"""Which MoE families the installed Transformers has, and the verdict and mode of each.

A family is a Transformers model folder whose modeling code holds fused experts (a
``gate_up_proj`` 3-D parameter, or an experts class decorated ``@use_experts_implementation``).
Every model type of the installed Transformers whose model is built from such a folder gets a
verdict, also when its own folder holds no modeling file (``sarvam_moe`` builds ``Glm4Moe*``
classes, ``sarvam_mla`` ``DeepseekV3*``):

- ``supported``, mode ``block``: a family-table row declares its routing (whole-block
  replacement; the experts level is available too with ``replacement='experts'``);
- ``supported``, mode ``experts``: no row (or the row needs a newer Transformers), and the
  folder's experts classes have Transformers' uniform interface: the experts-level replacement
  keeps the model's own router;
- ``refused``: neither; the table's reason, or the reason read from the code (experts without
  the interface, or an experts class that overrides the interface's forward).

A family a newer Transformers adds gets the same treatment: nothing is left "unclassified". The
folders are found by reading the package's source files; their modeling modules are imported
(not instantiated) to see which experts classes carry the interface.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from autoep.interface import _decorated_forward, overrides_interface_class
from autoep.presets import FAMILIES, REFUSED_MODEL_TYPES, Preset, Refusal
from autoep.versions import at_least, transformers_version

_FUSED_EXPERTS = re.compile(r"self\.gate_up_proj\s*=\s*nn\.Parameter|@use_experts_implementation")
_CLASS = re.compile(r"^class (\w+)\(", re.MULTILINE)


@dataclass(frozen=True)
class InstalledFamily:
    folder: str  # transformers/models/<folder>: where the MoE classes are defined
    model_types: tuple[str, ...]  # the config model types whose models are built from these classes
    status: str  # "supported" | "refused"
    mode: str  # "block" | "experts" | "-"
    family: Preset | None = None
    refusal: Refusal | None = None
    reason: str = ""  # a refusal's reason, or why the mode is experts-level
    experts_classes: tuple[str, ...] = ()  # the interface experts classes of the folder

    def row(self) -> dict[str, object]:
        types = ", ".join(self.model_types[:3]) + (f" (+{len(self.model_types) - 3})" if len(self.model_types) > 3 else "")
        base = {"folder": self.folder, "model_types": types, "status": self.status, "mode": self.mode}
        if self.family is not None and self.mode == "block":
            return {**base, **{k: v for k, v in self.family.row().items() if k != "model_types"}, "reason": ""}
        return {**base, "family": self.family.name if self.family else "-",
                "routing": "the model's own router" if self.mode == "experts" else "-",
                "renormalize": "-", "scale": "-", "shared": "-",
                "transformers": self.refusal.versions if self.refusal and self.status == "refused" else "-",
                "reason": self.reason}


def _models_folder() -> Path:
    import transformers

    return Path(transformers.__file__).parent / "models"


def _modeling_sources(folder: Path) -> dict[str, str]:
    return {path.stem: path.read_text(encoding="utf-8", errors="replace") for path in folder.glob("modeling_*.py")}


def fused_expert_folders() -> list[str]:
    """Model folders of the installed Transformers whose modeling code holds fused experts."""
    return [folder.name for folder in sorted(_models_folder().iterdir())
            if folder.is_dir() and any(_FUSED_EXPERTS.search(text) for text in _modeling_sources(folder).values())]


def _class_folders() -> dict[str, str]:
    """Class name -> the folder whose modeling code defines it (read from the sources)."""
    found: dict[str, str] = {}
    for folder in sorted(_models_folder().iterdir()):
        if folder.is_dir():
            for text in _modeling_sources(folder).values():
                for name in _CLASS.findall(text):
                    found.setdefault(name, folder.name)
    return found


def _model_types_by_folder(folders: set[str]) -> dict[str, list[str]]:
    """Every config model type whose config lives in one of ``folders``, or whose model classes
    (base, causal LM, image-text) are defined there."""
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    class_folders = _class_folders()
    mappings = [getattr(modeling_auto, name) for name in ("MODEL_MAPPING_NAMES", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
                                                           "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES")
                if hasattr(modeling_auto, name)]
    by_folder: dict[str, list[str]] = {}
    for model_type in CONFIG_MAPPING_NAMES:
        homes = {model_type_to_module_name(model_type)}
        for mapping in mappings:
            names = mapping.get(model_type)
            for name in ([names] if isinstance(names, str) else list(names or ())):
                if name in class_folders:
                    homes.add(class_folders[name])
        for home in sorted(homes & folders):
            by_folder.setdefault(home, []).append(model_type)
    return by_folder


@dataclass(frozen=True)
class _ExpertsCode:
    interface: tuple[str, ...]  # experts classes whose forward is the interface's
    overriding: tuple[str, ...]  # subclasses of an interface class that replace its forward
    plain: tuple[str, ...]  # classes holding fused experts without the interface


def _class_bodies(text: str) -> dict[str, str]:
    """Class name -> its source text (up to the next top-level class)."""
    starts = [(match.start(), match.group(1)) for match in _CLASS.finditer(text)]
    return {name: text[start:(starts[index + 1][0] if index + 1 < len(starts) else len(text))]
            for index, (start, name) in enumerate(starts)}


def _experts_code(folder: str) -> _ExpertsCode:
    interface, overriding, plain = [], [], []
    for stem, text in _modeling_sources(_models_folder() / folder).items():
        try:
            module = importlib.import_module(f"transformers.models.{folder}.{stem}")
        except Exception:  # a module that needs an optional dependency: judged from its source alone
            module = None
        for name, body in _class_bodies(text).items():
            cls = getattr(module, name, None) if module is not None else None
            if isinstance(cls, type) and _decorated_forward(cls):
                interface.append(name)
            elif isinstance(cls, type) and overrides_interface_class(cls):
                overriding.append(name)
            elif re.search(r"self\.gate_up_proj\s*=\s*nn\.Parameter", body):
                plain.append(name)
    return _ExpertsCode(tuple(interface), tuple(overriding), tuple(plain))


def _verdict(folder: str, model_types: tuple[str, ...]) -> InstalledFamily:
    by_model_type = {model_type: family for family in FAMILIES for model_type in family.block_classes}
    family = next((by_model_type[t] for t in model_types if t in by_model_type), None)
    refusal = next((REFUSED_MODEL_TYPES[t] for t in model_types if t in REFUSED_MODEL_TYPES), None)
    code = _experts_code(folder)
    if family is not None and at_least(family.min_transformers):
        return InstalledFamily(folder, model_types, "supported", "block", family, None, "", code.interface)
    if refusal is not None and refusal.hard:
        return InstalledFamily(folder, model_types, "refused", "-", family, refusal, refusal.reason, code.interface)
    if code.interface and not code.overriding:
        why = (f"the {family.name} row describes Transformers >= {family.min_transformers}" if family is not None
               else refusal.reason if refusal is not None else "no routing row in the family table")
        return InstalledFamily(folder, model_types, "supported", "experts", family, refusal,
                               f"experts level: {why}", code.interface)
    if code.overriding:
        reason = (f"{', '.join(code.overriding)} override(s) the forward of the uniform experts interface "
                  "(@use_experts_implementation), computing what its flags do not describe")
    else:
        classes = ", ".join(code.plain) or "no decorated experts class"
        reason = (f"fused experts without Transformers' uniform experts interface ({classes}): the experts are not "
                  "called with the routed expert of each row, so they cannot be dispatched")
    if refusal is not None:
        reason = f"{refusal.reason} ({reason})"
    return InstalledFamily(folder, model_types, "refused", "-", family, refusal, reason, code.interface)


@lru_cache(maxsize=None)
def _installed(version: str) -> tuple[InstalledFamily, ...]:
    folders = fused_expert_folders()
    types_by_folder = _model_types_by_folder(set(folders))
    return tuple(_verdict(folder, tuple(types_by_folder.get(folder, [folder]))) for folder in folders)


def installed_families() -> list[InstalledFamily]:
    """Every fused-experts family of the installed Transformers with its verdict and mode."""
    return list(_installed(str(transformers_version())))


def summary(families: list[InstalledFamily]) -> str:
    counts: dict[str, int] = {}
    for family in families:
        key = f"{family.status} ({family.mode})" if family.status == "supported" else family.status
        counts[key] = counts.get(key, 0) + 1
    parts = ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
    types = sum(len(family.model_types) for family in families)
    return (f"transformers {transformers_version()}: {len(families)} fused-experts MoE families ({types} model "
            f"types): {parts}")
