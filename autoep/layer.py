"""AutoEPMoELayer: router -> dispatch (sort by expert, AllToAll over the EP group) -> grouped
experts -> combine (AllToAll back, unsort) -> weighted sum (+ shared experts). See DESIGN
section 2.

The original router instance is kept (its parameters, buffers and any hooks) and its
class is swapped for a subclass whose forward implements the preset's RoutingSpec. It
stays an instance of the original router class, so Transformers' output recorders
(``output_router_logits=True``, the aux loss) keep seeing it on every 5.x version.

The replacement is indistinguishable from the block where that matters: children (hence
parameters, buffers and ``state_dict`` keys) are registered in the block's own order, and
the forward / forward-pre / full backward hooks registered on the block move to it (the
same hook dictionaries, so their handles still remove them). What cannot move exactly is
refused before anything is replaced (:func:`check_replaceable`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from autoep.detect import MoELayerSpec
from autoep.dispatch import combine, dispatch
from autoep.experts import GroupedExperts, check_experts_implementation
from autoep.groups import ExpertParallelGroups
from autoep.routing import RoutingSpec, route
from autoep.swapped import rebuild_swapped


class AutoEPRouterMixin:
    """Placed before the original router class in the MRO; replaces only ``forward``."""

    autoep_routing: RoutingSpec

    def __reduce_ex__(self, protocol):
        # The class is made at run time and cannot be found by name: pickle the original class (which
        # can) and make the subclass again on load (an applied model pickles as the stock one does).
        return rebuild_swapped, (type(self).__mro__[2], routing_router_class, self.__dict__)

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
                 local_expert_ids: tuple[int, ...], groups: ExpertParallelGroups | None = None,
                 child_order: tuple[str, ...] = ()):
        """``child_order``: the original block's child names, in its order (default: router,
        experts, shared expert, shared gate)."""
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
        children = {spec.router_attr: router, spec.experts_attr: experts, spec.shared_attr: shared,
                    spec.shared_gate_attr: shared_gate}
        children = {name: module for name, module in children.items() if module is not None}
        ordered = [name for name in child_order if name in children]
        for name in ordered + [name for name in children if name not in ordered]:
            self.add_module(name, children[name])

    # Accessors by role; the submodules themselves keep the original block's names.
    def router_module(self) -> nn.Module:
        return self._modules[self.spec.router_attr]

    def routed_experts(self) -> GroupedExperts:
        return self._modules[self.spec.experts_attr]

    def expert_named_parameters(self):
        """(name, parameter) of the parameters sharded by expert, relative to the experts module."""
        return list(self.routed_experts().named_parameters())

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
        # Weighted combine in float32 (float64 for a float64 model), slots summed in order:
        # deterministic on every device (autoep/dispatch.py weighted_sum).
        output_TH = combine(expert_rows_RH, weights_TK, state).to(dtype)
        shared = self.shared_mlp()
        if shared is not None:
            shared_TH = shared(hidden_TH)
            gate = self.shared_mlp_gate()
            if gate is not None:
                shared_TH = F.sigmoid(gate(hidden_TH)) * shared_TH
            output_TH = output_TH + shared_TH
        return output_TH.reshape(shape)


# Hooks on the block that move to the replacement as they are: its inputs (hidden_states) and
# output (the block's output tensor) are the block's own, so each fires with the same values.
_CARRIED_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                  "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
                  "_backward_hooks")
_STATE_DICT_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                     "_load_state_dict_post_hooks")


def _hook_names(module: nn.Module, kinds: tuple[str, ...]) -> list[str]:
    return [kind.strip("_") for kind in kinds if getattr(module, kind, None)]


def experts_hf_config(experts: nn.Module):
    """The Transformers config whose ``_experts_implementation`` the original experts read
    (set on them by ``@use_experts_implementation``), or None."""
    config = getattr(experts, "config", None)
    return config if hasattr(config, "_experts_implementation") else None


def check_replaceable(spec: MoELayerSpec) -> None:
    """Refuse what :func:`build_layer` could not carry over exactly; called for every block
    before any is replaced."""
    block = spec.block
    where = f"MoE block {spec.name!r} ({type(block).__name__})"
    experts = getattr(block, spec.experts_attr)
    config = experts_hf_config(experts)
    if config is not None:
        check_experts_implementation(config._experts_implementation, where)
    if "forward" in block.__dict__:
        raise ValueError(
            f"{where} has its forward replaced on the instance (forward={block.__dict__['forward']!r}, e.g. by "
            "accelerate's hooks or a wrapper): apply AutoEP before wrapping the model, or remove the wrapper.")
    if block._backward_hooks and not block._is_full_backward_hook:
        raise ValueError(
            f"{where} has a backward hook registered with register_backward_hook(), which fires on the block's "
            "last autograd node; the replacement computes the output with other operations, so it would see "
            "other gradients. Use register_full_backward_hook() (carried over exactly) or remove it before "
            "autoep.apply.")
    state_hooks = _hook_names(block, _STATE_DICT_HOOKS)
    if state_hooks:
        raise ValueError(
            f"{where} has state_dict / load_state_dict hooks ({', '.join(state_hooks)}), which AutoEP does not "
            "carry to the replacement; remove them before autoep.apply and register them on the replaced layer.")
    experts_hooks = _hook_names(experts, _CARRIED_HOOKS + _STATE_DICT_HOOKS)
    if "forward" in experts.__dict__:
        experts_hooks.append("forward replaced on the instance")
    if experts_hooks:
        raise ValueError(
            f"{where}: the experts module {spec.experts_attr!r} has hooks ({', '.join(experts_hooks)}). They "
            "cannot be carried over: the AutoEP experts take rows sorted by "
            "expert, not the original (hidden_states, top_k_index, top_k_weights). Register the hook on the "
            f"MoE block {spec.name!r} instead, or remove it (handle.remove()) before autoep.apply.")


def _carry_hooks(block: nn.Module, layer: nn.Module) -> None:
    """The block's hook dictionaries become the layer's (same objects: handles keep working)."""
    for kind in _CARRIED_HOOKS:
        if hasattr(block, kind):
            setattr(layer, kind, getattr(block, kind))
    layer._is_full_backward_hook = block._is_full_backward_hook


def build_layer(spec: MoELayerSpec, use_grouped_mm: bool, groups: ExpertParallelGroups | None = None
                ) -> AutoEPMoELayer:
    """Build the replacement for ``spec.block``, keeping this EP rank's slice of experts
    (sliced from the block's full expert tensors: deterministic, no communication).
    ``use_grouped_mm=False`` sets the model's experts implementation to "eager" (the loop).
    The caller has run :func:`check_replaceable` on every spec first (``autoep.apply`` does,
    before it replaces any block)."""
    block = spec.block
    original = getattr(block, spec.experts_attr)
    hf_config = experts_hf_config(original)
    if hf_config is not None and not use_grouped_mm and hf_config._experts_implementation in (None, "grouped_mm"):
        hf_config._experts_implementation = "eager"
    ep_size = groups.ep_size if groups is not None else 1
    per_rank = spec.num_experts // ep_size
    first = (groups.ep_rank if groups is not None else 0) * per_rank
    gate_up = getattr(original, spec.gate_up_name)
    down = getattr(original, spec.down_name)
    if ep_size > 1:
        gate_up = nn.Parameter(gate_up.detach()[first:first + per_rank].clone(), requires_grad=gate_up.requires_grad)
        down = nn.Parameter(down.detach()[first:first + per_rank].clone(), requires_grad=down.requires_grad)
    order = list(original._parameters)
    experts = GroupedExperts(gate_up, down, activation=spec.activation, use_grouped_mm=use_grouped_mm,
                             gate_up_name=spec.gate_up_name, down_name=spec.down_name, hf_config=hf_config,
                             down_first=order.index(spec.down_name) < order.index(spec.gate_up_name),
                             activation_params=spec.activation_params)
    shared = getattr(block, spec.shared_attr) if spec.shared_attr else None
    shared_gate = getattr(block, spec.shared_gate_attr) if spec.shared_gate_attr else None
    layer = AutoEPMoELayer(spec, getattr(block, spec.router_attr), experts, shared, shared_gate,
                           tuple(range(first, first + per_rank)), groups if ep_size > 1 else None,
                           child_order=tuple(block._modules))
    _carry_hooks(block, layer)
    layer.train(block.training)
    return layer
