"""Qwen3-MoE and Qwen2-MoE: softmax, top-k, renormalised if ``norm_topk_prob``, weights cast
to the hidden dtype. Qwen2-MoE adds a sigmoid-gated shared expert."""

from autoep.presets.base import Preset
from autoep.presets.mixtral import recorded_router_output
from autoep.routing import RoutingSpec


def _routing(config, num_experts: int, top_k: int) -> RoutingSpec:
    return RoutingSpec(
        num_experts=num_experts,
        top_k=top_k,
        score_func="softmax",
        renormalize=bool(config.norm_topk_prob),
        weights_dtype="hidden",
        recorded_output=recorded_router_output(),
    )


PRESET = Preset(
    name="qwen3_moe",
    display_name="Qwen3-MoE / Qwen2-MoE",
    block_classes={"qwen3_moe": "Qwen3MoeSparseMoeBlock", "qwen2_moe": "Qwen2MoeSparseMoeBlock"},
    min_transformers="5.0.0",
    num_experts_fields=("num_experts",),
    top_k_field="num_experts_per_tok",
    intermediate_field="moe_intermediate_size",
    routing=_routing,
    shared={"qwen2_moe": ("shared_expert", "shared_expert_gate")},
    notes="also covers Qwen2-MoE (sigmoid-gated shared expert)",
)
