"""The reference for experts-level cells: an experts module computed densely from its math.

The stock block's router chooses (its code is the model's own and is not under test); this
module takes the experts and weights it chose, ``top_k_index`` / ``top_k_weights``, and computes
``out[t] = sum_k w[t, k] * expert_e(x_t)`` token by token, slot by slot, with plain tensor
algebra: no sort, no grouped GEMM, no code from ``autoep/`` or Transformers. Each decision of
the interface's flags is written from its formula here:

- the up projection's weight is read ``[out, in]``, or ``[in, out]`` when ``is_transposed``;
- with ``has_bias`` each projection adds its expert's bias row;
- ``has_gate``: the up projection's output splits into gate and up as its two halves
  (``is_concatenated``) or as its even and odd entries (interleaved), and the gate formula of
  :mod:`autoep.presets.gates` combines them; without a gate the activation acts on it;
- ``has_post_expert_norm``: the declared norm formula on each expert's output, before weighting.

Only descriptions are imported from autoep (the flags, the gate formula): never its kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reference.moe import _sigmoid, activation_formula


@dataclass(frozen=True)
class PostNorm:
    """A post-expert norm by its formula: ``input_scaled_rms`` is ``z * rsqrt(mean(z^2) + eps)``
    with ``z = y * (1 + weight)`` (MuseSpark's: scale first, then normalise; the scaled value rounded
    to the model dtype first); ``rms`` is ``y * rsqrt(mean(y^2) + eps) * weight``."""

    kind: str
    eps: float


# norm class name -> kind (its eps and weight are read from the module)
POST_NORMS = {"MuseSparkTextInputScaledRMSNorm": "input_scaled_rms", "RMSNorm": "rms"}


def post_norm_of(module: torch.nn.Module) -> PostNorm | None:
    kind = POST_NORMS.get(type(module).__name__)
    eps = getattr(module, "eps", None) if kind else None
    if kind is None or not isinstance(eps, (int, float)):
        return None
    return PostNorm(kind, float(eps))


def _clamp(x: torch.Tensor, low: float | None, high: float | None) -> torch.Tensor:
    if high is not None:
        x = torch.where(x > high, torch.full_like(x, high), x)
    if low is not None:
        x = torch.where(x < low, torch.full_like(x, low), x)
    return x


def gated_unit(kind: str, params: tuple, activation: str | None, gate: torch.Tensor, up: torch.Tensor
               ) -> torch.Tensor:
    """The gate step of ``kind`` (autoep.presets.gates) on one row's gate and up halves."""
    if kind == "act_glu":
        return activation_formula(activation)(gate) * up
    if kind in ("act_then_clamp", "clamp_then_act", "clamp_then_silu"):
        (limit,) = params
        if limit is None:
            return activation_formula(activation or "silu")(gate) * up
        up = _clamp(up, -limit, limit)
        if kind == "act_then_clamp":
            return _clamp(activation_formula(activation)(gate), None, limit) * up
        act = activation_formula("silu" if kind == "clamp_then_silu" else activation)
        return act(_clamp(gate, None, limit)) * up
    if kind == "clamped_swiglu":
        alpha, limit = params
        g = _clamp(gate, None, limit)
        return (_clamp(up, -limit, limit) + 1.0) * (g * _sigmoid(alpha * g))
    if kind == "softcapped_swiglu":
        gate_cap, up_cap = params
        return gate_cap * torch.tanh(gate / gate_cap) * _sigmoid(gate) * (up_cap * torch.tanh(up / up_cap))
    raise ValueError(f"the reference has no formula for gate kind {kind!r}")


@dataclass
class ExpertsWeights:
    """One experts module's tensors and its description, in the reference's terms."""

    up: torch.Tensor            # [E, out, in], or [E, in, out] when transposed
    down: torch.Tensor
    up_bias: torch.Tensor | None
    down_bias: torch.Tensor | None
    flags: object               # autoep.interface.ExpertsFlags (a description)
    gate: object                # autoep.presets.gates.GateFormula (a description)
    post_norm: PostNorm | None = None
    post_norm_weight: torch.Tensor | None = None
    float32_inside: bool = False  # no rounding to the model dtype between the projections


def _project(weight_e: torch.Tensor, x: torch.Tensor, transposed: bool) -> torch.Tensor:
    # y_j = sum_i W[j, i] x_i  (stored [out, in]);  transposed storage [in, out]: y_j = sum_i W[i, j] x_i
    return x @ weight_e if transposed else weight_e @ x


def expert_output(weights: ExpertsWeights, expert: int, x_H: torch.Tensor, compute: torch.dtype,
                  model_dtype: torch.dtype) -> torch.Tensor:
    """One expert on one row, in ``compute``; values the model would hold in its own dtype before a
    clamp are rounded to it first (a clamp's derivative jumps at its limit)."""
    flags = weights.flags

    def rounded(value: torch.Tensor) -> torch.Tensor:  # a value the model holds in its own dtype
        if model_dtype == compute or weights.float32_inside:
            return value
        return value.to(model_dtype).to(compute)

    # The projection is rounded to the model dtype, then its bias added (and rounded again): the
    # model's GEMM emits its dtype and adds the bias there.
    projected = rounded(_project(weights.up[expert].to(compute), x_H, flags.is_transposed))
    if flags.has_bias:
        projected = rounded(projected + weights.up_bias[expert].to(compute))
    if flags.has_gate:
        half = projected.shape[0] // 2
        if flags.is_concatenated:
            gate, up = projected[:half], projected[half:]
        else:
            gate, up = projected[0::2], projected[1::2]
        gate_formula = weights.gate
        hidden = gated_unit(gate_formula.kind, gate_formula.params, gate_formula.activation, gate, up)
    else:
        hidden = activation_formula(weights.gate.activation)(projected)
    y_H = _project(weights.down[expert].to(compute), hidden, flags.is_transposed)
    if flags.has_bias:
        y_H = rounded(rounded(y_H) + weights.down_bias[expert].to(compute))
    if weights.post_norm is not None:
        y_H = _post_norm(weights, y_H, compute, model_dtype)
    return y_H


def _post_norm(weights: ExpertsWeights, y_H: torch.Tensor, compute: torch.dtype, model_dtype: torch.dtype):
    norm, weight = weights.post_norm, weights.post_norm_weight.to(compute)
    if norm.kind == "input_scaled_rms":
        z = y_H * (1.0 + weight)
        if model_dtype != compute:
            z = z.to(model_dtype).to(compute)
        return z / torch.sqrt((z * z).mean() + norm.eps)
    return y_H / torch.sqrt((y_H * y_H).mean() + norm.eps) * weight


def reference_experts(weights: ExpertsWeights, hidden_TH: torch.Tensor, top_k_index: torch.Tensor,
                      top_k_weights: torch.Tensor, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``sum_k w[t, k] * expert_{index[t, k]}(x_t)`` for every token; returns ``[T, out]`` in the
    input's dtype. Each expert's output is rounded to the model dtype (the experts emit it), the
    weighted sum is taken in the compute dtype."""
    model_dtype = hidden_TH.dtype
    compute = compute_dtype or (torch.float32 if model_dtype in (torch.bfloat16, torch.float16) else model_dtype)
    x_TH = hidden_TH.to(compute)
    outputs = []
    for token in range(x_TH.shape[0]):
        out = None
        for slot in range(top_k_index.shape[1]):
            expert = int(top_k_index[token, slot])
            y = expert_output(weights, expert, x_TH[token], compute, model_dtype)
            if model_dtype != compute:
                y = y.to(model_dtype).to(compute)
            term = top_k_weights[token, slot].to(compute) * y
            out = term if out is None else out + term
        outputs.append(out)
    if not outputs:
        return hidden_TH.new_zeros(0, weights.down.shape[1 if not weights.flags.is_transposed else 2])
    return torch.stack(outputs).to(model_dtype)


def has_formula(weights: ExpertsWeights) -> bool:
    """Whether every part has a formula here (an unknown gate or norm has none)."""
    return weights.gate.kind != "unknown" and (not weights.flags.has_post_expert_norm or weights.post_norm is not None)


