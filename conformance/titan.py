"""TorchTitan's Hugging Face MoE replacement as a conformance subject (a peer: its results are
findings, never our exit status).

TorchTitan 0.3.0 ships ``torchtitan/experiments/transformers_modeling_backend/moe_replacement.py``,
which swaps the MoE blocks of a stock Transformers model for Titan ``MoE`` modules; here it is
driven the way its own backend drives it, without its trainer (facts in
shared/notes/torchtitan-subject.md):

1. each decoder layer whose ``mlp`` has a gate/router and ``experts`` is marked ``moe_enabled``
   (the rule of its ``HFTransformerModel``), and ``prepare_native_moe_configs`` probes the blocks;
2. ``build_and_swap_native_moe`` builds fresh (randomly initialised) Titan MoE modules and
   swaps them in as ``layer.mlp``;
3. the Transformers weights, taken before the swap, go through Titan's converter
   ``hf_to_titan_moe_state_dict`` into ``load_state_dict(strict=False)``. Any key that call
   leaves unmatched is refused (:class:`TitanWeightsNotLoaded`): a silently dropped weight is
   exactly what a harness must notice. The only tolerated miss is Titan's own load-balancing
   bias ``expert_bias_E`` in a block that has no correction bias (Titan initialises it to
   zero, which is no bias);
4. with ``autoep_size > 1`` (on rank processes), its expert parallelism: a gloo ``ParallelDims``
   mesh (``dp_shard`` = world size, ``ep`` = autoep_size) with ``spmd_backend="partial_dtensor"``
   and each MoE's own ``parallelize``.

Its parameters are named ``router.gate.weight``, ``routed_experts.inner_experts.w1_EFD`` (gate),
``w3_EFD`` (up), ``w2_EDF`` (down), ``shared_experts.w1/w2/w3``, ``shared_experts.gate``; the
model carries a mapping back to the Transformers names (gate and up stacked into
``gate_up_proj``) that :func:`conformance.runs.run_model` applies to gradients.

Nothing here imports torchtitan at module import time: the default install has none, and this
module is imported by ``conformance.subjects`` to register the subject.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import nn

import autoep
from matrix.cells import EXPERTS_LEVEL_CASE_IDS, FAMILY_CASE_IDS, PLAIN_CASE_IDS

NOT_INSTALLED = ("torchtitan is not installed in this environment: the torchtitan subject runs in its own "
                 "pinned environment, `nox -s titan`")
NO_DEEPSPEED = ("TorchTitan does not run under DeepSpeed: its MoE trains inside its own trainer (FSDP2/DTensor "
                "parallelisms), it has no deepspeed.initialize path, so ZeRO and ZeRO checkpoint cells do not "
                "apply")
EP_DIVIDES = "TorchTitan's expert parallelism needs autoep_size to divide the world size (its dp_shard degree)"


class TitanWeightsNotLoaded(RuntimeError):
    """TorchTitan's converter and ``load_state_dict(strict=False)`` left a weight unmatched."""


def titan_installed() -> bool:
    return importlib.util.find_spec("torchtitan") is not None


def _import_titan():
    """TorchTitan's replacement module, converter and ParallelDims (imported on first use)."""
    from torchtitan.distributed.parallel_dims import ParallelDims
    from torchtitan.experiments.transformers_modeling_backend import moe_replacement
    from torchtitan.experiments.transformers_modeling_backend.state_dict_adapter import (
        _expert_names, hf_to_titan_moe_state_dict)

    return moe_replacement, hf_to_titan_moe_state_dict, ParallelDims, _expert_names


class _LayersView:
    """What ``prepare_native_moe_configs`` / ``build_and_swap_native_moe`` walk: ``layers`` as a
    mapping of index -> decoder layer (TorchTitan's wrapper turns the ModuleList into a
    ModuleDict; here a plain dict over the same layer objects, so the model is changed in place)."""

    def __init__(self, model: nn.Module):
        layers = model.get_submodule("model.layers")
        self.layers = {str(index): layer for index, layer in enumerate(layers)}


def _mark_moe_layers(view: _LayersView) -> list[str]:
    """TorchTitan's own detection rule (HFTransformerModel.__init__): a layer is MoE when its
    ``mlp`` has a ``gate`` or ``router`` and ``experts``. Returns the marked layer indices."""
    marked = []
    for index, layer in view.layers.items():
        mlp = getattr(layer, "mlp", None)
        layer.moe_enabled = mlp is not None and (hasattr(mlp, "gate") or hasattr(mlp, "router")) \
            and hasattr(mlp, "experts")
        if layer.moe_enabled:
            marked.append(index)
    return marked


def _parallel_dims(ParallelDims, world_size: int, ep: int):
    return ParallelDims(dp_replicate=1, dp_shard=world_size, cp=1, tp=1, pp=1, ep=ep, world_size=world_size,
                        spmd_backend="partial_dtensor")


def _build_ep_mesh(parallel_dims) -> None:
    """``ParallelDims.build_mesh`` on a CPU host: TorchTitan's ``device_type`` falls back to
    "cuda" without a GPU, so the parallel-dims module's copy is pointed at "cpu" while the gloo
    mesh is built (and restored after). The partial-DTensor SPMD backend is selected globally:
    with the default "spmd_types", the token exchange uses list all_to_all, which gloo supports
    only with equal chunks."""
    import torchtitan.distributed.parallel_dims as parallel_dims_module
    from torchtitan.distributed.utils import set_spmd_backend

    set_spmd_backend("partial_dtensor")
    saved = parallel_dims_module.device_type
    parallel_dims_module.device_type = "cpu"
    try:
        parallel_dims.build_mesh()
    finally:
        parallel_dims_module.device_type = saved


def _load_hf_weights(model: nn.Module, hf_state: dict, convert, specs) -> None:
    """Load the Transformers weights through TorchTitan's converter; refuse any unmatched key
    but the zero load-balancing bias of a block without a correction bias."""
    result = model.load_state_dict(convert(hf_state), strict=False)
    has_bias = {spec.name for spec in specs if spec.routing.use_correction_bias}
    tolerated = [key for key in result.missing_keys
                 if key.endswith(".expert_bias_E") and key.rsplit(".", 1)[0] not in has_bias]
    missing = [key for key in result.missing_keys if key not in tolerated]
    if result.unexpected_keys or missing:
        raise TitanWeightsNotLoaded(
            f"TorchTitan's hf_to_titan_moe_state_dict + load_state_dict(strict=False) left keys unmatched: "
            f"unexpected {sorted(result.unexpected_keys)}, missing {sorted(missing)}; the Transformers weights "
            f"they carry would be silently dropped (the Titan modules keep their random/zero init), so the "
            f"torchtitan subject refuses this model")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (an expert-parallel weight or its gradient), else the tensor."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _to_transformers_names(specs, expert_names, tensors: dict) -> dict:
    """Titan parameter names (and values) -> Transformers ones: the router's ``router.gate``,
    routed experts w1/w3 stacked into the gate-up tensor (dim 1, as Transformers stores
    ``[E, 2I, H]``; an expert-parallel slice stays a slice) and w2 the down tensor, shared
    experts ``w1/w3/w2`` -> ``gate_proj/up_proj/down_proj``, ``shared_experts.gate`` -> the
    shared-expert gate. A name under a replaced block that is none of these raises."""
    gate, down, up = expert_names
    experts = "routed_experts.inner_experts."
    shared_linear = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    renamed = {name: _local(tensor) for name, tensor in tensors.items()}
    for spec in specs:
        prefix = spec.name + "."
        local = {name[len(prefix):]: renamed.pop(name) for name in list(renamed) if name.startswith(prefix)}
        if not local:
            continue
        hf_experts = f"{prefix}{spec.experts_attr}."
        renamed[f"{prefix}{spec.router_attr}.weight"] = local.pop("router.gate.weight")
        renamed[hf_experts + spec.gate_up_name] = torch.cat([local.pop(experts + gate), local.pop(experts + up)], 1)
        renamed[hf_experts + spec.down_name] = local.pop(experts + down)
        for name in list(local):
            parts = name.split(".")
            if parts[0] == "shared_experts" and parts[1] in shared_linear and spec.shared_attr:
                renamed[f"{prefix}{spec.shared_attr}.{shared_linear[parts[1]]}.{parts[2]}"] = local.pop(name)
            elif parts[0] == "shared_experts" and parts[1] == "gate" and spec.shared_gate_attr:
                renamed[f"{prefix}{spec.shared_gate_attr}.{parts[2]}"] = local.pop(name)
        if local:
            raise KeyError(f"{spec.name}: TorchTitan parameters with no Transformers name: {sorted(local)}")
    return renamed


class TorchTitanSubject:
    """TorchTitan 0.3.0's MoE replacement of a stock Transformers model (see the module
    docstring): one-process cells, interop cells, and plain-PyTorch expert-parallel cells on
    gloo rank processes. ZeRO cells do not apply (it does not run under DeepSpeed)."""

    name = "torchtitan"
    is_peer = True  # its failures are findings (conformance/findings.py, TT-n)
    optimizer_route = "client"  # plain torch optimizers over model.parameters(); no ZeRO cells

    def not_applicable_reason(self, cell) -> str | None:
        """TorchTitan's HF MoE backend documents Qwen3 models (its config_registry); it is judged on the
        seed's presets, not on the table's other families (matrix/models.py FAMILY_CASES)."""
        if cell.case in EXPERTS_LEVEL_CASE_IDS or cell.case in PLAIN_CASE_IDS:
            return ("an experts-level or plain-module cell: TorchTitan's HF MoE backend swaps whole blocks of the "
                    "families it documents")
        if cell.case in FAMILY_CASE_IDS:
            return ("TorchTitan's HF MoE backend is judged on the seed's presets (it documents Qwen3 models); the "
                    "family table's other families are not claimed by it")
        return None

    def unavailable_reason(self, cell=None) -> str | None:
        if not titan_installed():
            return NOT_INSTALLED
        if cell is None:
            return None
        if cell.zero_stage != "none":
            return NO_DEEPSPEED
        if cell.world_size % cell.autoep_size:
            return EP_DIVIDES
        return None

    def apply(self, model: nn.Module, block: dict) -> nn.Module:
        moe_replacement, convert, ParallelDims, expert_names = _import_titan()
        ep = int(block.get("autoep_size", 1))
        specs = autoep.inspect(model)  # block names and Transformers attribute names, for the mapping back
        hf_state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        view = _LayersView(model)
        if not _mark_moe_layers(view):
            raise ValueError(f"{type(model).__name__}: TorchTitan's detection found no MoE layer (no decoder "
                             f"layer whose mlp has a gate/router and experts)")
        moe_replacement.prepare_native_moe_configs(view, model.config.get_text_config())
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if ep > 1 and not torch.distributed.is_initialized():
            raise ValueError(f"autoep_size={ep} needs torch.distributed (rank processes, autoep.launch)")
        parallel_dims = _parallel_dims(ParallelDims, world, ep)
        moe_replacement.build_and_swap_native_moe(view, parallel_dims)
        model.to(next(p for p in hf_state.values() if p.is_floating_point()).dtype)  # Titan builds float32
        _load_hf_weights(model, hf_state, convert, specs)
        if ep > 1:
            _build_ep_mesh(parallel_dims)
            for index in view.layers:
                layer = view.layers[index]
                if getattr(layer, "moe_enabled", False):
                    layer.mlp.parallelize(parallel_dims)
        model.conformance_specs = specs
        model.conformance_stock_gradients = functools.partial(_to_transformers_names, specs, expert_names())
        return model

    def expert_shards(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        """(first global expert held here, experts in the layer) for each block's gate-up and
        down tensors under their Transformers names, read from the placement of Titan's expert
        DTensors on the 1-D EP mesh; empty without expert parallelism (every tensor replicated)."""
        from torch.distributed.tensor import DTensor

        shards = {}
        for spec in model.conformance_specs:
            gate_name = _import_titan()[3]()[0]  # "w1_EFD" in 0.3.0
            w1 = getattr(model.get_submodule(f"{spec.name}.routed_experts.inner_experts"), gate_name)
            if not isinstance(w1, DTensor):
                continue
            if w1.device_mesh.ndim != 1:
                raise ValueError(f"{spec.name}: expert mesh of {w1.device_mesh.ndim} dimensions is not handled")
            first = w1.device_mesh.get_local_rank() * w1.to_local().shape[0]
            for param in (spec.gate_up_name, spec.down_name):
                shards[f"{spec.name}.{spec.experts_attr}.{param}"] = (first, w1.shape[0])
        return shards


def transformers_grads(model: nn.Module, grads: dict) -> dict:
    """``grads`` under the Transformers names when the model carries a subject's mapping
    (``conformance_stock_gradients``), else as they are."""
    rename = getattr(model, "conformance_stock_gradients", None)
    return grads if rename is None else rename(grads)


