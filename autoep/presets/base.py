"""What a preset declares about one model family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from autoep.routing import RoutingSpec


@dataclass(frozen=True)
class Preset:
    name: str
    display_name: str
    # model.config.model_type values this preset covers, with the block class name of each.
    block_classes: dict[str, str]
    min_transformers: str
    # Config fields (tried in order) that hold the expert count, top-k and expert width.
    num_experts_fields: tuple[str, ...]
    top_k_field: str
    intermediate_field: str
    # Builds the family's RoutingSpec from the model config (num_experts and top_k resolved).
    routing: Callable[[Any, int, int], RoutingSpec]
    router_attr: str = "gate"
    experts_attr: str = "experts"
    gate_up_name: str = "gate_up_proj"
    down_name: str = "down_proj"
    # Shared experts per model type: (shared expert MLP attribute, sigmoid gate attribute or None
    # for an ungated shared expert).
    shared: dict[str, tuple[str, str | None]] | None = None
    notes: str = ""

    def shared_for(self, model_type: str) -> tuple[str | None, str | None]:
        return (self.shared or {}).get(model_type, (None, None))
