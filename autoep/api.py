"""`autoep.apply` (one process, or every rank of a torch.distributed job) and `autoep.inspect`."""

from __future__ import annotations

import contextlib
import gc
import logging
from typing import Any, Mapping, Protocol

from torch import nn

from autoep.config import AutoEPConfig, as_config
from autoep.detect import MoELayerSpec, detect
from autoep.experts_level import AutoEPExpertsMixin, ExpertsSpec, build_experts, check_experts_replaceable
from autoep.groups import ExpertParallelGroups, build_groups, check_autoep_size
from autoep.layer import AutoEPMoELayer, build_layer, check_replaceable

logger = logging.getLogger("autoep")


def _resolve(config: AutoEPConfig | Mapping[str, Any] | None) -> AutoEPConfig:
    # Calling apply() is the intent to apply: a block without "enabled" counts as enabled.
    if isinstance(config, Mapping) and "enabled" not in config:
        config = {**config, "enabled": True}
    return as_config(config)


# Wrappers a model may come in, and why AutoEP must see the model itself.
_WRAPPERS = {
    "DistributedDataParallel": "DDP averages every gradient over all ranks, expert slices included (ranks hold "
                               "different experts): apply AutoEP to the bare model and reduce with "
                               "autoep.reduce_gradients (or train it under autoep.initialize), without DDP",
    "FullyShardedDataParallel": "FSDP flattens and shards the parameters AutoEP slices by expert: apply AutoEP to the "
                                "bare model and train it under autoep.initialize (DeepSpeed ZeRO 0-3)",
    "DataParallel": "DataParallel replicates the module per device from its own copy: apply AutoEP to the bare model",
    "DeepSpeedEngine": "an engine already built: pass the model to autoep.initialize instead of deepspeed.initialize",
}


def check_not_wrapped(model: nn.Module) -> None:
    """Refuse a model inside a data-parallel wrapper, naming the wrapper and the fix."""
    for klass in type(model).__mro__:
        if klass.__name__ in _WRAPPERS and isinstance(getattr(model, "module", None), nn.Module):
            raise ValueError(f"autoep got a {type(model).__name__} wrapper around {type(model.module).__name__}: "
                             f"{_WRAPPERS[klass.__name__]}.")


def inspect(model: nn.Module, config: AutoEPConfig | Mapping[str, Any] | None = None
            ) -> list[MoELayerSpec] | list[ExpertsSpec]:
    """The MoE blocks (whole-block specs) or experts modules (experts-level specs) AutoEP would
    replace (nothing is changed)."""
    check_not_wrapped(model)
    return detect(model, _resolve(config))


def replaced_layers(model: nn.Module) -> list[tuple[str, AutoEPMoELayer | AutoEPExpertsMixin]]:
    """Every replaced unit as (block name, unit): an :class:`AutoEPMoELayer` (whole block), or the
    expert-parallel experts module of a block replaced at the experts level. Both expose ``spec``
    (``spec.experts_attr``, ``spec.preset``), ``num_experts``, ``local_expert_ids``, ``ep_groups``,
    ``routed_experts()`` and ``expert_named_parameters()`` (the parameters sharded by expert, named
    relative to ``f"{block name}.{spec.experts_attr}"``)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, AutoEPMoELayer):
            found.append((name, module))
        elif isinstance(module, AutoEPExpertsMixin):
            found.append((name.rpartition(".")[0], module))
    return found


class PartitionedBuild(Protocol):
    """How :func:`apply` replaces blocks of a model whose parameters are partitioned by ZeRO-3
    (built under ``deepspeed.zero.Init``, or loaded by ``from_pretrained`` under ZeRO-3): the
    DeepSpeed integration (``autoep.initialize``) provides it."""

    def gather(self, params: list[nn.Parameter]):
        """A context in which ``params`` hold their full values on every rank (released after)."""

    def partition(self, params: list[nn.Parameter]) -> None:
        """Hand the new expert parameters of one replaced unit back to ZeRO-3, partitioned."""


def partitioned_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters ZeRO-3 holds partitioned (``ds_id`` set by deepspeed.zero.Init)."""
    return [name for name, param in model.named_parameters() if hasattr(param, "ds_id")]


def _source_expert_parameters(spec, model: nn.Module) -> list[nn.Parameter]:
    """The parameters of a unit that :func:`build_layer` / :func:`build_experts` slice by expert."""
    if isinstance(spec, ExpertsSpec):
        experts = model.get_submodule(spec.experts_path)
        return [experts._parameters[name] for name in spec.layout.expert_parameters]
    experts = getattr(spec.block, spec.experts_attr)
    return [getattr(experts, spec.gate_up_name), getattr(experts, spec.down_name)]


def apply(model: nn.Module, config: AutoEPConfig | Mapping[str, Any] | None = None, group=None,
          groups: ExpertParallelGroups | None = None, partitioned: PartitionedBuild | None = None) -> nn.Module:
    """Replace every detected MoE block of ``model`` in place; returns ``model``.

    With ``autoep_size > 1`` this is collective: every rank of ``group`` (default: the
    whole ``torch.distributed`` world) calls it with the same model and config. EP groups are
    ``autoep_size`` consecutive ranks; each rank keeps experts ``[ep_rank*E/ep, (ep_rank+1)*E/ep)``
    of every layer, sliced from its own full copy (so every rank must hold the same weights,
    as after a common seed or a broadcast). Router, shared experts and everything else stay
    replicated. Everything is validated before the first module or process group is created.
    ``groups``: EP/EDP groups built elsewhere (the DeepSpeed integration passes DeepSpeed's own).
    ``partitioned``: for a model ZeRO-3 holds partitioned, the units are replaced one at a time: the
    unit's expert parameters gathered, this rank's slice built, the full copy released, the new
    parameters partitioned again (:class:`PartitionedBuild`; ``autoep.initialize`` passes it).
    """
    config = _resolve(config)
    if not config.enabled:
        logger.info("autoep: expert_parallel.enabled is false; model left unchanged")
        return model
    check_not_wrapped(model)
    if replaced_layers(model):
        raise ValueError("autoep.apply: the model already holds AutoEPMoELayer modules (applied twice?)")
    partitioned_names = partitioned_parameters(model)
    if partitioned_names and partitioned is None:
        raise ValueError(
            f"parameter {partitioned_names[0]!r} (and {len(partitioned_names) - 1} more) is partitioned by DeepSpeed "
            "ZeRO-3 (a model built under deepspeed.zero.Init, or loaded by from_pretrained under HfDeepSpeedConfig "
            "with ZeRO-3): autoep.apply cannot read its experts. Call autoep.initialize with the ZeRO-3 config: it "
            "gathers each block, replaces it and partitions the new experts again.")
    specs = detect(model, config)
    for spec in specs:  # hooks and experts implementation, before any block is replaced
        if isinstance(spec, ExpertsSpec):
            check_experts_replaceable(spec, model.get_submodule(spec.experts_path))
        else:
            check_replaceable(spec)
    expert_counts = {spec.name: spec.num_experts for spec in specs}
    if groups is not None:
        check_autoep_size(config.autoep_size, groups.world_size, expert_counts)
        if groups.ep_size != config.autoep_size:
            raise ValueError(f"the groups passed have ep_size={groups.ep_size}, but expert_parallel.autoep_size="
                             f"{config.autoep_size}")
    elif config.autoep_size > 1:
        groups = build_groups(config.autoep_size, group, expert_counts)  # validates sizes first
    sliced: dict = {}  # one slice per full expert Parameter, however many experts modules share it
    slicing = groups is not None and groups.ep_size > 1
    for spec in specs:
        sources = _source_expert_parameters(spec, model) if partitioned is not None and slicing else []
        with partitioned.gather(sources) if sources else contextlib.nullcontext():
            if isinstance(spec, ExpertsSpec):
                unit = build_experts(spec, model.get_submodule(spec.experts_path), config.use_grouped_mm, groups,
                                     sliced)
            else:
                unit = build_layer(spec, use_grouped_mm=config.use_grouped_mm, groups=groups)
                model.set_submodule(spec.name, unit)
        if sources:
            partitioned.partition([param for _, param in unit.expert_named_parameters() if not hasattr(param, "ds_id")])
            spec.block = None  # the replaced block's shards go now, not after the last block
            del sources, unit
            gc.collect()  # (ZeRO parameters hold reference cycles)
    what = "experts modules (experts level)" if isinstance(specs[0], ExpertsSpec) else "MoE blocks"
    logger.info("autoep: replaced %d %s (family %s)", len(specs), what, specs[0].preset)
    return model
