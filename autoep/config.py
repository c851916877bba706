"""The ``"expert_parallel"`` block of a DeepSpeed config: parsing, defaults, validation.

Every key is read explicitly. An unknown key, a value of the wrong type or an
unsupported value raises :class:`AutoEPConfigError` (a ``ValueError``) that names the
key, the value and what is allowed, so a typo never passes silently.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

AUTO = "auto"
REPLACEMENTS = (AUTO, "block", "experts")  # expert_parallel.replacement
# Keys that describe the whole-block replacement (AutoEP's router and the block's parts).
BLOCK_ONLY_KEYS = ("router_pattern", "expert_pattern", "expert_w1", "expert_w2", "num_experts_attr", "top_k_attr",
                   "has_shared_experts", "shared_experts_pattern", "shared_experts_gate_pattern", "route_norm",
                   "route_scale", "score_func", "top_k", "num_expert_groups", "num_limited_groups",
                   "routed_scaling_factor")


class AutoEPConfigError(ValueError):
    """A bad value in the ``expert_parallel`` block (or a config it conflicts with)."""


# Keys that DeepSpeed's own AutoEP understands but that select DeepSpeed-internal
# kernels or communication backends; we do not implement them and say so.
_DEEPSPEED_ONLY_KEYS = {
    "validate_folding_routing", "async_split_plan", "disable_triton_grouped_mm", "score_apply",
    "combine_impl", "row_weighting_impl", "gate_up_impl", "comm_backend", "comm_num_sm",
    "comm_qp_margin", "comm_max_tokens_per_rank", "expert_activation",
}


@dataclass(frozen=True)
class AutoEPConfig:
    """Parsed ``expert_parallel`` block. ``None`` / ``"auto"`` mean: from the preset and
    the model's config."""

    enabled: bool = False
    autoep_size: int = 1
    preset_model: str | None = None
    # Detection overrides (names of modules / attributes, regex for block paths).
    moe_layer_pattern: str | None = None
    router_pattern: str | None = None
    expert_pattern: str | None = None
    expert_w1: str | None = None
    expert_w2: str | None = None
    expert_w3: str | None = None
    num_experts_attr: str | None = None
    top_k_attr: str | None = None
    has_shared_experts: bool | None = None
    shared_experts_pattern: str | None = None
    shared_experts_gate_pattern: str | None = None
    # What is replaced: "block" (the whole MoE block: the family table's routing row, AutoEP's
    # router), "experts" (only the fused experts module: the model's own router and block code
    # stay), or "auto" (block where the table has a row that declares this config, else experts).
    replacement: str = AUTO
    # Kernels.
    use_grouped_mm: bool = True
    # Routing overrides.
    route_norm: bool | None = None
    route_scale: float = 1.0
    score_func: str = AUTO
    top_k: int | str = AUTO
    num_expert_groups: int | None = None
    num_limited_groups: int | None = None
    routed_scaling_factor: float | str = AUTO
    load_balance_coeff: float | None = None
    expert_tensor_parallel_size: int = 1

    @classmethod
    def from_dict(cls, block: Mapping[str, Any] | None) -> "AutoEPConfig":
        if block is None:
            return cls()
        if not isinstance(block, Mapping):
            raise AutoEPConfigError(
                f"expert_parallel must be a JSON object (dict), got {type(block).__name__}: {show(block)}")
        known = [f.name for f in fields(cls)]
        for key in block:
            if key in known:
                continue
            if key in _DEEPSPEED_ONLY_KEYS:
                raise AutoEPConfigError(
                    f"expert_parallel.{key}={show(block[key])} is a tuning key of DeepSpeed's built-in AutoEP "
                    f"that autoep does not implement; remove it from the config.")
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise AutoEPConfigError(
                f"expert_parallel has unknown key {show(key)} (value {show(block[key])}).{hint} "
                f"Known keys: {', '.join(known)}.")
        values = {key: _check(key, block[key]) for key in block}
        config = cls(**values)
        config._validate()
        return config

    def block_only_settings(self) -> dict[str, Any]:
        """The keys set here that only a whole-block replacement can honour (routing overrides and
        the names of the block's parts): an experts-level replacement keeps the model's router."""
        defaults = AutoEPConfig()
        return {key: getattr(self, key) for key in BLOCK_ONLY_KEYS if getattr(self, key) != getattr(defaults, key)}

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def _validate(self) -> None:
        if self.autoep_size < 1:
            raise AutoEPConfigError(
                f"expert_parallel.autoep_size must be an integer >= 1, got {show(self.autoep_size)}.")
        if self.load_balance_coeff is not None:
            raise AutoEPConfigError(
                f"expert_parallel.load_balance_coeff={show(self.load_balance_coeff)} is not supported: "
                "auxiliary-loss-free load balancing (expert-bias updates) is not implemented. "
                "Set it to null or remove the key.")
        if self.expert_tensor_parallel_size != 1:
            raise AutoEPConfigError(
                f"expert_parallel.expert_tensor_parallel_size={show(self.expert_tensor_parallel_size)} is not "
                "supported; only 1 (experts are not tensor-parallel) is. Set it to 1 or remove the key.")
        if self.expert_w3 is not None:
            raise AutoEPConfigError(
                f"expert_parallel.expert_w3={show(self.expert_w3)}: a separate up-projection is not supported; "
                "Transformers 5.x stores experts fused as gate_up_proj [E, 2I, H]. Remove the key (or set null).")
        if self.preset_model is not None:
            from autoep.presets import PRESETS, REFUSED_MODEL_TYPES

            refusal = REFUSED_MODEL_TYPES.get(self.preset_model)
            if self.preset_model not in PRESETS and refusal is not None:
                fix = ("" if refusal.hard else " The family runs at the experts level (its own router, AutoEP's "
                       "experts): remove preset_model, or set replacement to 'experts'.")
                raise AutoEPConfigError(
                    f"expert_parallel.preset_model={show(self.preset_model)} names a MoE family without a whole-block "
                    f"row{' that AutoEP refuses in every mode' if refusal.hard else ''}: {refusal.reason} (established "
                    f"on transformers{refusal.versions}).{fix}")
            if self.preset_model not in PRESETS:
                raise AutoEPConfigError(
                    f"expert_parallel.preset_model={show(self.preset_model)} is not a known preset. "
                    f"Available presets: {', '.join(sorted(PRESETS))}.")
        if self.route_scale != 1.0 and self.routed_scaling_factor != AUTO:
            raise AutoEPConfigError(
                f"expert_parallel.route_scale={show(self.route_scale)} and "
                f"expert_parallel.routed_scaling_factor={show(self.routed_scaling_factor)} both set the routing "
                "scale; set only routed_scaling_factor.")
        if (self.num_expert_groups is None) != (self.num_limited_groups is None):
            raise AutoEPConfigError(
                "expert_parallel.num_expert_groups and expert_parallel.num_limited_groups must be set together "
                f"(got num_expert_groups={show(self.num_expert_groups)}, "
                f"num_limited_groups={show(self.num_limited_groups)}).")
        block_only = self.block_only_settings()
        if self.replacement == "experts" and block_only:
            raise AutoEPConfigError(
                f"expert_parallel.replacement='experts' keeps the model's own router and block, but "
                f"{', '.join(f'expert_parallel.{key}={show(value)}' for key, value in block_only.items())} "
                "describe(s) AutoEP's whole-block replacement; remove them or set replacement to 'block' or 'auto'.")
        if self.moe_layer_pattern is not None:
            import re

            try:
                re.compile(self.moe_layer_pattern)
            except (re.error, OverflowError, RecursionError) as error:  # e.g. a{99999999999}, deep nesting
                raise AutoEPConfigError(
                    f"expert_parallel.moe_layer_pattern={show(self.moe_layer_pattern)} is not a valid Python "
                    f"regular expression: {type(error).__name__}: {error}.") from None


# Integer keys count ranks, experts or groups; a larger value is never meaningful, and an int
# of thousands of digits cannot even be printed in an error message (Python's int-to-str limit).
MAX_INT = 2**31 - 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value <= MAX_INT


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool). An int beyond the float range is not: the routing
    scale is used as a float."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large to convert to float
        return False


_SHOW_CHARS = 120


def show(value: Any) -> str:
    """``repr`` of a config value for an error message, bounded: a hostile value (an int of
    thousands of digits, a huge or deeply nested list) must not make the message itself fail
    or flood the terminal."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"<an integer of {value.bit_length()} bits>"
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        return f"<a {type(value).__name__} too large to print>"
    return text if len(text) <= _SHOW_CHARS else text[:_SHOW_CHARS - 3] + "..."


def _expect(key: str, value: Any, ok: bool, allowed: str) -> Any:
    if not ok:
        raise AutoEPConfigError(f"expert_parallel.{key} must be {allowed}, got {show(value)} ({type(value).__name__}).")
    return value


_STRING_OR_NULL = {
    "preset_model", "moe_layer_pattern", "router_pattern", "expert_pattern", "expert_w1", "expert_w2",
    "expert_w3", "num_experts_attr", "top_k_attr", "shared_experts_pattern", "shared_experts_gate_pattern",
}
_POSITIVE_INT_OR_NULL = {"num_expert_groups", "num_limited_groups"}


def _check(key: str, value: Any) -> Any:
    """Type-check one key of the block; returns the (normalised) value."""
    if key == "enabled" or key == "use_grouped_mm":
        return _expect(key, value, isinstance(value, bool), "true or false")
    if key in ("has_shared_experts", "route_norm"):
        return _expect(key, value, value is None or isinstance(value, bool), "true, false or null")
    if key in ("autoep_size", "expert_tensor_parallel_size"):
        return _expect(key, value, _is_int(value), f"an integer <= {MAX_INT}")
    if key in _STRING_OR_NULL:
        return _expect(key, value, value is None or (isinstance(value, str) and value != ""),
                       "a non-empty string or null")
    if key in _POSITIVE_INT_OR_NULL:
        return _expect(key, value, value is None or (_is_int(value) and value >= 1),
                       f"a positive integer <= {MAX_INT} or null")
    if key == "replacement":
        return _expect(key, value, value in REPLACEMENTS, '"auto", "block" or "experts"')
    if key == "score_func":
        return _expect(key, value, value in (AUTO, "softmax", "sigmoid"), '"auto", "softmax" or "sigmoid"')
    if key == "top_k":
        return _expect(key, value, value == AUTO or (_is_int(value) and value >= 1),
                       f'"auto" or an integer >= 1 and <= {MAX_INT}')
    if key == "route_scale":
        return float(_expect(key, value, _is_number(value) and value > 0, "a finite number > 0"))
    if key == "routed_scaling_factor":
        ok = value == AUTO or (_is_number(value) and value > 0)
        value = _expect(key, value, ok, '"auto" or a finite number > 0')
        return value if value == AUTO else float(value)
    if key == "load_balance_coeff":
        return value  # any non-null value is rejected with its own message in _validate
    raise AssertionError(f"unhandled key {key}")  # every dataclass field is handled above


def as_config(config: "AutoEPConfig | Mapping[str, Any] | None") -> AutoEPConfig:
    """Accept an ``AutoEPConfig``, the block as a dict, or None (all defaults, enabled)."""
    if isinstance(config, AutoEPConfig):
        return config
    if config is None:
        return AutoEPConfig(enabled=True)
    return AutoEPConfig.from_dict(config)
