"""AutoEPMoELayer: router -> dispatch (sort by expert, AllToAll over the EP group) -> grouped
experts -> combine (AllToAll back, unsort) -> weighted sum (+ shared experts). See DESIGN
section 2.

The original router instance is kept (its parameters, buffers and any hooks) and its
class is swapped for a subclass whose forward implements the preset's RoutingSpec. It
stays an instance of the original router class, so Transformers' output recorders
(``output_router_logits=True``, the aux loss) keep seeing it on every 5.x version.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from autoep.detect import MoELayerSpec
from autoep.dispatch import combine, dispatch
from autoep.experts import GroupedExperts
from autoep.groups import ExpertParallelGroups
from autoep.routing import RoutingSpec, route


class AutoEPRouterMixin:
    """Placed before the original router class in the MRO; replaces only ``forward``."""

    autoep_routing: RoutingSpec

    def forward(self, hidden_states: torch.Tensor):
        hidden_TH = hidden_states.reshape(-1, self.weight.shape[1])
        spec = self.autoep_routing
        bias = self.e_score_correction_bias if spec.use_correction_bias else None
        return route(spec, hidden_TH, self.weight, bias)


_ROUTER_CLASSES: dict[type, type] = {}


def routing_router_class(original: type) -> type:
    if issubclass(original, AutoEPRouterMixin):
        return original
    if original not in _ROUTER_CLASSES:
        _ROUTER_CLASSES[original] = type(f"AutoEP{original.__name__}", (AutoEPRouterMixin, original),
                                         {"__module__": __name__})
    return _ROUTER_CLASSES[original]


class AutoEPMoELayer(nn.Module):
    """Replaces one MoE block. Submodule names equal the original block's, so parameter
    names (and ``state_dict`` keys) are unchanged; under expert parallelism the expert
    tensors hold only this rank's experts, ``local_expert_ids`` (global ids, contiguous)."""

    def __init__(self, spec: MoELayerSpec, router: nn.Module, experts: GroupedExperts,
                 shared: nn.Module | None, shared_gate: nn.Module | None,
                 local_expert_ids: tuple[int, ...], groups: ExpertParallelGroups | None = None):
        super().__init__()
        # The spec without its reference to the original block, which would otherwise keep the
        # replaced block (and, under expert parallelism, every expert's weights) alive.
        self.spec = dataclasses.replace(spec, block=None)
        self.routing = spec.routing
        self.num_experts = spec.num_experts
        self.local_expert_ids = local_expert_ids
        self.ep_groups = groups  # None: every expert is local and no collective runs
        router.__class__ = routing_router_class(type(router))
        router.autoep_routing = spec.routing
        self.add_module(spec.router_attr, router)
        self.add_module(spec.experts_attr, experts)
        if shared is not None:
            self.add_module(spec.shared_attr, shared)
        if shared_gate is not None:
            self.add_module(spec.shared_gate_attr, shared_gate)

    # Accessors by role; the submodules themselves keep the original block's names.
    def router_module(self) -> nn.Module:
        return self._modules[self.spec.router_attr]

    def routed_experts(self) -> GroupedExperts:
        return self._modules[self.spec.experts_attr]

    def shared_mlp(self) -> nn.Module | None:
        return self._modules.get(self.spec.shared_attr) if self.spec.shared_attr else None

    def shared_mlp_gate(self) -> nn.Module | None:
        return self._modules.get(self.spec.shared_gate_attr) if self.spec.shared_gate_attr else None

    def extra_repr(self) -> str:
        ep = f"ep_rank={self.ep_groups.ep_rank}/{self.ep_groups.ep_size}, " if self.ep_groups else ""
        return (f"preset={self.spec.preset}, experts={self.num_experts}, {ep}"
                f"local={self.local_expert_ids[0]}..{self.local_expert_ids[-1]}, routing=[{self.routing.describe()}]")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape, dtype = hidden_states.shape, hidden_states.dtype
        hidden_TH = hidden_states.reshape(-1, shape[-1])
        _, weights_TK, expert_ids_TK = self.router_module()(hidden_TH)
        rows_RH, state = dispatch(hidden_TH, expert_ids_TK, self.num_experts, self.ep_groups)
        expert_rows_RH = self.routed_experts()(rows_RH, state.tokens_per_local_expert)
        expert_out_TKH = combine(expert_rows_RH, state)
        # Weighted combine in float32 (float64 for a float64 model), slots summed in order:
        # deterministic on every device.
        combine_dtype = torch.promote_types(dtype, torch.float32)
        routed_TH = (expert_out_TKH.to(combine_dtype) * weights_TK.to(combine_dtype).unsqueeze(-1)).sum(dim=1)
        output_TH = routed_TH.to(dtype)
        shared = self.shared_mlp()
        if shared is not None:
            shared_TH = shared(hidden_TH)
            gate = self.shared_mlp_gate()
            if gate is not None:
                shared_TH = F.sigmoid(gate(hidden_TH)) * shared_TH
            output_TH = output_TH + shared_TH
        return output_TH.reshape(shape)


def build_layer(spec: MoELayerSpec, use_grouped_mm: bool, groups: ExpertParallelGroups | None = None
                ) -> AutoEPMoELayer:
    """Build the replacement for ``spec.block``, keeping this EP rank's slice of experts
    (sliced from the block's full expert tensors: deterministic, no communication)."""
    block = spec.block
    original = getattr(block, spec.experts_attr)
    ep_size = groups.ep_size if groups is not None else 1
    per_rank = spec.num_experts // ep_size
    first = (groups.ep_rank if groups is not None else 0) * per_rank
    gate_up = getattr(original, spec.gate_up_name)
    down = getattr(original, spec.down_name)
    if ep_size > 1:
        gate_up = nn.Parameter(gate_up.detach()[first:first + per_rank].clone(), requires_grad=gate_up.requires_grad)
        down = nn.Parameter(down.detach()[first:first + per_rank].clone(), requires_grad=down.requires_grad)
    experts = GroupedExperts(gate_up, down, activation=spec.activation, use_grouped_mm=use_grouped_mm,
                             gate_up_name=spec.gate_up_name, down_name=spec.down_name)
    shared = getattr(block, spec.shared_attr) if spec.shared_attr else None
    shared_gate = getattr(block, spec.shared_gate_attr) if spec.shared_gate_attr else None
    layer = AutoEPMoELayer(spec, getattr(block, spec.router_attr), experts, shared, shared_gate,
                           tuple(range(first, first + per_rank)), groups if ep_size > 1 else None)
    layer.train(block.training)
    return layer
