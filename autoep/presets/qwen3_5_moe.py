"""Qwen3.5-MoE text backbone: softmax, top-k, always renormalised, weights cast to the
hidden dtype, sigmoid-gated shared expert."""

from autoep.presets.base import Preset
from autoep.presets.mixtral import recorded_router_output
from autoep.routing import RoutingSpec


def _routing(config, num_experts: int, top_k: int) -> RoutingSpec:
    return RoutingSpec(
        num_experts=num_experts,
        top_k=top_k,
        score_func="softmax",
        renormalize=True,
        weights_dtype="hidden",
        recorded_output=recorded_router_output(),
    )


PRESET = Preset(
    name="qwen3_5_moe",
    display_name="Qwen3.5-MoE",
    block_classes={"qwen3_5_moe_text": "Qwen3_5MoeSparseMoeBlock", "qwen3_5_moe": "Qwen3_5MoeSparseMoeBlock"},
    min_transformers="5.2.0",
    num_experts_fields=("num_experts",),
    top_k_field="num_experts_per_tok",
    intermediate_field="moe_intermediate_size",
    routing=_routing,
    shared={
        "qwen3_5_moe_text": ("shared_expert", "shared_expert_gate"),
        "qwen3_5_moe": ("shared_expert", "shared_expert_gate"),
    },
    notes="model type qwen3_5_moe_text (the VLM's language model is found too)",
)
