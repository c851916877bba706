"""Transformers' uniform experts interface, read from a module.

Since 5.x every fused-experts class of Transformers is decorated ``@use_experts_implementation``
(``transformers/integrations/moe.py``) and called as ``experts(hidden_states, top_k_index,
top_k_weights)`` -> ``[T, H]``, the routing weights already applied and the ``K`` slots summed.
The decorator records on every instance how the weights are laid out and what runs between the
two projections; its ``grouped_mm`` and ``batched_mm`` implementations compute, for a row ``x``
routed to expert ``e``::

    p = x W_up[e] (+ b_up[e])          W_up = gate_up_proj (has_gate) or up_proj (not has_gate);
                                       [E, out, in], or [E, in, out] when is_transposed
    h = _apply_gate(p) if has_gate else act_fn(p)
    y = h W_down[e] (+ b_down[e])      down_proj, same orientation rule; biases when has_bias
    y = post_expert_norm(y)            when has_post_expert_norm (one norm, shared by the experts)
    out[t] = sum_k top_k_weights[t, k] * y(x_t, top_k_index[t, k])

``_apply_gate`` is the class's own (clamped or soft-capped SwiGLUs live there) or Transformers'
default ``act_fn(gate) * up`` on the two halves. ``is_concatenated`` says whether gate and up are
the halves of ``p`` or interleaved (GPT-OSS); the class's ``_apply_gate`` reads them accordingly.

AutoEP's experts-level replacement (:mod:`autoep.experts_level`) runs exactly this, reading
every flag here; the reference (``reference/experts.py``) computes it again from the formulas.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# The instance attributes @use_experts_implementation sets (all booleans), with the value a version
# that does not set one has (5.0-5.2 set only has_bias and is_transposed: every expert gated,
# concatenated, without a post-expert norm).
FLAG_DEFAULTS = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
                 "has_post_expert_norm": False}
FLAG_NAMES = tuple(FLAG_DEFAULTS)
REQUIRED_FLAGS = ("has_bias", "is_transposed")  # set by every 5.x decorator


class ExpertsInterfaceError(ValueError):
    """A module does not hold experts with the uniform interface (or holds something it does not describe)."""


@dataclass(frozen=True)
class ExpertsFlags:
    has_gate: bool = True
    has_bias: bool = False
    is_transposed: bool = False
    is_concatenated: bool = True
    has_post_expert_norm: bool = False

    def describe(self) -> str:
        parts = ["gated" if self.has_gate else "gateless",
                 "concatenated" if self.is_concatenated else "interleaved"]
        if self.is_transposed:
            parts.append("transposed")
        if self.has_bias:
            parts.append("biased")
        if self.has_post_expert_norm:
            parts.append("post-expert norm")
        return ", ".join(parts)


@dataclass(frozen=True)
class ExpertsLayout:
    """An experts module's parameters under the interface (``E`` experts, input width ``hidden``,
    expert width ``intermediate``, output width ``output``)."""

    flags: ExpertsFlags
    num_experts: int
    hidden_size: int
    intermediate_size: int
    output_size: int
    # Parameter names of the module holding one slice per expert (dim 0 = expert), in registration
    # order: these are sharded by expert parallelism; every other parameter stays replicated.
    expert_parameters: tuple[str, ...]

    @property
    def up_name(self) -> str:
        return "gate_up_proj" if self.flags.has_gate else "up_proj"

    @property
    def bias_names(self) -> tuple[str, str] | tuple[()]:
        return (f"{self.up_name}_bias", "down_proj_bias") if self.flags.has_bias else ()


def _is_interface_forward(function) -> bool:
    """A ``forward`` installed by ``@use_experts_implementation`` (functools.wraps copies the wrapped
    function's name: the wrapper is known by the module that defines it)."""
    return hasattr(function, "__wrapped__") and getattr(function, "__globals__", {}).get(
        "__name__") == "transformers.integrations.moe"


def _decorated_forward(cls: type) -> bool:
    """The ``forward`` a call on ``cls`` runs is the one ``@use_experts_implementation`` installed
    (a subclass that overrides it computes something the flags do not describe)."""
    for klass in cls.__mro__:
        if "forward" in vars(klass):
            return _is_interface_forward(vars(klass)["forward"])
    return False


def eager_forward(cls: type):
    """The class's own forward under the decorator (what ``experts_implementation="eager"`` runs)."""
    for klass in cls.__mro__:
        if "forward" in vars(klass) and _is_interface_forward(vars(klass)["forward"]):
            return vars(klass)["forward"].__wrapped__
    raise TypeError(f"{cls.__name__} has no @use_experts_implementation forward")


def overrides_interface_class(cls: type) -> bool:
    """``cls`` inherits the interface's forward from a decorated class but replaces it."""
    return not _decorated_forward(cls) and any(
        "forward" in vars(base) and _is_interface_forward(vars(base)["forward"]) for base in cls.__mro__[1:])


def is_interface_module(module: nn.Module) -> bool:
    """Whether ``module`` is an instance of a class decorated ``@use_experts_implementation`` whose
    forward is the decorator's (it carries every flag the decorator sets, and the gate step its
    kernels call)."""
    return (all(isinstance(getattr(module, name, None), bool) for name in REQUIRED_FLAGS)
            and all(isinstance(getattr(module, name, default), bool) for name, default in FLAG_DEFAULTS.items())
            and callable(getattr(type(module), "_apply_gate", None)) and _decorated_forward(type(module)))


def overrides_interface(module: nn.Module) -> bool:
    """An instance of a decorated class whose own subclass replaced the decorator's forward (Ergo's
    experts add a per-route, per-expert norm that way): not the uniform interface."""
    return overrides_interface_class(type(module))


def read_flags(module: nn.Module) -> ExpertsFlags:
    return ExpertsFlags(**{name: bool(getattr(module, name, default)) for name, default in FLAG_DEFAULTS.items()})


def _shape(param) -> tuple[int, ...]:
    """A parameter's full shape: DeepSpeed ZeRO-3 keeps it in ``ds_shape`` (the local tensor is empty)."""
    return tuple(getattr(param, "ds_shape", None) or param.shape)


def read_layout(where: str, module: nn.Module) -> ExpertsLayout:
    """The parameters of an interface module, checked against its flags; raises
    :class:`ExpertsInterfaceError` naming what does not fit."""
    flags = read_flags(module)
    up_name = "gate_up_proj" if flags.has_gate else "up_proj"
    params = dict(module.named_parameters(recurse=False))
    up, down = params.get(up_name), params.get("down_proj")
    if up is None or down is None or len(_shape(up)) != 3 or len(_shape(down)) != 3:
        raise ExpertsInterfaceError(
            f"{where}: {type(module).__name__} ({flags.describe()}) must hold 3-D parameters {up_name!r} and "
            f"'down_proj'; found {sorted(params)}")
    up_shape, down_shape = _shape(up), _shape(down)
    num_experts = up_shape[0]
    declared = getattr(module, "num_experts", num_experts)
    if not isinstance(declared, int) or isinstance(declared, bool) or declared != num_experts:
        raise ExpertsInterfaceError(
            f"{where}: {type(module).__name__}.num_experts={declared!r} but {up_name} holds {num_experts} experts")
    if getattr(module, "_is_expert_parallel", False):  # (5.23 on)
        raise ExpertsInterfaceError(
            f"{where}: {type(module).__name__} is already expert-parallel (Transformers' own expert parallelism, "
            "DistributedConfig(ep_size=...)); load the model without a distributed_config to apply AutoEP")
    # [E, out, in] (or [E, in, out] transposed) -> (in, out)
    up_in, up_out = (up_shape[1], up_shape[2]) if flags.is_transposed else (up_shape[2], up_shape[1])
    down_in, down_out = (down_shape[1], down_shape[2]) if flags.is_transposed else (down_shape[2], down_shape[1])
    intermediate = up_out // 2 if flags.has_gate else up_out
    if (flags.has_gate and up_out % 2) or down_shape[0] != num_experts or down_in != intermediate:
        orientation = "[E, in, out]" if flags.is_transposed else "[E, out, in]"
        raise ExpertsInterfaceError(
            f"{where}: {up_name} {up_shape} and down_proj {down_shape} do not fit the interface's {orientation} "
            f"layout ({flags.describe()}): expected {up_name} with {'2I' if flags.has_gate else 'I'} outputs and "
            "down_proj with I inputs for the same E")
    expected = {up_name, "down_proj"}
    if flags.has_bias:
        biases = {f"{up_name}_bias": (num_experts, up_out), "down_proj_bias": (num_experts, down_out)}
        for name, shape in biases.items():
            if name not in params or _shape(params[name]) != shape:
                found = None if name not in params else _shape(params[name])
                raise ExpertsInterfaceError(f"{where}: has_bias is set but {name} is {found}, expected {list(shape)}")
        expected |= set(biases)
    unexpected = sorted(set(params) - expected)
    if unexpected:
        raise ExpertsInterfaceError(
            f"{where}: {type(module).__name__} holds parameters {unexpected} that the experts interface does not "
            f"describe ({flags.describe()}); refusing rather than leaving them unsharded or unused")
    children = dict(module.named_children())
    if flags.has_post_expert_norm and not isinstance(children.get("post_expert_norm"), nn.Module):
        raise ExpertsInterfaceError(f"{where}: has_post_expert_norm is set but there is no post_expert_norm module")
    if not flags.has_gate and getattr(module, "act_fn", None) is None:
        raise ExpertsInterfaceError(f"{where}: gateless experts without an act_fn")
    order = tuple(name for name in module._parameters if name in expected)
    return ExpertsLayout(flags, num_experts, up_in, intermediate, down_out, order)


def uses_default_gate(module: nn.Module) -> bool:
    """True when the gate step is Transformers' default ``act_fn(gate) * up`` on the two halves."""
    gate = getattr(type(module), "_apply_gate", None)
    return gate is not None and getattr(gate, "__name__", "") == "_default_apply_gate"


def expert_rows_weight(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A ``[E, out, in]`` view of an expert weight stored ``[E, out, in]`` or, transposed, ``[E, in, out]``."""
    return weight.transpose(-2, -1) if transposed else weight
