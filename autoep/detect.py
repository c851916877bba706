"""Walk a model, match a preset, and describe every MoE block it will replace.

Detection checks what it finds (expert count against the router's rows, hidden size,
fused shapes, the block's children) and raises :class:`DetectionError` on anything it
does not fully understand; it never returns a block it would replace incorrectly.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from autoep.activations import (CLAMP_ATTRIBUTES, CLAMPED_SWIGLU, CONFIG_NAMES, UnsupportedActivationError,
                                clamped_swiglu_params, has_custom_gate, identify_activation)
from autoep.config import AUTO, AutoEPConfig
from autoep.experts_level import ExpertsSpec, experts_spec, interface_modules
from autoep.interface import ExpertsInterfaceError, overrides_interface
from autoep.presets import FAMILIES, MODEL_TYPE_TO_PRESET, PRESETS, REFUSED_MODEL_TYPES, Preset
from autoep.presets.gates import CUSTOM_GATES
from autoep.routing import RoutingSpec
from autoep.versions import UnsupportedTransformersError, at_least, transformers_version

logger = logging.getLogger("autoep")

SUPPORTED_ACTIVATIONS = tuple(sorted(CONFIG_NAMES))  # Transformers hidden_act names


class DetectionError(ValueError):
    """The model's MoE blocks do not match what the preset (and config) describe."""


@dataclass
class MoELayerSpec:
    name: str
    block_class: str
    preset: str
    model_type: str
    routing: RoutingSpec
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    activation: str
    router_attr: str
    experts_attr: str
    gate_up_name: str
    down_name: str
    shared_attr: str | None = None
    shared_gate_attr: str | None = None
    # The shared expert MLP's activation (canonical name; None when it is not one AutoEP knows:
    # the layer calls the original shared MLP, so only the reference needs it).
    shared_activation: str | None = None
    # (alpha, limit) of a "swiglu_clamped" activation (routed experts / shared expert); () otherwise.
    activation_params: tuple[float, ...] = ()
    shared_activation_params: tuple[float, ...] = ()
    block: nn.Module | None = field(default=None, repr=False, compare=False)
    mode = "block"  # the whole block is replaced (autoep.experts_level.ExpertsSpec: "experts")

    @property
    def shared_kind(self) -> str:
        if self.shared_attr is None:
            return "none"
        return "sigmoid_gated" if self.shared_gate_attr else "ungated"

    def row(self) -> dict[str, object]:
        """One table row for `autoep inspect`."""
        return {
            "layer": self.name,
            "block": self.block_class,
            "preset": self.preset,
            "experts": self.num_experts,
            "top_k": self.top_k,
            "hidden": self.hidden_size,
            "expert_width": self.intermediate_size,
            "routing": self.routing.describe(),
            "shared": self.shared_kind if self.shared_attr is None else f"{self.shared_kind} ({self.shared_attr})",
        }


def text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def resolve_preset(model: nn.Module, config: AutoEPConfig) -> tuple[Preset, str]:
    """Pick the preset (from the config, else from the model type) and gate it on the
    installed Transformers. Returns (preset, model_type of the text backbone)."""
    model_type = getattr(text_config(model), "model_type", None)
    outer_type = getattr(model.config, "model_type", None)
    if config.preset_model is not None:
        preset = PRESETS[config.preset_model]
    else:
        name = MODEL_TYPE_TO_PRESET.get(model_type) or MODEL_TYPE_TO_PRESET.get(outer_type)
        refusal = REFUSED_MODEL_TYPES.get(model_type) or REFUSED_MODEL_TYPES.get(outer_type)
        if name is None and refusal is not None:
            raise DetectionError(
                f"model.config.model_type={outer_type!r} has no whole-block row in the family table: {refusal.reason} "
                f"(established on transformers{refusal.versions}; `autoep inspect --families` lists every family).")
        if name is None:
            name = _family_by_block_class(model)
        if name is None:
            raise DetectionError(
                f"model.config.model_type={outer_type!r} has no built-in AutoEP preset; set "
                f"expert_parallel.preset_model to one of {', '.join(sorted(PRESETS))} if its MoE block is one of "
                f"theirs (supported model types: {', '.join(sorted(MODEL_TYPE_TO_PRESET))}; `autoep inspect "
                "--families` shows the table).")
        preset = PRESETS[name]
        logger.info("autoep: preset %r chosen from model.config.model_type=%r", name, model_type)
    check_transformers_for(preset)
    return preset, model_type


def _family_by_block_class(model: nn.Module) -> str | None:
    """The one table row whose block class the model holds (a model type built from another
    family's classes, e.g. sarvam_mla from DeepseekV3*), or None; several is ambiguous."""
    if not isinstance(model, nn.Module):
        return None
    classes = {type(module).__name__ for module in model.modules()}
    names = sorted({family.name for family in FAMILIES for block in family.block_classes.values() if block in classes})
    if len(names) > 1:
        raise DetectionError(f"{type(model).__name__} holds the blocks of several families {names}: set "
                             "expert_parallel.preset_model to the one to replace")
    if names:
        logger.info("autoep: preset %r chosen by the class of the model's MoE blocks", names[0])
    return names[0] if names else None


def check_transformers_for(preset: Preset) -> None:
    installed = transformers_version()
    if not at_least(preset.min_transformers):
        detail = (" Transformers 4.x stores experts as a ModuleList of per-expert layers, a layout AutoEP does "
                  "not support." if installed.major < 5 else "")
        raise UnsupportedTransformersError(
            f"preset {preset.name!r} needs transformers>={preset.min_transformers}, but transformers "
            f"{installed} is installed.{detail} Install transformers>={preset.min_transformers},<6.")


def _config_int(cfg, fields: tuple[str, ...], what: str) -> int:
    for name in fields:
        value = getattr(cfg, name, None)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool):
                raise DetectionError(f"model.config.{name}={value!r} ({what}) is not an integer")
            return value
    raise DetectionError(f"model config has no {what}: none of {', '.join(fields)} is set")


def _routing_for(preset: Preset, cfg, num_experts: int, top_k: int, config: AutoEPConfig) -> RoutingSpec:
    spec = preset.routing(cfg, num_experts, top_k)
    changes: dict[str, object] = {}
    if config.score_func != AUTO:
        changes["score_func"] = config.score_func
    if config.route_norm is not None:
        changes["renormalize"] = config.route_norm
    if config.routed_scaling_factor != AUTO:
        changes["scale"] = float(config.routed_scaling_factor)
    elif config.route_scale != 1.0:
        if spec.scale != 1.0:
            raise DetectionError(
                f"expert_parallel.route_scale={config.route_scale} conflicts with the model's "
                f"routed_scaling_factor={spec.scale}; set expert_parallel.routed_scaling_factor to override it.")
        changes["scale"] = config.route_scale
    if config.num_expert_groups is not None:
        changes.update(num_groups=config.num_expert_groups, topk_groups=config.num_limited_groups,
                       group_score=spec.group_score or ("top2_sum" if spec.score_func == "sigmoid" else "max"))
    if not changes:
        return spec
    try:
        return spec.with_overrides(**changes)
    except ValueError as error:
        raise DetectionError(f"expert_parallel routing overrides {changes} are invalid: {error}") from None


def _shape(tensor) -> tuple[int, ...]:
    """A tensor's full shape (DeepSpeed ZeRO-3 keeps it in ``ds_shape``; the local tensor is empty)."""
    return tuple(getattr(tensor, "ds_shape", None) or tensor.shape)


def _has_row_structure(module: nn.Module, router_attr: str, experts_attr: str, gate_up_name: str, down_name: str,
                       num_experts: int, intermediate: int, hidden: int) -> bool:
    """``module`` holds a router and fused experts under the row's names with the row's shapes."""
    router, experts = getattr(module, router_attr, None), getattr(module, experts_attr, None)
    if not isinstance(router, nn.Module) or not isinstance(experts, nn.Module):
        return False
    weight = getattr(router, "weight", None)
    gate_up, down = getattr(experts, gate_up_name, None), getattr(experts, down_name, None)
    return (isinstance(weight, torch.Tensor) and _shape(weight) == (num_experts, hidden)
            and isinstance(gate_up, torch.Tensor) and _shape(gate_up) == (num_experts, 2 * intermediate, hidden)
            and isinstance(down, torch.Tensor) and _shape(down) == (num_experts, hidden, intermediate))


# expert_parallel.moe_layer_pattern is a Python regular expression, and Python's `re` has no
# time limit: a pattern with nested quantifiers backtracks exponentially (measured: "(.*)*X"
# ran over 5 s on one 31-character module name, "model.layers.0.self_attn.q_proj", and would
# run for hours). The `regex` package's own timeout did not bound it either (a 3 s timeout
# fired after 24-106 s). So the names are matched in a child interpreter, killed at this budget.
PATTERN_MATCH_BUDGET_S = 5.0

_MATCH_SCRIPT = """\
import json, re, sys
request = json.load(sys.stdin)
pattern = re.compile(request["pattern"])
json.dump([index for index, name in enumerate(request["names"]) if pattern.fullmatch(name)], sys.stdout)
"""


def match_module_names(pattern: str, names: list[str], budget_s: float | None = None) -> set[int]:
    """Indices of the ``names`` that ``pattern`` matches in full (``re.fullmatch``), computed in
    a child interpreter that is killed after ``budget_s`` (default :data:`PATTERN_MATCH_BUDGET_S`)
    seconds; a pattern that needs longer is refused with a :class:`DetectionError`."""
    budget_s = PATTERN_MATCH_BUDGET_S if budget_s is None else budget_s
    request = json.dumps({"pattern": pattern, "names": names})
    try:
        # -I -S: stdlib only (no site, no PYTHONPATH, no current folder), so startup is quick.
        done = subprocess.run([sys.executable, "-I", "-S", "-c", _MATCH_SCRIPT], input=request, text=True,
                              capture_output=True, timeout=budget_s, check=False)
    except subprocess.TimeoutExpired:  # (the child was killed)
        raise DetectionError(
            f"expert_parallel.moe_layer_pattern={pattern!r} did not finish matching the model's {len(names)} "
            f"module names within {budget_s:g} s, the limit on pattern matching: it backtracks catastrophically, "
            "typically from nested quantifiers such as '(a+)+' or '(.*)*'. Use a plain pattern such as "
            "'model\\.layers\\.\\d+\\.mlp'.") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DetectionError(
            f"expert_parallel.moe_layer_pattern={pattern!r}: matching module names failed in the child "
            f"interpreter (exit code {done.returncode}): {last}")
    return set(json.loads(done.stdout))


def detect(model: nn.Module, config: AutoEPConfig) -> list[MoELayerSpec] | list[ExpertsSpec]:
    """One spec per MoE block of ``model`` (in module order): :class:`MoELayerSpec` for a whole-block
    replacement (a family-table row declares the routing), :class:`ExpertsSpec` for an experts-level
    one (the model's own router stays). ``expert_parallel.replacement`` chooses; ``"auto"`` takes the
    whole block where a row declares this model's routing, and the experts level where none does
    (no row, a refused family, or a config the row cannot declare: the reason is logged)."""
    refusal = _refusal(model)
    if refusal is not None and refusal.hard:
        raise DetectionError(
            f"model.config.model_type={getattr(model.config, 'model_type', None)!r} is a MoE family AutoEP refuses in "
            f"every mode: {refusal.reason} (established on transformers{refusal.versions}; `autoep inspect "
            "--families` lists every family).")
    if config.replacement == "experts":
        return detect_experts_level(model, config, "expert_parallel.replacement='experts'")
    try:
        return detect_blocks(model, config)
    except DetectionError as error:
        # A named preset or a setting of the whole-block replacement says which one the user wants.
        if config.replacement == "block" or config.preset_model is not None or config.block_only_settings():
            raise
        try:
            specs = detect_experts_level(model, config, str(error))
        except DetectionError as experts_error:
            raise DetectionError(f"{error} (the experts-level replacement is not possible either: "
                                 f"{experts_error})") from None
        logger.warning("autoep: %s: no whole-block replacement (%s); replacing the experts modules only (the model's "
                       "own router and block code stay); set expert_parallel.replacement to 'experts' to choose this "
                       "without the warning", type(model).__name__, error)
        return specs


def _refusal(model: nn.Module):
    if not hasattr(model, "config"):
        return None
    model_type, outer_type = model_types(model)
    return REFUSED_MODEL_TYPES.get(model_type) or REFUSED_MODEL_TYPES.get(outer_type)


def model_types(model: nn.Module) -> tuple[str | None, str | None]:
    """(text backbone's model type, the model's own)."""
    return getattr(text_config(model), "model_type", None), getattr(model.config, "model_type", None)


def detect_experts_level(model: nn.Module, config: AutoEPConfig, reason: str) -> list[ExpertsSpec]:
    """One :class:`ExpertsSpec` per experts module with Transformers' uniform interface (narrowed
    by ``moe_layer_pattern``, matched against the experts module's name or its parent's)."""
    model_type, outer_type = model_types(model) if hasattr(model, "config") else (None, None)
    family = MODEL_TYPE_TO_PRESET.get(model_type) or MODEL_TYPE_TO_PRESET.get(outer_type) or model_type or \
        outer_type or type(model).__name__
    found = interface_modules(model)
    if config.moe_layer_pattern:
        names = [name for name, _ in found] + [name.rpartition(".")[0] for name, _ in found]
        matched = match_module_names(config.moe_layer_pattern, names)
        found = [item for index, item in enumerate(found) if index in matched or index + len(found) in matched]
    if not found:
        refusal = REFUSED_MODEL_TYPES.get(model_type) or REFUSED_MODEL_TYPES.get(outer_type)
        overriding = [f"{name} ({type(module).__name__})" for name, module in model.named_modules()
                      if overrides_interface(module)]
        others = other_fused_experts(model, [])
        detail = (f"; {type(model).__name__} holds fused experts without the interface: {', '.join(others[:4])}"
                  if others else "")
        if overriding:
            detail += (f"; experts classes that override the interface's forward (computing what its flags do not "
                       f"describe): {', '.join(overriding[:4])}")
        where = f" matching moe_layer_pattern {config.moe_layer_pattern!r}" if config.moe_layer_pattern else ""
        message = (f"no experts module with Transformers' uniform interface (@use_experts_implementation){where} "
                   f"found in {type(model).__name__}{detail}")
        if refusal is not None:
            message += f"; model type {outer_type!r}: {refusal.reason}"
        raise DetectionError(message)
    specs = []
    for name, module in found:
        try:
            specs.append(experts_spec(name, module, family, model_type or outer_type or "-", reason))
        except ExpertsInterfaceError as error:
            raise DetectionError(str(error)) from None
        specs[-1].block = model.get_submodule(specs[-1].name) if specs[-1].name else model
    if not config.moe_layer_pattern:
        _warn_other_moe_blocks(model, specs, "whose experts modules have the uniform interface")
    return specs


def detect_blocks(model: nn.Module, config: AutoEPConfig) -> list[MoELayerSpec]:
    """Whole-block detection: one :class:`MoELayerSpec` per block the family row describes."""
    preset, model_type = resolve_preset(model, config)
    cfg = text_config(model)
    block_class = preset.block_classes.get(model_type) or preset.block_classes.get(
        getattr(model.config, "model_type", None))
    pattern = re.compile(config.moe_layer_pattern) if config.moe_layer_pattern else None
    if block_class is None and pattern is None:
        raise DetectionError(
            f"preset {preset.name!r} does not cover model type {model_type!r} (it covers "
            f"{', '.join(preset.block_classes)}); set expert_parallel.moe_layer_pattern to name the blocks.")

    num_experts_fields = (config.num_experts_attr,) if config.num_experts_attr else preset.num_experts_fields
    top_k_field = config.top_k_attr or preset.top_k_field
    num_experts = _config_int(cfg, num_experts_fields, "expert count")
    if config.top_k != AUTO:
        top_k = int(config.top_k)
    else:
        top_k = _config_int(cfg, (top_k_field,), "experts per token (top-k)")
    intermediate = _config_int(cfg, (preset.intermediate_field,), "expert width")
    hidden = _config_int(cfg, ("hidden_size",), "hidden size")
    # What the config names; each block's activation is read from its modules (_check_block).
    activation = getattr(cfg, "hidden_act", None)
    jitter = getattr(cfg, "router_jitter_noise", 0.0) or 0.0
    if jitter > 0:
        raise DetectionError(
            f"model.config.router_jitter_noise={jitter} > 0: training-time router jitter is not reproduced by "
            "AutoEP; set model.config.router_jitter_noise = 0.0 before applying AutoEP.")
    try:
        routing = _routing_for(preset, cfg, num_experts, top_k, config)
    except ValueError as error:
        if isinstance(error, DetectionError):
            raise
        raise DetectionError(f"preset {preset.name!r}: {error}") from None

    router_attr = config.router_pattern or preset.router_attr
    experts_attr = config.expert_pattern or preset.experts_attr
    gate_up_name = config.expert_w1 or preset.gate_up_name
    down_name = config.expert_w2 or preset.down_name
    shared_attr, shared_gate_attr = preset.shared_for(model_type)
    if config.shared_experts_pattern is not None:
        shared_attr = config.shared_experts_pattern
    if config.shared_experts_gate_pattern is not None:
        shared_gate_attr = config.shared_experts_gate_pattern
    if config.has_shared_experts is False:
        # a block that still holds shared experts then fails the "unknown submodules" check
        shared_attr = shared_gate_attr = None
    elif config.has_shared_experts and shared_attr is None:
        raise DetectionError(
            "expert_parallel.has_shared_experts=true but no shared expert module is named: set "
            "expert_parallel.shared_experts_pattern.")
    if shared_gate_attr is not None and shared_attr is None:
        raise DetectionError(
            f"expert_parallel.shared_experts_gate_pattern={shared_gate_attr!r} names a gate but no shared expert "
            "is named: set expert_parallel.shared_experts_pattern too.")

    specs: list[MoELayerSpec] = []
    modules = list(model.named_modules())
    if pattern is not None:
        chosen = match_module_names(config.moe_layer_pattern, [name for name, _ in modules])
    else:
        chosen = {index for index, (_, module) in enumerate(modules) if type(module).__name__ == block_class}
        if not chosen:  # by structure: the row's router and experts names with the row's shapes, whatever the class
            chosen = {index for index, (_, module) in enumerate(modules)
                      if _has_row_structure(module, router_attr, experts_attr, gate_up_name, down_name, num_experts,
                                            intermediate, hidden)}
            if chosen:
                logger.info("autoep: %d MoE blocks found by structure (router %r, experts %r with %s/%s of the "
                            "preset's shapes) in %s", len(chosen), router_attr, experts_attr, gate_up_name, down_name,
                            type(model).__name__)
    for index, (name, module) in enumerate(modules):
        if index not in chosen:
            continue
        specs.append(_check_block(
            name, module, preset, model_type, routing, num_experts, top_k, hidden, intermediate, activation,
            router_attr, experts_attr, gate_up_name, down_name, shared_attr, shared_gate_attr))
        check_module_routing(specs[-1], module, preset, config)
    if not specs:
        where = (f"matching moe_layer_pattern {config.moe_layer_pattern!r}" if pattern else
                 f"of class {block_class} or with the preset's structure (a router {router_attr!r} with a weight "
                 f"[{num_experts}, {hidden}], experts {experts_attr!r} with {gate_up_name} [{num_experts}, "
                 f"{2 * intermediate}, {hidden}] and {down_name} [{num_experts}, {hidden}, {intermediate}])")
        raise DetectionError(f"no MoE block {where} found in {type(model).__name__} (preset {preset.name!r}).")
    if pattern is None:
        _warn_other_moe_blocks(model, specs, f"the {preset.name!r} family describes")
    return specs


def other_fused_experts(model: nn.Module, specs: list[MoELayerSpec]) -> list[str]:
    """Modules holding fused experts (3-D ``gate_up_proj`` / ``down_proj``) outside every described
    block, e.g. Qwen3-Omni's Talker or dots.ocr's vision MoE beside the language model's blocks."""
    covered = tuple(spec.name + "." for spec in specs)
    return sorted({name.rsplit(".", 1)[0] for name, param in model.named_parameters()
                   if param.dim() == 3 and name.rsplit(".", 1)[-1] in ("gate_up_proj", "down_proj")
                   and not name.startswith(covered)})


def _warn_other_moe_blocks(model: nn.Module, specs: list, described: str) -> None:
    """Experts the family row does not describe stay the stock modules: computed exactly, but dense
    (every rank holds all of them; their gradients reduce like any replicated parameter). Said once,
    so a user never mistakes them for expert-parallel ones."""
    others = other_fused_experts(model, specs)
    if others:
        shown = ", ".join(f"{name} ({type(model.get_submodule(name)).__name__})" for name in others[:4])
        more = f" and {len(others) - 4} more" if len(others) > 4 else ""
        logger.warning(
            "autoep: %s holds fused experts outside the %d MoE blocks %s: %s%s. They stay "
            "dense, unreplaced (replicated on every rank, not expert-parallel); set expert_parallel."
            "moe_layer_pattern to choose the blocks explicitly and silence this.", type(model).__name__, len(specs),
            described, shown, more)


def experts_activation(where: str, experts: nn.Module, config_activation) -> str:
    """Canonical name of the activation the original experts apply: read from their ``act_fn``
    (what the stock forward calls, even when replaced after construction), else from
    ``config.hidden_act``. A module that disagrees with the config is followed, as Transformers does."""
    act = getattr(experts, "act_fn", None)
    if act is None:
        if config_activation in CONFIG_NAMES:
            return CONFIG_NAMES[config_activation]
        raise DetectionError(
            f"{where}: the experts have no act_fn and model.config.hidden_act={config_activation!r} is not "
            f"supported by the AutoEP experts; supported: {', '.join(SUPPORTED_ACTIVATIONS)}.")
    try:
        name = identify_activation(act)
    except UnsupportedActivationError as error:
        raise DetectionError(f"{where}: experts.act_fn: {error}") from None
    if CONFIG_NAMES.get(config_activation) != name:
        logger.warning("autoep: %s: experts.act_fn is %s (%s) but model.config.hidden_act=%r; AutoEP follows "
                       "act_fn, which is what the original experts call", where, type(act).__name__, name,
                       config_activation)
    return name


def _routed_activation(where: str, experts: nn.Module, config_activation, preset: Preset) -> tuple[str, tuple]:
    """(canonical name, parameters) of the routed experts' gated activation. A row that declares
    the clamped SwiGLU reads alpha/limit from the experts; any other row refuses experts that
    carry clamp settings or their own ``_apply_gate`` (a GLU other than ``act_fn(gate) * up``)."""
    if preset.clamped_swiglu is not None:
        try:
            return CLAMPED_SWIGLU, clamped_swiglu_params(experts, *preset.clamped_swiglu, f"{where}: experts")
        except UnsupportedActivationError as error:
            raise DetectionError(str(error)) from None
    clamps = {attr: getattr(experts, attr) for attr in CLAMP_ATTRIBUTES if getattr(experts, attr, None) is not None}
    if clamps or (has_custom_gate(experts) and not _custom_gate_is_plain(experts)):
        detail = f"clamp settings {clamps}" if clamps else f"their own {type(experts).__name__}._apply_gate"
        raise DetectionError(
            f"{where}: the experts carry {detail}: their gated activation is not act_fn(gate) * up, and preset "
            f"{preset.name!r} declares no other (only the clamped GPT-OSS SwiGLU, Preset.clamped_swiglu, is "
            "known). Refusing rather than computing another function.")
    return experts_activation(where, experts, config_activation), ()


def _custom_gate_is_plain(experts: nn.Module) -> bool:
    """The class's own ``_apply_gate`` is one the gates table (autoep/presets/gates.py) declares with
    an optional clamp, and the clamp is unset here: it computes ``act_fn(gate) * up``, as the row's
    experts do (Bailing-hybrid's experts on Transformers 5.25 without a swiglu limit)."""
    owner = type(experts)._apply_gate.__qualname__.split(".")[0]
    kind, paths = CUSTOM_GATES.get(owner, (None, ()))
    return kind in ("act_then_clamp", "clamp_then_act") and all(getattr(experts, path, None) is None for path in paths)


def _shared_activation(mlp: nn.Module, preset: Preset) -> tuple[str | None, tuple]:
    """The shared expert MLP's activation (None when AutoEP does not know it: the layer calls the
    original MLP, only the reference needs the formula)."""
    if preset.clamped_swiglu is not None and getattr(mlp, "act_fn", None) is None:
        try:
            return CLAMPED_SWIGLU, clamped_swiglu_params(mlp, *preset.clamped_swiglu, "shared expert")
        except UnsupportedActivationError:
            return None, ()
    if any(getattr(mlp, attr, None) is not None for attr in CLAMP_ATTRIBUTES):
        return None, ()
    try:
        return identify_activation(getattr(mlp, "act_fn", None)), ()
    except UnsupportedActivationError:
        return None, ()


def check_module_routing(spec: MoELayerSpec, block: nn.Module, preset: Preset, config: AutoEPConfig) -> None:
    """The routing the layer would compute (read from ``model.config`` through the row) against what the
    block's own modules hold: a router or block attribute that the stock forward reads (``top_k``, the
    expert count, ``norm_topk_prob``, ``routed_scaling_factor``, ``n_group``/``topk_group``) and that
    disagrees with the config is refused naming both values (the stock block routes with its own
    attribute; computing the config's routing would silently differ). A value set by an
    ``expert_parallel`` routing override is the user's choice and is not compared."""
    routing = spec.routing
    wanted: dict[str, object] = {"num_experts": routing.num_experts, "n_routed_experts": routing.num_experts}
    if config.top_k == AUTO:
        wanted.update(top_k=routing.top_k, num_experts_per_tok=routing.top_k)
    if isinstance(preset.routing.renormalize, str) and config.route_norm is None:
        wanted[preset.routing.renormalize] = routing.renormalize
    if preset.routing.scale_field and config.routed_scaling_factor == AUTO and config.route_scale == 1.0:
        wanted[preset.routing.scale_field] = routing.scale
    if routing.num_groups is not None and config.num_expert_groups is None:
        wanted.update(n_group=routing.num_groups, topk_group=routing.topk_groups)
    router = getattr(block, spec.router_attr)
    for owner, label in ((router, spec.router_attr), (block, None)):
        for attribute, want in wanted.items():
            value = vars(owner).get(attribute)
            if isinstance(value, bool) != isinstance(want, bool) or not isinstance(value, (int, float)):
                continue
            if float(value) != float(want):
                where = f"MoE block {spec.name!r} ({type(block).__name__})"
                path = f"{label}.{attribute}" if label else attribute
                raise DetectionError(
                    f"{where}: {path}={value!r}, but the routing read from model.config gives {attribute}={want!r}: "
                    "the stock block routes with its own value, so the whole-block replacement would compute "
                    f"another routing. Make model.config agree with the block (or set expert_parallel.replacement "
                    "to 'experts', which keeps the block's own router).")


def _check_block(name, block, preset, model_type, routing, num_experts, top_k, hidden, intermediate,
                 config_activation, router_attr, experts_attr, gate_up_name, down_name, shared_attr,
                 shared_gate_attr) -> MoELayerSpec:
    where = f"MoE block {name!r} ({type(block).__name__})"
    router = getattr(block, router_attr, None)
    experts = getattr(block, experts_attr, None)
    if router is None or experts is None:
        raise DetectionError(f"{where} has no router {router_attr!r} or experts {experts_attr!r} submodule.")
    if isinstance(experts, nn.ModuleList):
        raise UnsupportedTransformersError(
            f"{where}: experts are a ModuleList of per-expert layers (the Transformers 4.x layout, installed "
            f"transformers {transformers_version()}); AutoEP needs the fused 5.x layout (transformers>=5.0).")
    weight = getattr(router, "weight", None)
    if not isinstance(weight, torch.Tensor) or _shape(weight) != (num_experts, hidden):
        raise DetectionError(
            f"{where}: router weight {router_attr}.weight has shape "
            f"{None if weight is None else _shape(weight)}, expected [num_experts={num_experts}, hidden={hidden}].")
    if getattr(router, "bias", None) is not None:
        raise DetectionError(f"{where}: router {router_attr} has a bias; the preset's routing has none.")
    gate_up = getattr(experts, gate_up_name, None)
    down = getattr(experts, down_name, None)
    if not isinstance(gate_up, nn.Parameter) or not isinstance(down, nn.Parameter):
        raise DetectionError(
            f"{where}: experts {experts_attr!r} lack fused parameters {gate_up_name!r} / {down_name!r}.")
    if _shape(gate_up) != (num_experts, 2 * intermediate, hidden):
        raise DetectionError(
            f"{where}: {experts_attr}.{gate_up_name} has shape {_shape(gate_up)}, expected "
            f"[E={num_experts}, 2I={2 * intermediate}, H={hidden}].")
    if _shape(down) != (num_experts, hidden, intermediate):
        raise DetectionError(
            f"{where}: {experts_attr}.{down_name} has shape {_shape(down)}, expected "
            f"[E={num_experts}, H={hidden}, I={intermediate}].")
    for bias_name in (f"{gate_up_name}_bias", f"{down_name}_bias"):
        if getattr(experts, bias_name, None) is not None:
            raise DetectionError(f"{where}: experts carry {bias_name}; biased experts are not supported.")
    # (before the parameter check: PReLU holds a parameter)
    activation, activation_params = _routed_activation(where, experts, config_activation, preset)
    extra_params = {n for n, _ in experts.named_parameters(recurse=True)} - {gate_up_name, down_name}
    if extra_params:
        raise DetectionError(f"{where}: experts hold unexpected parameters {sorted(extra_params)}.")
    if routing.use_correction_bias and not isinstance(getattr(router, "e_score_correction_bias", None), torch.Tensor):
        raise DetectionError(f"{where}: routing uses e_score_correction_bias but {router_attr} has none.")
    own_state = list(block._parameters) + list(block._buffers)
    if own_state:
        raise DetectionError(f"{where} holds parameters/buffers {own_state} directly (not in a submodule); the "
                             "preset's block has none, so AutoEP would not know what they do.")

    if shared_attr is not None and getattr(block, shared_attr, None) is None:
        raise DetectionError(f"{where}: shared expert {shared_attr!r} not found.")
    if shared_gate_attr is not None and getattr(block, shared_gate_attr, None) is None:
        raise DetectionError(f"{where}: shared expert gate {shared_gate_attr!r} not found.")
    understood = {router_attr, experts_attr} | {attr for attr in (shared_attr, shared_gate_attr) if attr}
    unknown = [child for child, _ in block.named_children() if child not in understood]
    if unknown:
        raise DetectionError(
            f"{where} has submodules {unknown} that the preset does not describe (known: {sorted(understood)}); "
            "refusing to replace a block it does not fully understand. If they are shared experts, set "
            "expert_parallel.shared_experts_pattern / shared_experts_gate_pattern.")
    if shared_attr is not None:
        _check_shared_mlp(where, getattr(block, shared_attr), hidden)
    if shared_gate_attr is not None:
        gate = getattr(block, shared_gate_attr)
        if _shape(gate.weight) != (1, hidden) or getattr(gate, "bias", None) is not None:
            raise DetectionError(f"{where}: shared expert gate must be Linear(H={hidden}, 1) without bias.")
    shared_activation, shared_params = (_shared_activation(getattr(block, shared_attr), preset) if shared_attr
                                        else (None, ()))
    return MoELayerSpec(
        name=name, block_class=type(block).__name__, preset=preset.name, model_type=model_type, routing=routing,
        num_experts=num_experts, top_k=top_k, hidden_size=hidden, intermediate_size=intermediate,
        activation=activation, router_attr=router_attr, experts_attr=experts_attr, gate_up_name=gate_up_name,
        down_name=down_name, shared_attr=shared_attr, shared_gate_attr=shared_gate_attr,
        shared_activation=shared_activation, activation_params=activation_params,
        shared_activation_params=shared_params, block=block)


def _check_shared_mlp(where: str, mlp: nn.Module, hidden: int) -> None:
    if getattr(mlp, "gate_proj", None) is None and isinstance(getattr(mlp, "gate_up_proj", None), nn.Linear):
        _check_fused_shared_mlp(where, mlp, hidden)
        return
    for proj in ("gate_proj", "up_proj", "down_proj"):
        layer = getattr(mlp, proj, None)
        if layer is None or getattr(layer, "bias", None) is not None:
            raise DetectionError(f"{where}: shared expert must be a SwiGLU MLP with bias-free {proj}.")
    if _shape(mlp.gate_proj.weight)[1] != hidden or _shape(mlp.down_proj.weight)[0] != hidden:
        raise DetectionError(f"{where}: shared expert width does not match hidden size {hidden}.")


def _check_fused_shared_mlp(where: str, mlp: nn.Module, hidden: int) -> None:
    """A shared expert whose gate and up projections are one Linear(H, 2I): gate rows, then up rows."""
    gate_up, down = mlp.gate_up_proj, getattr(mlp, "down_proj", None)
    if not isinstance(down, nn.Linear) or gate_up.bias is not None or down.bias is not None:
        raise DetectionError(f"{where}: shared expert with a fused gate_up_proj needs a down_proj Linear; neither "
                             "may have a bias.")
    two_i, in_features = _shape(gate_up.weight)
    if in_features != hidden or two_i % 2 or _shape(down.weight) != (hidden, two_i // 2):
        raise DetectionError(
            f"{where}: shared expert gate_up_proj {_shape(gate_up.weight)} / down_proj "
            f"{_shape(down.weight)} are not [2I, H={hidden}] / [H={hidden}, I].")
