"""DeepSeek-V3: float32 router matmul, sigmoid scores, experts chosen on scores +
``e_score_correction_bias`` (a buffer) within the best ``topk_group`` of ``n_group`` groups
(group score = sum of its top-2), renormalised if ``norm_topk_prob`` (+1e-20), scaled by
``routed_scaling_factor``; ungated shared experts."""

from autoep.presets.base import Preset
from autoep.routing import RoutingSpec


def _routing(config, num_experts: int, top_k: int) -> RoutingSpec:
    grouped = config.n_group is not None and config.n_group > 1
    return RoutingSpec(
        num_experts=num_experts,
        top_k=top_k,
        score_func="sigmoid",
        router_matmul_fp32=True,
        use_correction_bias=True,
        num_groups=config.n_group if grouped else None,
        topk_groups=config.topk_group if grouped else None,
        group_score="top2_sum" if grouped else None,
        renormalize=bool(config.norm_topk_prob),
        renormalize_epsilon=1e-20,
        scale=float(config.routed_scaling_factor),
        weights_dtype="float32",
    )


PRESET = Preset(
    name="deepseek_v3",
    display_name="DeepSeek-V3",
    block_classes={"deepseek_v3": "DeepseekV3MoE"},
    min_transformers="5.0.0",
    num_experts_fields=("n_routed_experts",),
    top_k_field="num_experts_per_tok",
    intermediate_field="moe_intermediate_size",
    routing=_routing,
    shared={"deepseek_v3": ("shared_experts", None)},
    notes="e_score_correction_bias buffer kept; load_balance_coeff must stay null",
)
