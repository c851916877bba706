"""`autoep.apply` and `autoep.inspect`: the one-process entry points."""

from __future__ import annotations

import logging
from typing import Any, Mapping

from torch import nn

from autoep.config import AutoEPConfig, AutoEPConfigError, as_config
from autoep.detect import MoELayerSpec, detect
from autoep.layer import AutoEPMoELayer, build_layer

logger = logging.getLogger("autoep")


def _resolve(config: AutoEPConfig | Mapping[str, Any] | None) -> AutoEPConfig:
    # Calling apply() is the intent to apply: a block without "enabled" counts as enabled.
    if isinstance(config, Mapping) and "enabled" not in config:
        config = {**config, "enabled": True}
    return as_config(config)


def inspect(model: nn.Module, config: AutoEPConfig | Mapping[str, Any] | None = None) -> list[MoELayerSpec]:
    """The MoE blocks AutoEP would replace (nothing is changed)."""
    return detect(model, _resolve(config))


def replaced_layers(model: nn.Module) -> list[tuple[str, AutoEPMoELayer]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, AutoEPMoELayer)]


def apply(model: nn.Module, config: AutoEPConfig | Mapping[str, Any] | None = None) -> nn.Module:
    """Replace every detected MoE block of ``model`` in place; returns ``model``.

    Everything is validated before the first module is replaced.
    """
    config = _resolve(config)
    if not config.enabled:
        logger.info("autoep: expert_parallel.enabled is false; model left unchanged")
        return model
    if replaced_layers(model):
        raise ValueError("autoep.apply: the model already holds AutoEPMoELayer modules (applied twice?)")
    specs = detect(model, config)
    ep_size, ep_rank = config.autoep_size, 0
    for spec in specs:
        if spec.num_experts % ep_size:
            raise AutoEPConfigError(
                f"expert_parallel.autoep_size={ep_size} does not divide the {spec.num_experts} experts of "
                f"{spec.name!r}; valid sizes: {[d for d in range(1, spec.num_experts + 1) if spec.num_experts % d == 0]}.")
    if ep_size > 1:
        raise NotImplementedError(
            f"expert_parallel.autoep_size={ep_size} > 1 needs the expert-parallel runtime (torch.distributed "
            "EP groups and AllToAll dispatch), which is not implemented yet; use autoep_size=1.")
    for spec in specs:
        layer = build_layer(spec, use_grouped_mm=config.use_grouped_mm, ep_rank=ep_rank, ep_size=ep_size)
        model.set_submodule(spec.name, layer)
    logger.info("autoep: replaced %d MoE blocks (preset %s)", len(specs), specs[0].preset)
    return model
