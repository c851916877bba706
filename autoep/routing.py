"""RoutingSpec (one description of a family's routing) and the fast router that implements it.

``reference/`` implements the same spec again, plainly, with no code shared with this
module. Every decision is a field; none is hidden in code.

Tie rule (both implementations): among equal scores the lower expert index (or group
index) wins. The fast path gets this from a stable descending sort, which torch
guarantees on every device, unlike ``torch.topk``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F

ScoreFunc = Literal["softmax", "sigmoid"]
GroupScore = Literal["max", "top2_sum"]


@dataclass(frozen=True)
class RoutingSpec:
    num_experts: int
    top_k: int
    score_func: ScoreFunc = "softmax"
    # Router matmul in float32 (DeepSeek) or in the hidden dtype (Mixtral, Qwen).
    router_matmul_fp32: bool = False
    # Choose experts on scores + e_score_correction_bias (DeepSeek-V3); weights use scores.
    use_correction_bias: bool = False
    # Group-limited top-k: keep `topk_groups` of `num_groups` groups ranked by `group_score`.
    num_groups: int | None = None
    topk_groups: int | None = None
    group_score: GroupScore | None = None
    renormalize: bool = False
    renormalize_epsilon: float = 0.0
    scale: float = 1.0
    # Routing weights handed to the combine: kept float32, or cast to the hidden dtype
    # first (Qwen families), which rounds them in bf16.
    weights_dtype: Literal["float32", "hidden"] = "float32"
    # What the router exposes in Transformers' `router_logits` slot (aux loss input):
    # raw logits, or softmax probabilities (Mixtral/Qwen on Transformers 5.0-5.2).
    recorded_output: Literal["logits", "probabilities"] = "logits"
    # The recorded quantity is upcast to float32 (GraniteMoE records `logits.float()`): in bf16 the
    # aux loss's softmax then runs in float32, as the stock model's does.
    recorded_float32: bool = False
    # Softmax after top-k (GraniteMoE, JetMoE, GPT-OSS): the k experts are chosen on the raw
    # logits and their weights are the softmax over those k logits only. False: the score
    # function is applied over all experts first and the top-k taken on the scores.
    softmax_after_topk: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
        if self.softmax_after_topk and (self.score_func != "softmax" or self.use_correction_bias
                                        or self.num_groups is not None):
            raise ValueError(
                f"softmax_after_topk needs score_func='softmax' without correction bias or groups, got "
                f"score_func={self.score_func!r}, use_correction_bias={self.use_correction_bias}, "
                f"num_groups={self.num_groups}")
        if self.num_groups is not None:
            if self.topk_groups is None or self.group_score is None:
                raise ValueError("group-limited routing needs num_groups, topk_groups and group_score")
            if self.num_experts % self.num_groups:
                raise ValueError(f"num_experts={self.num_experts} is not divisible by n_group={self.num_groups}")
            if not 1 <= self.topk_groups <= self.num_groups:
                raise ValueError(f"topk_group={self.topk_groups} must be between 1 and n_group={self.num_groups}")
            group_size = self.num_experts // self.num_groups
            if self.group_score == "top2_sum" and group_size < 2:
                raise ValueError(f"group score 'sum of top-2' needs >= 2 experts per group, got {group_size}")
            if self.top_k > self.topk_groups * group_size:
                raise ValueError(
                    f"top_k={self.top_k} exceeds the {self.topk_groups * group_size} experts in the "
                    f"topk_group={self.topk_groups} kept groups of {group_size}")

    def with_overrides(self, **changes) -> "RoutingSpec":
        return replace(self, **changes)

    def describe(self) -> str:
        parts = [f"{self.score_func}", f"top{self.top_k}/{self.num_experts}"]
        if self.softmax_after_topk:
            parts = [f"top{self.top_k}/{self.num_experts} on logits", "softmax over the k"]
        if self.use_correction_bias:
            parts.append("bias")
        if self.num_groups:
            parts.append(f"groups {self.topk_groups}/{self.num_groups} by {self.group_score}")
        parts.append("renorm" if self.renormalize else "no-renorm")
        if self.scale != 1.0:
            parts.append(f"x{self.scale:g}")
        return ", ".join(parts)


def _descending_order(values: torch.Tensor) -> torch.Tensor:
    """Indices that sort the last dim descending; ties keep the lower index first."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices


def router_logits(spec: RoutingSpec, hidden_TH: torch.Tensor, weight_EH: torch.Tensor) -> torch.Tensor:
    if spec.router_matmul_fp32:
        return F.linear(hidden_TH.float(), weight_EH.float())
    return F.linear(hidden_TH, weight_EH)


def route(
    spec: RoutingSpec,
    hidden_TH: torch.Tensor,
    weight_EH: torch.Tensor,
    correction_bias_E: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route tokens. Returns (recorded_TE, weights_TK, expert_ids_TK).

    ``recorded_TE`` is what Transformers records as ``router_logits``; ``weights_TK`` is
    float32 or hidden-dtype per the spec; ``expert_ids_TK`` is int64, best expert first.
    """
    logits_TE = router_logits(spec, hidden_TH, weight_EH)
    # Scores in float32, or float64 for a float64 model (never below float32).
    score_dtype = torch.promote_types(logits_TE.dtype, torch.float32)
    if spec.softmax_after_topk:
        return _route_softmax_after_topk(spec, hidden_TH, logits_TE, score_dtype)
    if spec.score_func == "softmax":
        scores_TE = torch.softmax(logits_TE.to(score_dtype), dim=-1)
    else:
        scores_TE = torch.sigmoid(logits_TE.to(score_dtype))

    choice_TE = scores_TE
    if spec.use_correction_bias:
        if correction_bias_E is None:
            raise ValueError("RoutingSpec.use_correction_bias is set but the router has no e_score_correction_bias")
        choice_TE = scores_TE + correction_bias_E.to(score_dtype)

    if spec.num_groups is not None:
        num_tokens = choice_TE.shape[0]
        choice_TGS = choice_TE.view(num_tokens, spec.num_groups, spec.num_experts // spec.num_groups)
        if spec.group_score == "max":
            group_scores_TG = choice_TGS.max(dim=-1).values
        else:
            group_scores_TG = choice_TGS.topk(2, dim=-1).values.sum(dim=-1)
        kept_groups_TG = _descending_order(group_scores_TG)[:, : spec.topk_groups]
        keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, kept_groups_TG, True)
        keep_TE = keep_TG.repeat_interleave(spec.num_experts // spec.num_groups, dim=1)
        choice_TE = choice_TE.masked_fill(~keep_TE, float("-inf"))

    expert_ids_TK = _descending_order(choice_TE)[:, : spec.top_k]
    weights_TK = _finish_weights(spec, scores_TE.gather(1, expert_ids_TK), hidden_TH.dtype)

    recorded_TE = logits_TE if spec.recorded_output == "logits" else scores_TE
    return _recorded(spec, recorded_TE), weights_TK, expert_ids_TK


def _recorded(spec: RoutingSpec, recorded_TE: torch.Tensor) -> torch.Tensor:
    if spec.recorded_float32:
        return recorded_TE.to(torch.promote_types(recorded_TE.dtype, torch.float32))
    return recorded_TE


def _finish_weights(spec: RoutingSpec, weights_TK: torch.Tensor, hidden_dtype: torch.dtype) -> torch.Tensor:
    if spec.renormalize:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + spec.renormalize_epsilon)
    if spec.scale != 1.0:
        weights_TK = weights_TK * spec.scale
    if spec.weights_dtype == "hidden":
        weights_TK = weights_TK.to(hidden_dtype)
    return weights_TK


def _route_softmax_after_topk(spec: RoutingSpec, hidden_TH: torch.Tensor, logits_TE: torch.Tensor,
                              score_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of the raw logits, then the softmax over the k chosen logits."""
    choice_TE = logits_TE.to(score_dtype)
    expert_ids_TK = _descending_order(choice_TE)[:, : spec.top_k]
    weights_TK = torch.softmax(choice_TE.gather(1, expert_ids_TK), dim=-1)
    weights_TK = _finish_weights(spec, weights_TK, hidden_TH.dtype)
    recorded_TE = logits_TE if spec.recorded_output == "logits" else torch.softmax(choice_TE, dim=-1)
    return _recorded(spec, recorded_TE), weights_TK, expert_ids_TK
