"""The dense single-device reference MoE, written from the routing math.

It reads a RoutingSpec (the *description* shared with autoep) and the block's weights,
and computes every token one at a time with plain Python loops: no sort, no grouped
GEMM, no code from ``autoep/`` or Transformers. Routing decisions use Python floats and
an explicit tie rule (higher score first, then lower index), so they can be read and
checked by hand. ``compute_dtype=torch.float64`` gives a float64 oracle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# The only imported names: the description of the routing, not its implementation.
from autoep.routing import RoutingSpec


@dataclass
class TokenRoute:
    experts: list[int]           # chosen experts, best first
    weights: list[torch.Tensor]  # their combine weights (0-d tensors, differentiable)


def _softmax(values: torch.Tensor) -> torch.Tensor:
    shifted = values - values.max()
    exps = torch.exp(shifted)
    return exps / exps.sum()


def _sigmoid(values: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-values))


def _ranked(values: list[float], candidates: list[int]) -> list[int]:
    """Candidates ordered best first; equal values keep the lower index first."""
    return sorted(candidates, key=lambda index: (-values[index], index))


def route_token(spec: RoutingSpec, logits_E: torch.Tensor, correction_bias: list[float] | None,
                weights_dtype: torch.dtype) -> TokenRoute:
    """Route one token from its router logits."""
    if spec.softmax_after_topk:
        return _route_token_softmax_after_topk(spec, logits_E, weights_dtype)
    scores_E = _softmax(logits_E) if spec.score_func == "softmax" else _sigmoid(logits_E)
    score_values = [float(score) for score in scores_E.detach()]
    choice = list(score_values)
    if spec.use_correction_bias:
        choice = [score + bias for score, bias in zip(score_values, correction_bias)]

    allowed = list(range(spec.num_experts))
    if spec.num_groups is not None:
        group_size = spec.num_experts // spec.num_groups
        group_scores = []
        for group in range(spec.num_groups):
            members = sorted((choice[e] for e in range(group * group_size, (group + 1) * group_size)), reverse=True)
            group_scores.append(members[0] if spec.group_score == "max" else members[0] + members[1])
        kept_groups = _ranked(group_scores, list(range(spec.num_groups)))[: spec.topk_groups]
        allowed = [e for e in allowed if e // group_size in kept_groups]

    chosen = _ranked(choice, allowed)[: spec.top_k]
    return TokenRoute(chosen, _final_weights(spec, [scores_E[e] for e in chosen], weights_dtype))


def _route_token_softmax_after_topk(spec: RoutingSpec, logits_E: torch.Tensor,
                                    weights_dtype: torch.dtype) -> TokenRoute:
    """The k largest raw logits are chosen; their weights are the softmax of those k logits alone:
    w_i = exp(l_i) / sum over the chosen j of exp(l_j)."""
    logit_values = [float(logit) for logit in logits_E.detach()]
    chosen = _ranked(logit_values, list(range(spec.num_experts)))[: spec.top_k]
    chosen_logits = torch.stack([logits_E[e] for e in chosen])
    weights = list(_softmax(chosen_logits))
    return TokenRoute(chosen, _final_weights(spec, weights, weights_dtype))


def _final_weights(spec: RoutingSpec, weights: list[torch.Tensor], weights_dtype: torch.dtype) -> list[torch.Tensor]:
    """Renormalisation (+ epsilon), the routed scale, and the rounding to the hidden dtype."""
    compute_dtype = weights[0].dtype
    if spec.renormalize:
        total = weights[0]
        for weight in weights[1:]:
            total = total + weight
        total = total + spec.renormalize_epsilon
        weights = [weight / total for weight in weights]
    weights = [weight * spec.scale for weight in weights]
    if spec.weights_dtype == "hidden":
        weights = [weight.to(weights_dtype).to(compute_dtype) for weight in weights]
    return weights


def _relu(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, torch.zeros_like(x))


def _softplus(x: torch.Tensor) -> torch.Tensor:
    # log(1 + e^x), written as max(x, 0) + log(1 + e^-|x|) so that it cannot overflow
    return _relu(x) + torch.log1p(torch.exp(-x.abs()))


def _gelu(x: torch.Tensor) -> torch.Tensor:
    # x * Phi(x), Phi the standard normal CDF: (1 + erf(x / sqrt 2)) / 2
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    # Hendrycks & Gimpel's tanh approximation of Phi
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def _relu6(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 6.0, torch.full_like(x, 6.0), _relu(x))


# The experts' activation by the name autoep.MoELayerSpec.activation gives, each from its formula.
ACTIVATION_FORMULAS = {
    "silu": lambda x: x * _sigmoid(x),
    "gelu": _gelu,
    "gelu_tanh": _gelu_tanh,
    "gelu_10": lambda x: torch.clamp(_gelu(x), -10.0, 10.0),
    "quick_gelu": lambda x: x * _sigmoid(1.702 * x),
    "relu": _relu,
    "relu2": lambda x: _relu(x) * _relu(x),
    "relu6": _relu6,
    "leaky_relu": lambda x: torch.where(x > 0, x, 0.01 * x),
    "hardswish": lambda x: x * _relu6(x + 3.0) / 6.0,
    "mish": lambda x: x * torch.tanh(_softplus(x)),
    "sigmoid": _sigmoid,
    "tanh": torch.tanh,
    "laplace": lambda x: 0.5 * (1.0 + torch.erf((x - 0.707107) / (0.282095 * math.sqrt(2.0)))),
    "sqrtsoftplus": lambda x: torch.sqrt(_softplus(x)),
    "linear": lambda x: x,
}


def activation_formula(name: str | None):
    if name not in ACTIVATION_FORMULAS:
        raise ValueError(f"the reference has no formula for activation {name!r}; it knows "
                         f"{', '.join(ACTIVATION_FORMULAS)}")
    return ACTIVATION_FORMULAS[name]


def _clamped_swiglu(gate_I: torch.Tensor, up_I: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS's gated unit: the gate capped above at +limit, the up part clipped to [-limit, limit]
    and shifted by one: (u + 1) * g * sigmoid(alpha * g)."""
    g = torch.where(gate_I > limit, torch.full_like(gate_I, limit), gate_I)
    u = torch.where(up_I > limit, torch.full_like(up_I, limit), up_I)
    u = torch.where(u < -limit, torch.full_like(u, -limit), u)
    return (u + 1.0) * (g * _sigmoid(alpha * g))


# Gated units with parameters, by name: (gate, up, *params) -> hidden.
GATED_FORMULAS = {"swiglu_clamped": _clamped_swiglu}


def _swiglu(x_H: torch.Tensor, gate_IH: torch.Tensor, up_IH: torch.Tensor, down_HI: torch.Tensor,
            activation: str = "silu", params: tuple[float, ...] = (), model_dtype: torch.dtype | None = None
            ) -> torch.Tensor:
    """down(act(gate x) * up x): SwiGLU for silu, GeGLU for gelu, ...; or down(unit(gate x, up x,
    *params)) for a gated unit of GATED_FORMULAS. ``model_dtype``: the dtype the experts' gate/up
    projection emits; a gated unit's clamps act on those rounded values (the clamp's derivative
    jumps at +-limit, where a value computed in float32 and its bfloat16 rounding can fall on
    either side)."""
    if activation in GATED_FORMULAS:
        gate_I, up_I = gate_IH @ x_H, up_IH @ x_H
        if model_dtype is not None and model_dtype != gate_I.dtype:
            gate_I, up_I = gate_I.to(model_dtype).to(gate_I.dtype), up_I.to(model_dtype).to(up_I.dtype)
        return down_HI @ GATED_FORMULAS[activation](gate_I, up_I, *params)
    return down_HI @ (activation_formula(activation)(gate_IH @ x_H) * (up_IH @ x_H))


@dataclass
class BlockWeights:
    """One MoE block's weights in the reference's own terms."""

    router_EH: torch.Tensor
    gate_up_E2IH: torch.Tensor
    down_EHI: torch.Tensor
    correction_bias_E: torch.Tensor | None = None
    shared_gate_IH: torch.Tensor | None = None
    shared_up_IH: torch.Tensor | None = None
    shared_down_HI: torch.Tensor | None = None
    shared_gate_vector_H: torch.Tensor | None = None  # sigmoid-gated shared expert
    activation: str = "silu"               # the routed experts' (a name in ACTIVATION_FORMULAS)
    shared_activation: str | None = "silu"  # the shared expert's
    activation_params: tuple[float, ...] = ()         # (alpha, limit) of "swiglu_clamped"
    shared_activation_params: tuple[float, ...] = ()


def reference_block(spec: RoutingSpec, weights: BlockWeights, hidden_TH: torch.Tensor,
                    compute_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, list[TokenRoute]]:
    """Compute one MoE block. Returns (output_TH in the input dtype, logits_TE in the
    compute dtype, per-token routes)."""
    model_dtype = hidden_TH.dtype
    compute = compute_dtype or (torch.float32 if model_dtype in (torch.bfloat16, torch.float16) else model_dtype)
    x_TH = hidden_TH.to(compute)
    router_EH = weights.router_EH.to(compute)
    bias = None if weights.correction_bias_E is None else [float(b) for b in weights.correction_bias_E]
    intermediate = weights.down_EHI.shape[2]
    outputs, logits_rows, routes = [], [], []
    for token in range(x_TH.shape[0]):
        x_H = x_TH[token]
        logits_E = router_EH @ x_H
        if not spec.router_matmul_fp32:
            logits_E = logits_E.to(model_dtype).to(compute)  # the router runs in the model dtype
        route = route_token(spec, logits_E, bias, weights_dtype=model_dtype)
        out_H = torch.zeros_like(x_H)
        for expert, weight in zip(route.experts, route.weights):
            gate_up = weights.gate_up_E2IH[expert].to(compute)
            y_H = _swiglu(x_H, gate_up[:intermediate], gate_up[intermediate:], weights.down_EHI[expert].to(compute),
                          weights.activation, weights.activation_params, model_dtype)
            if model_dtype != compute:
                y_H = y_H.to(model_dtype).to(compute)  # experts emit the model dtype
            out_H = out_H + weight * y_H
        out_H = out_H.to(model_dtype).to(compute)
        if weights.shared_gate_IH is not None:
            shared_H = _swiglu(x_H, weights.shared_gate_IH.to(compute), weights.shared_up_IH.to(compute),
                               weights.shared_down_HI.to(compute), weights.shared_activation,
                               weights.shared_activation_params, model_dtype)
            if weights.shared_gate_vector_H is not None:
                shared_H = _sigmoid(weights.shared_gate_vector_H.to(compute) @ x_H) * shared_H
            out_H = out_H + shared_H
        outputs.append(out_H)
        logits_rows.append(logits_E)
        routes.append(route)
    if not outputs:
        return hidden_TH.new_zeros(hidden_TH.shape), hidden_TH.new_zeros(0, spec.num_experts, dtype=compute), []
    return torch.stack(outputs).to(model_dtype), torch.stack(logits_rows), routes


def load_balancing_loss(layer_logits: list[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    """Switch-Transformer balance loss over all layers' tokens:
    ``E * sum_e (routed slots to e / tokens) * mean_t softmax(logits_t)[e]``, where the routed
    slots are each token's top-k by softmax probability (the formula Transformers uses)."""
    rows = [row for logits in layer_logits for row in logits]
    num_tokens = len(rows)
    slot_counts = [0] * num_experts
    probability_sums = None
    for row in rows:
        probabilities = _softmax(row.float() if row.dtype != torch.float64 else row)
        values = [float(p) for p in probabilities.detach()]
        for expert in _ranked(values, list(range(num_experts)))[:top_k]:
            slot_counts[expert] += 1
        probability_sums = probabilities if probability_sums is None else probability_sums + probabilities
    total = probability_sums[0] * 0.0
    for expert in range(num_experts):
        total = total + (slot_counts[expert] / num_tokens) * (probability_sums[expert] / num_tokens)
    return total * num_experts


def decision_margin(spec: RoutingSpec, logits_E: torch.Tensor, correction_bias: list[float] | None) -> float:
    """The smallest gap, in the values the routing compares, at any boundary where a decision
    is made (k-th vs (k+1)-th expert, kept vs dropped group). Near zero means a near-tie: two
    correct implementations that round differently may choose differently there."""
    if spec.score_func == "softmax" and not spec.use_correction_bias:
        # softmax is monotone: every comparison can be made on the logits, where rounding happens
        choice = [float(logit) for logit in logits_E]
    else:
        scores_E = _softmax(logits_E) if spec.score_func == "softmax" else _sigmoid(logits_E)
        choice = [float(score) for score in scores_E]
        if spec.use_correction_bias:
            choice = [value + bias for value, bias in zip(choice, correction_bias)]
    margins = [float("inf")]
    allowed = list(range(spec.num_experts))
    if spec.num_groups is not None and spec.topk_groups < spec.num_groups:
        group_size = spec.num_experts // spec.num_groups
        group_scores = []
        for group in range(spec.num_groups):
            members = sorted((choice[e] for e in range(group * group_size, (group + 1) * group_size)), reverse=True)
            group_scores.append(members[0] if spec.group_score == "max" else members[0] + members[1])
        ranked_groups = _ranked(group_scores, list(range(spec.num_groups)))
        margins.append(group_scores[ranked_groups[spec.topk_groups - 1]] - group_scores[ranked_groups[spec.topk_groups]])
        allowed = [e for e in allowed if e // group_size in ranked_groups[: spec.topk_groups]]
    ranked = _ranked(choice, allowed)
    if spec.top_k < len(ranked):
        margins.append(choice[ranked[spec.top_k - 1]] - choice[ranked[spec.top_k]])
    return min(margins)
