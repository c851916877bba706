"""What one row of the family table declares: a MoE family's block, config fields and routing.

A row is data, not code: detection, the layer, the reference, the matrix and ``autoep inspect``
all read it. The routing is a :class:`Routing` row, a declaration of where each RoutingSpec
decision comes from (a constant of the family, or a named field of the model config).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from autoep.routing import GroupScore, RoutingSpec, ScoreFunc
from autoep.versions import at_least

# When group-limited routing applies:
#   "none"         never
#   "n_group>1"    when config.n_group > 1 (DeepSeek-V3 family)
#   "topk_method"  when config.topk_method == "group_limited_greedy" (DeepSeek-V2 family);
#                  "greedy" routes over all experts whatever n_group says
Grouping = Literal["none", "n_group>1", "topk_method"]
# What the router puts in Transformers' `router_logits` slot (the aux loss input):
#   "logits"                     raw logits
#   "probabilities"              softmax probabilities
#   "probabilities_before_5.3"   probabilities on Transformers 5.0-5.2, raw logits from 5.3
Recorded = Literal["logits", "probabilities", "probabilities_before_5.3"]
TOPK_METHODS = ("greedy", "group_limited_greedy")


@dataclass(frozen=True)
class Routing:
    """A family's routing, declared. Each field is one decision; a ``str`` in ``renormalize``
    names the boolean config field that decides (``"norm_topk_prob"``)."""

    score_func: ScoreFunc = "softmax"
    matmul_fp32: bool = False
    correction_bias: bool = False
    grouping: Grouping = "none"
    group_score: GroupScore | None = None
    renormalize: bool | str = False
    renormalize_epsilon: float = 0.0
    scale_field: str | None = None  # config field holding the routed scaling factor
    weights_dtype: Literal["float32", "hidden"] = "float32"
    recorded: Recorded = "logits"
    # Top-k on the raw logits, then the softmax over the k chosen logits only (GraniteMoE, JetMoE);
    # False: softmax/sigmoid over all experts, then top-k on the scores.
    softmax_after_topk: bool = False
    # The router records its logits upcast to float32 (GraniteMoE's `.float()`).
    record_float32: bool = False

    def __post_init__(self) -> None:
        if (self.grouping == "none") != (self.group_score is None):
            raise ValueError(f"Routing: grouping={self.grouping!r} and group_score={self.group_score!r} disagree")
        if self.softmax_after_topk and (self.score_func != "softmax" or self.correction_bias
                                        or self.grouping != "none"):
            raise ValueError("Routing: softmax_after_topk needs score_func='softmax', no correction bias and "
                             "grouping='none'")

    @property
    def kind(self) -> str:
        """The routing kind (what the matrix must cover at least once): score function, correction
        bias, group rule. Renormalisation and scaling are switches within a kind."""
        parts = ["topk-then-softmax" if self.softmax_after_topk else self.score_func]
        if self.correction_bias:
            parts.append("bias")
        if self.grouping != "none":
            parts.append(f"groups-{self.group_score}")
        return "+".join(parts)

    def __call__(self, config: Any, num_experts: int, top_k: int) -> RoutingSpec:
        """The RoutingSpec of a model with this config (``num_experts``/``top_k`` resolved)."""
        grouped = self._grouped(config)
        return RoutingSpec(
            num_experts=num_experts,
            top_k=top_k,
            score_func=self.score_func,
            router_matmul_fp32=self.matmul_fp32,
            use_correction_bias=self.correction_bias,
            num_groups=config.n_group if grouped else None,
            topk_groups=config.topk_group if grouped else None,
            group_score=self.group_score if grouped else None,
            renormalize=bool(getattr(config, self.renormalize)) if isinstance(self.renormalize, str)
            else self.renormalize,
            renormalize_epsilon=self.renormalize_epsilon,
            scale=float(getattr(config, self.scale_field)) if self.scale_field else 1.0,
            weights_dtype=self.weights_dtype,
            recorded_output=self._recorded(),
            softmax_after_topk=self.softmax_after_topk,
            recorded_float32=self.record_float32,
        )

    def _grouped(self, config: Any) -> bool:
        if self.grouping == "n_group>1":
            return config.n_group is not None and config.n_group > 1
        if self.grouping == "topk_method":
            method = getattr(config, "topk_method", "greedy")
            if method not in TOPK_METHODS:
                raise ValueError(f"model.config.topk_method={method!r} is not supported; supported: "
                                 f"{', '.join(repr(m) for m in TOPK_METHODS)}.")
            return method == "group_limited_greedy"
        return False

    def _recorded(self) -> Literal["logits", "probabilities"]:
        if self.recorded == "probabilities_before_5.3":
            # Transformers 5.0-5.2 put softmax probabilities in the router_logits slot of the
            # Mixtral/Qwen routers; 5.3+ put the raw logits there. The aux loss reads that slot.
            return "logits" if at_least("5.3.0") else "probabilities"
        return self.recorded


@dataclass(frozen=True)
class Preset:
    """One family of the table (``preset_model`` names it)."""

    name: str
    display_name: str
    # model.config.model_type values this family covers, with the block class name of each.
    block_classes: dict[str, str]
    # The first Transformers version whose block this row describes (older ones are refused).
    min_transformers: str
    # Config fields (tried in order) that hold the expert count, top-k and expert width.
    num_experts_fields: tuple[str, ...]
    top_k_field: str
    intermediate_field: str
    routing: Routing
    router_attr: str = "gate"
    experts_attr: str = "experts"
    gate_up_name: str = "gate_up_proj"
    down_name: str = "down_proj"
    # Shared experts per model type: (shared expert MLP attribute, sigmoid gate attribute or None
    # for an ungated shared expert).
    shared: dict[str, tuple[str, str | None]] | None = None
    # The experts compute the clamped GPT-OSS SwiGLU, (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)
    # with g = clamp(gate, max=limit), instead of act_fn(gate) * up: the names of the experts' (and
    # shared expert's) attributes that hold (alpha, limit). None: act_fn(gate) * up, and experts
    # with clamp settings or their own _apply_gate are refused.
    clamped_swiglu: tuple[str, str] | None = None
    # The DeepSpeed AutoEP preset of the same name exists (the peer claims this family).
    deepspeed_preset: bool = False
    notes: str = ""

    def shared_for(self, model_type: str) -> tuple[str | None, str | None]:
        return (self.shared or {}).get(model_type, (None, None))

    def row(self) -> dict[str, object]:
        """One line of `autoep inspect --families`."""
        shared = sorted({"gated" if gate else "ungated" for _, gate in (self.shared or {}).values()})
        return {
            "family": self.name,
            "model_types": ", ".join(self.block_classes),
            "routing": self.routing.kind,
            "renormalize": self.routing.renormalize,
            "scale": self.routing.scale_field or "-",
            "shared": "/".join(shared) or "-",
            "transformers": f">={self.min_transformers}",
        }


Family = Preset


@dataclass(frozen=True)
class Refusal:
    """A family of Transformers that AutoEP refuses, with the exact reason."""

    model_types: tuple[str, ...]
    reason: str
    # The Transformers versions the reason was established on.
    versions: str = ">=5.24.0"
    # True: refused whatever the mode (not even its experts module can be made expert-parallel
    # exactly). False: the reason is why the table has no routing row; the family runs at the
    # experts level where its experts module has the uniform interface.
    hard: bool = False
