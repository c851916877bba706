"""Mixtral: softmax over all experts, top-k, always renormalised, float32 weights."""

from autoep.presets.base import Preset
from autoep.routing import RoutingSpec
from autoep.versions import at_least


def recorded_router_output() -> str:
    # Transformers 5.0-5.2 put softmax probabilities in the router_logits slot of the
    # Mixtral/Qwen routers; 5.3+ put the raw logits there. The aux loss is computed from
    # that slot, so the layer records what the installed version records.
    return "logits" if at_least("5.3.0") else "probabilities"


def _routing(config, num_experts: int, top_k: int) -> RoutingSpec:
    return RoutingSpec(
        num_experts=num_experts,
        top_k=top_k,
        score_func="softmax",
        renormalize=True,
        weights_dtype="float32",
        recorded_output=recorded_router_output(),
    )


PRESET = Preset(
    name="mixtral",
    display_name="Mixtral",
    block_classes={"mixtral": "MixtralSparseMoeBlock"},
    min_transformers="5.0.0",
    num_experts_fields=("num_local_experts",),
    top_k_field="num_experts_per_tok",
    intermediate_field="intermediate_size",
    routing=_routing,
)
