"""DeepSeek-V2: float32 router matmul, softmax, greedy or group-limited greedy (group
score = max), never renormalised, scaled by ``routed_scaling_factor``; ungated shared experts."""

from autoep.presets.base import Preset
from autoep.routing import RoutingSpec


def _routing(config, num_experts: int, top_k: int) -> RoutingSpec:
    method = getattr(config, "topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise ValueError(
            f"model.config.topk_method={method!r} is not supported by the deepseek_v2 preset; "
            "supported: 'greedy', 'group_limited_greedy'.")
    grouped = method == "group_limited_greedy"
    return RoutingSpec(
        num_experts=num_experts,
        top_k=top_k,
        score_func="softmax",
        router_matmul_fp32=True,
        num_groups=config.n_group if grouped else None,
        topk_groups=config.topk_group if grouped else None,
        group_score="max" if grouped else None,
        renormalize=False,
        scale=float(config.routed_scaling_factor),
        weights_dtype="float32",
    )


PRESET = Preset(
    name="deepseek_v2",
    display_name="DeepSeek-V2",
    block_classes={"deepseek_v2": "DeepseekV2Moe"},
    min_transformers="5.0.0",
    num_experts_fields=("n_routed_experts",),
    top_k_field="num_experts_per_tok",
    intermediate_field="moe_intermediate_size",
    routing=_routing,
    shared={"deepseek_v2": ("shared_experts", None)},
    notes="greedy and group_limited_greedy; load_balance_coeff must stay null",
)
