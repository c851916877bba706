"""Experts-level replacement: the stock MoE block and its router stay; only the fused experts
module is made expert-parallel.

Where the family table has no routing row for a model (or the row cannot declare this
config's routing), AutoEP keeps the model's own block code, which routes and then calls
``experts(hidden_states, top_k_index, top_k_weights)`` (Transformers' uniform interface,
:mod:`autoep.interface`). The experts module instance is kept: its class is swapped for a
subclass (:class:`AutoEPExpertsMixin` first in the MRO, so it is still an instance of the
original class) whose ``forward`` runs AutoEP's path on the indices and weights the stock router
chose::

    [T, H] -> sort by expert, AllToAll over the EP group (autoep.dispatch)
           -> this rank's experts on their rows, every flag of the interface honoured and the
              module's own _apply_gate / act_fn / post_expert_norm called (autoep.experts kernels)
           -> AllToAll back, weighted sum in float32 (autoep.dispatch.combine) -> [T, H]

Under expert parallelism the parameters that hold one slice per expert (``gate_up_proj`` or
``up_proj``, ``down_proj`` and their biases) keep only this rank's experts, under their own
names and in their own order; every other parameter of the module (a post-expert norm) stays
replicated. The router, shared experts and the rest of the block are untouched: replicated,
reduced over data parallelism like any other parameter.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from autoep.activations import UnsupportedActivationError, identify_activation
from autoep.dispatch import combine, dispatch
from autoep.experts import check_experts_implementation, expert_mlp, kernel_for, linear_by_kernel
from autoep.groups import ExpertParallelGroups
from autoep.interface import (ExpertsInterfaceError, ExpertsLayout, eager_forward, expert_rows_weight,
                              is_interface_module, read_layout, uses_default_gate)
from autoep.presets.gates import CUSTOM_GATES, FLOAT32_EAGER, GateFormula
from autoep.swapped import rebuild_swapped

logger = logging.getLogger("autoep")

# Attributes the replacement sets on the experts instance (refused if the class already uses them).
_OWN_ATTRIBUTES = ("spec", "local_expert_ids", "ep_groups", "last_path")


@dataclass
class ExpertsSpec:
    """One experts module AutoEP replaces at the experts level. ``name`` is the module holding it
    (the MoE block, or whatever calls the experts: a decoder layer for Gemma-4), so that, as for a
    whole-block spec, ``f"{name}.{experts_attr}.<parameter>"`` names the expert parameters."""

    name: str
    experts_attr: str
    experts_class: str
    preset: str  # the family: its table row when there is one, else the model type
    model_type: str
    layout: ExpertsLayout
    gate: GateFormula
    reason: str = ""  # why experts-level (no row; or what the row could not declare)
    # The stock experts compute between the projections in float32 (their eager forward, in force at
    # detection: presets.gates.FLOAT32_EAGER); the reference then rounds only their output.
    float32_inside: bool = False
    block: nn.Module | None = field(default=None, repr=False, compare=False)
    mode = "experts"

    @property
    def num_experts(self) -> int:
        return self.layout.num_experts

    @property
    def hidden_size(self) -> int:
        return self.layout.hidden_size

    @property
    def intermediate_size(self) -> int:
        return self.layout.intermediate_size

    @property
    def experts_path(self) -> str:
        return f"{self.name}.{self.experts_attr}" if self.name else self.experts_attr

    def row(self) -> dict[str, object]:
        """One table row for `autoep inspect`."""
        return {
            "layer": self.experts_path,
            "block": self.experts_class,
            "preset": self.preset,
            "experts": self.num_experts,
            "top_k": "router",
            "hidden": self.hidden_size,
            "expert_width": self.intermediate_size,
            "routing": "the model's own router (experts-level)",
            "shared": self.layout.flags.describe() + f"; gate {self.gate.describe()}",
        }


def _attribute(module: nn.Module, path: str):
    value = module
    for part in path.split("."):
        value = getattr(value, part, None)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return value


def identify_gate(module: nn.Module, layout: ExpertsLayout) -> GateFormula:
    """The formula of the module's gate step (for the reference; the replacement calls the
    module's own). ``kind == "unknown"`` when the table does not know the class's gate."""
    def activation() -> str | None:
        try:
            return identify_activation(getattr(module, "act_fn", None))
        except UnsupportedActivationError:
            return None

    if not layout.flags.has_gate:
        act = activation()
        return GateFormula("act" if act else "unknown", (), act)
    if uses_default_gate(module):
        act = activation()
        return GateFormula("act_glu" if act else "unknown", (), act)
    owner = type(module)._apply_gate.__qualname__.split(".")[0]
    declared = CUSTOM_GATES.get(owner)
    if declared is None:
        return GateFormula("unknown")
    kind, paths = declared
    params = []
    for path in paths:
        value = _attribute(module, path)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return GateFormula("unknown")
        params.append(None if value is None else float(value))
    act = activation() if kind in ("act_glu", "act_then_clamp", "clamp_then_act") else None
    if kind in ("act_glu", "act_then_clamp", "clamp_then_act") and act is None:
        return GateFormula("unknown")
    return GateFormula(kind, tuple(params), act)


def interface_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every experts module of ``model`` with Transformers' uniform interface, in module order."""
    return [(name, module) for name, module in model.named_modules() if is_interface_module(module)]


def experts_spec(name: str, module: nn.Module, preset: str, model_type: str, reason: str) -> ExpertsSpec:
    """Describe one interface module (its full module name ``name``); raises
    :class:`ExpertsInterfaceError` when it cannot be replaced exactly."""
    where = f"experts module {name!r} ({type(module).__name__})"
    layout = read_layout(where, module)
    config = getattr(module, "config", None)
    if hasattr(config, "_experts_implementation"):
        check_experts_implementation(config._experts_implementation, where)
    for attribute in _OWN_ATTRIBUTES:
        if attribute in module.__dict__ or hasattr(type(module), attribute):
            raise ExpertsInterfaceError(f"{where} already has an attribute {attribute!r}, which the AutoEP experts "
                                        "replacement sets; refusing rather than overwriting it")
    parent, _, attr = name.rpartition(".")
    eager = getattr(config, "_experts_implementation", None) == "eager"
    float32_inside = eager and any(klass.__name__ in FLOAT32_EAGER for klass in type(module).__mro__)
    return ExpertsSpec(parent, attr, type(module).__name__, preset, model_type, layout,
                       identify_gate(module, layout), reason, float32_inside, block=None)


class AutoEPExpertsMixin:
    """Placed before the original experts class in the MRO; replaces only ``forward``. Set by
    :func:`build_experts`: ``spec`` (an :class:`ExpertsSpec`), ``local_expert_ids`` (global ids
    of the experts held here, contiguous) and ``ep_groups`` (None: every expert is local)."""

    spec: ExpertsSpec
    local_expert_ids: tuple[int, ...]
    ep_groups: ExpertParallelGroups | None

    def __reduce_ex__(self, protocol):
        return rebuild_swapped, (type(self).__mro__[2], experts_class_for, self.__dict__)

    def routed_experts(self) -> nn.Module:
        return self

    def expert_named_parameters(self):
        """(name, parameter) of the parameters sharded by expert (one slice per expert)."""
        return [(name, self._parameters[name]) for name in self.spec.layout.expert_parameters]

    def kernel(self) -> str:
        """What the next call runs (Transformers' setting, ``config._experts_implementation``, read at
        every call): "grouped_mm" or "batched_mm" (AutoEP's kernels, every flag honoured), "eager" (the
        class's own forward, as the stock experts run it: some compute in float32 there), or "loop"
        (grouped_mm where it cannot take the dtype or row widths)."""
        layout = self.spec.layout
        config = getattr(self, "config", None)
        requested = getattr(config, "_experts_implementation", None) if config is not None else None
        implementation = check_experts_implementation(requested, "AutoEP experts")
        if implementation == "eager":
            return "eager"
        weight = self._parameters[layout.up_name]
        return kernel_for(implementation, weight.dtype, (layout.hidden_size, layout.intermediate_size,
                                                         layout.output_size))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        shape = hidden_states.shape
        hidden_TH = hidden_states.reshape(-1, shape[-1])
        expert_ids_TK = top_k_index.reshape(hidden_TH.shape[0], -1)
        weights_TK = top_k_weights.reshape(expert_ids_TK.shape)
        num_experts = self.spec.num_experts
        rows_RH, state = dispatch(hidden_TH, expert_ids_TK, num_experts, self.ep_groups)
        if not torch.compiler.is_compiling():
            routed = int(state.local.tokens_per_expert_E.sum())
            if routed != expert_ids_TK.numel():
                raise ValueError(
                    f"AutoEP experts {type(self).__name__}: {expert_ids_TK.numel() - routed} of {expert_ids_TK.numel()} "
                    f"routed slots name an expert outside [0, {num_experts}) (top_k_index min "
                    f"{int(expert_ids_TK.min())}, max {int(expert_ids_TK.max())}); every slot must name one of the "
                    f"layer's {num_experts} experts")
        rows_RO = local_experts(self, rows_RH, state.tokens_per_local_expert)
        output_TH = combine(rows_RO, weights_TK, state).to(hidden_states.dtype)
        return output_TH.reshape(*shape[:-1], output_TH.shape[-1])


def local_experts(module: nn.Module, rows_RH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """The experts held here on their rows (sorted by local expert, ``counts_E`` rows each), as the
    interface computes them: up projection (+ bias), the module's gate step (or act_fn), down
    projection (+ bias), the module's post-expert norm."""
    layout = module.spec.layout
    flags = layout.flags
    kernel = module.kernel()
    if kernel == "eager" and rows_RH.shape[0] == 0:
        # No row here: the class's eager forward loops over the experts its rows hit, so its output would
        # be a fresh tensor with no path back to the rows or the parameters, and this rank would skip the
        # two backward AllToAlls its EP peers run (measured: openai_privacy_filter, autoep_size 4, a rank
        # given no row in one layer: gloo aborted "Received data size doesn't match expected size"), and
        # leave its expert gradients None where its peers have them. AutoEP's loop computes the same empty
        # output with every expert parameter and the rows in the graph (their gradients exact zeros).
        kernel = "loop"
    module.last_path = kernel
    if kernel == "eager":
        return _class_forward(module, rows_RH, counts_E)
    up = module._parameters[layout.up_name]
    down = module._parameters["down_proj"]
    rows_RH = rows_RH.to(up.dtype)
    if (flags.has_gate and flags.is_concatenated and not flags.is_transposed and not flags.has_bias
            and not flags.has_post_expert_norm and module.spec.gate.kind == "act_glu" and kernel != "batched_mm"
            and not torch.compiler.is_compiling() and torch.is_grad_enabled()):
        # The memory-lean path of the whole-block experts (activation recomputed in backward): only for
        # Transformers' default gate with an identified, parameter-free activation (the recomputation
        # differentiates the gate and up halves only).
        act = module.act_fn
        return expert_mlp(rows_RH, up, down, counts_E, kernel == "grouped_mm",
                          lambda gate, up_part: act(gate) * up_part, module.spec.gate.activation)
    expert_R = None
    if flags.has_bias or kernel == "batched_mm":
        expert_R = torch.repeat_interleave(torch.arange(up.shape[0], device=rows_RH.device), counts_E,
                                           output_size=rows_RH.shape[0])
    projected_RO = linear_by_kernel(kernel, rows_RH, expert_rows_weight(up, flags.is_transposed), counts_E, expert_R)
    if flags.has_bias:
        projected_RO = projected_RO + module._parameters[f"{layout.up_name}_bias"][expert_R]
    hidden_RI = module._apply_gate(projected_RO) if flags.has_gate else module.act_fn(projected_RO)
    out_RO = linear_by_kernel(kernel, hidden_RI.to(down.dtype), expert_rows_weight(down, flags.is_transposed),
                              counts_E, expert_R)
    if flags.has_bias:
        out_RO = out_RO + module._parameters["down_proj_bias"][expert_R]
    if flags.has_post_expert_norm:
        out_RO = module.post_expert_norm(out_RO)
    return out_RO


def _class_forward(module: nn.Module, rows_RH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """The class's own (eager) forward on this rank's rows: each row routed to its local expert with
    weight 1 (the routing weights are applied in the combine), ``num_experts`` the local count while
    it runs, as Transformers' own expert parallelism calls it."""
    local = module._parameters[module.spec.layout.up_name].shape[0]
    expert_R1 = torch.repeat_interleave(torch.arange(local, device=rows_RH.device), counts_E,
                                        output_size=rows_RH.shape[0]).unsqueeze(-1)
    global_count = module.num_experts
    module.num_experts = local
    try:
        return eager_forward(type(module))(module, rows_RH, expert_R1, rows_RH.new_ones(expert_R1.shape))
    finally:
        module.num_experts = global_count


_EXPERTS_CLASSES: dict[type, type] = {}


def experts_class_for(original: type) -> type:
    if issubclass(original, AutoEPExpertsMixin):
        return original
    if original not in _EXPERTS_CLASSES:
        _EXPERTS_CLASSES[original] = type(f"AutoEP{original.__name__}", (AutoEPExpertsMixin, original),
                                          {"__module__": __name__})
    return _EXPERTS_CLASSES[original]


def check_experts_replaceable(spec: ExpertsSpec, module: nn.Module) -> None:
    """Refuse what :func:`build_experts` could not carry exactly (the module stays in place, so its
    hooks keep firing with the same inputs and outputs; an instance-level ``forward`` would bypass
    the replacement)."""
    where = f"experts module {spec.experts_path!r} ({spec.experts_class})"
    if "forward" in module.__dict__:
        raise ValueError(
            f"{where} has its forward replaced on the instance (forward={module.__dict__['forward']!r}, e.g. by "
            "accelerate's hooks, a wrapper or Transformers' own expert parallelism): apply AutoEP before wrapping "
            "the model, or remove the wrapper.")


def build_experts(spec: ExpertsSpec, module: nn.Module, use_grouped_mm: bool,
                  groups: ExpertParallelGroups | None = None, sliced: dict | None = None
                  ) -> nn.Module:
    """Turn ``module`` (the experts instance ``spec`` describes) into the expert-parallel experts, in
    place: its per-expert parameters keep this EP rank's slice (sliced from the full tensors:
    deterministic, no communication), its class becomes the AutoEP subclass. Returns ``module``.
    ``sliced``: id(full parameter) -> (it, its slice), shared by the calls of one ``apply``, so that a
    Parameter two experts modules share (DiffusionGemma's encoder and decoder) stays one shared slice."""
    config = getattr(module, "config", None)
    if config is not None and not use_grouped_mm and getattr(config, "_experts_implementation", None) in (
            None, "grouped_mm"):
        config._experts_implementation = "eager"
    ep_size = groups.ep_size if groups is not None else 1
    per_rank = spec.num_experts // ep_size
    first = (groups.ep_rank if groups is not None else 0) * per_rank
    if ep_size > 1:
        sliced = {} if sliced is None else sliced
        for name in spec.layout.expert_parameters:
            param = module._parameters[name]
            if id(param) not in sliced:  # (the full Parameter is kept with its slice: its id stays its own)
                sliced[id(param)] = (param, nn.Parameter(param.detach()[first:first + per_rank].clone(),
                                                         requires_grad=param.requires_grad))
            module._parameters[name] = sliced[id(param)][1]
    module.__class__ = experts_class_for(type(module))
    module.spec = dataclasses.replace(spec, block=None)
    module.local_expert_ids = tuple(range(first, first + per_rank))
    module.ep_groups = groups if ep_size > 1 else None
    module.last_path = None
    return module


__all__ = ["AutoEPExpertsMixin", "ExpertsSpec", "ExpertsInterfaceError", "build_experts", "experts_spec",
           "interface_modules", "identify_gate", "check_experts_replaceable", "local_experts"]
