"""A whole Transformers model with every MoE block computed by the reference.

The copy keeps the original's attention, norms and embeddings; each MoE block becomes a
``ReferenceMoEBlock`` that holds the original block's submodules only as parameter
containers (so parameter names, and gradients, line up with the original model) and
computes its output with :func:`reference.moe.reference_block`. The aux loss is
computed here from the recorded logits, not by Transformers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from reference.experts import ExpertsWeights, has_formula, post_norm_of, reference_experts
from reference.moe import BlockWeights, load_balancing_loss, reference_block


@dataclass(frozen=True)
class BlockLayout:
    """Where one block's weights live (attribute names), and how it routes."""

    name: str
    routing: object  # autoep.routing.RoutingSpec
    router_attr: str
    experts_attr: str
    gate_up_name: str
    down_name: str
    shared_attr: str | None
    shared_gate_attr: str | None
    activation: str = "silu"  # the routed experts' activation (reference.moe.ACTIVATION_FORMULAS)
    shared_activation: str | None = "silu"
    activation_params: tuple[float, ...] = ()
    shared_activation_params: tuple[float, ...] = ()


def block_weights(block: nn.Module, layout: BlockLayout) -> BlockWeights:
    """The weights of a block (the original one, or a ReferenceMoEBlock holding the same
    submodules), read by the attribute names of its layout."""
    router = getattr(block, layout.router_attr)
    experts = getattr(block, layout.experts_attr)
    weights = BlockWeights(
        router_EH=router.weight,
        gate_up_E2IH=getattr(experts, layout.gate_up_name),
        down_EHI=getattr(experts, layout.down_name),
        correction_bias_E=router.e_score_correction_bias if layout.routing.use_correction_bias else None,
        activation=layout.activation,
        shared_activation=layout.shared_activation,
        activation_params=layout.activation_params,
        shared_activation_params=layout.shared_activation_params,
    )
    if layout.shared_attr is not None:
        shared = getattr(block, layout.shared_attr)
        if getattr(shared, "gate_proj", None) is None:  # one Linear(H, 2I): gate rows, then up rows
            gate_up = shared.gate_up_proj.weight
            half = gate_up.shape[0] // 2
            weights.shared_gate_IH, weights.shared_up_IH = gate_up[:half], gate_up[half:]
        else:
            weights.shared_gate_IH = shared.gate_proj.weight
            weights.shared_up_IH = shared.up_proj.weight
        weights.shared_down_HI = shared.down_proj.weight
        if layout.shared_gate_attr is not None:
            weights.shared_gate_vector_H = getattr(block, layout.shared_gate_attr).weight[0]
    return weights


class ReferenceMoEBlock(nn.Module):
    def __init__(self, layout: BlockLayout, block: nn.Module, records: list, compute_dtype: torch.dtype | None):
        super().__init__()
        self.layout = layout
        self.compute_dtype = compute_dtype
        self._records = records
        for attr in (layout.router_attr, layout.experts_attr, layout.shared_attr, layout.shared_gate_attr):
            if attr is not None:
                self.add_module(attr, getattr(block, attr))

    def weights(self) -> BlockWeights:
        return block_weights(self, self.layout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_TH = hidden_states.reshape(-1, hidden_states.shape[-1])
        output_TH, logits_TE, _ = reference_block(self.layout.routing, self.weights(), hidden_TH, self.compute_dtype)
        self._records.append(logits_TE)
        return output_TH.reshape(hidden_states.shape)


@dataclass(frozen=True)
class ExpertsModuleLayout:
    """An experts module replaced at the experts level: where it is (its full module name) and
    what its interface declares (descriptions from autoep: the flags and the gate formula)."""

    name: str
    flags: object  # autoep.interface.ExpertsFlags
    gate: object   # autoep.presets.gates.GateFormula
    up_name: str
    float32_inside: bool = False  # the stock experts compute between their projections in float32


def experts_weights(module: nn.Module, layout: ExpertsModuleLayout) -> ExpertsWeights:
    flags = layout.flags
    norm = getattr(module, "post_expert_norm", None) if flags.has_post_expert_norm else None
    return ExpertsWeights(
        up=getattr(module, layout.up_name), down=module.down_proj,
        up_bias=getattr(module, f"{layout.up_name}_bias") if flags.has_bias else None,
        down_bias=module.down_proj_bias if flags.has_bias else None, flags=flags, gate=layout.gate,
        post_norm=post_norm_of(norm) if norm is not None else None,
        post_norm_weight=getattr(norm, "weight", None) if norm is not None else None,
        float32_inside=layout.float32_inside)


class ReferenceExperts(nn.Module):
    """Holds an experts module's parameters and children under their own names (so parameter
    names and gradients line up with the original) and computes it with
    :func:`reference.experts.reference_experts` on the indices and weights the model's router chose."""

    def __init__(self, layout: ExpertsModuleLayout, module: nn.Module, compute_dtype: torch.dtype | None):
        super().__init__()
        self.layout = layout
        self.compute_dtype = compute_dtype
        for name, param in module.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, child in module.named_children():
            self.add_module(name, child)
        weights = experts_weights(self, layout)
        if not has_formula(weights):
            raise ValueError(f"the reference has no formula for experts {layout.name!r} (gate {layout.gate}, "
                             f"post-expert norm {'declared' if layout.flags.has_post_expert_norm else 'none'})")

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        hidden_TH = hidden_states.reshape(-1, hidden_states.shape[-1])
        out_TH = reference_experts(experts_weights(self, self.layout), hidden_TH,
                                   top_k_index.reshape(hidden_TH.shape[0], -1),
                                   top_k_weights.reshape(hidden_TH.shape[0], -1), self.compute_dtype)
        return out_TH.reshape(*hidden_states.shape[:-1], out_TH.shape[-1])


class ReferenceModel(nn.Module):
    """Wraps a deep copy of a Transformers causal LM. ``forward`` returns
    (logits, loss, aux_loss) where loss = cross-entropy + router_aux_loss_coef * aux_loss."""

    def __init__(self, model: nn.Module, layouts: list[BlockLayout], compute_dtype: torch.dtype | None = None,
                 with_aux_loss: bool = True):
        super().__init__()
        self.model = copy.deepcopy(model)
        self.records: list[torch.Tensor] = []
        self.layouts = layouts
        self.with_aux_loss = with_aux_loss
        # Experts-level layouts keep the model's own routers (and its own aux loss); block layouts
        # replace whole blocks, routing included, and the aux loss is computed here.
        self.experts_level = bool(layouts) and all(isinstance(layout, ExpertsModuleLayout) for layout in layouts)
        for layout in layouts:
            module = self.model.get_submodule(layout.name)
            if isinstance(layout, ExpertsModuleLayout):
                self.model.set_submodule(layout.name, ReferenceExperts(layout, module, compute_dtype))
            else:
                self.model.set_submodule(layout.name, ReferenceMoEBlock(layout, module, self.records, compute_dtype))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        self.records.clear()
        if self.experts_level:
            output = self.model(input_ids=input_ids, labels=labels, output_router_logits=self.with_aux_loss)
            return output.logits, output.loss, getattr(output, "aux_loss", None) if self.with_aux_loss else None
        output = self.model(input_ids=input_ids, labels=labels, output_router_logits=False)
        aux_loss = None
        loss = output.loss
        if self.with_aux_loss:
            config = self.model.config.get_text_config()
            routing = self.layouts[0].routing
            top_k = getattr(config, "num_experts_per_tok", routing.top_k)
            records = list(self.records)
            if routing.recorded_output == "probabilities":
                # The spec declares that this Transformers version hands softmax probabilities
                # (not logits) to its aux loss, which applies softmax again.
                records = [torch.softmax(logits.to(torch.float64), dim=-1) for logits in records]
            aux_loss = load_balancing_loss(records, routing.num_experts, top_k)
            if loss is not None:
                loss = loss + config.router_aux_loss_coef * aux_loss.to(loss.dtype)
        return output.logits, loss, aux_loss
