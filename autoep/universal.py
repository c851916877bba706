"""``autoep.to_universal``: a DeepSpeed ZeRO 1/2/3 checkpoint of an AutoEP engine, as a
Universal Checkpoint that resumes on another world size and/or ``autoep_size``.

DeepSpeed's ``ds_to_universal`` cannot do this for a layer that is not DeepSpeed's (it
concatenates every rank's expert fragments as one tensor, or writes interleaved EDP shards:
../shared/notes/deepspeed-universal-checkpoint.md). This converter reads the raw per-rank
optimizer shards itself, with AutoEP's topology record (which rank held which experts):

- every parameter is unsharded from its ZeRO partitions: ZeRO-1/2 by ``param_slice_mappings``
  (fragments of a flat group cut into equal partitions); ZeRO-3 by ``param_shapes`` (each
  parameter cut into ``ceil(numel / partitions)`` chunks, the last padded);
- a dense parameter's partitions are over all ranks; an expert parameter's are over its EDP
  group, and the EP ranks' pieces are stacked in EP-rank order to all E experts;
- written per parameter: ``zero/<name>/fp32.pt``, ``exp_avg.pt``, ``exp_avg_sq.pt`` (and
  ``step.pt``), with ``is_expert_param``/``ep_num_experts`` on experts so that DeepSpeed's
  ``load_universal`` slices them for the new ``autoep_size``; ``zero/optimizer_state.pt``
  with the optimizer hyperparameters and step; the model-states files for the engine's
  counters; AutoEP's topology record.

The output is written to a temporary folder beside it and renamed into place only when
complete: a failed conversion leaves nothing, and the temporary of a conversion that was killed
is removed by the next conversion to the same output. The input is only read: first its files
are checked against the sizes and SHA-256 recorded at save, then unpickled with
``weights_only=True`` and an allow-list (``autoep.checkpoint.load_file``); the output's topology
record lists the output's own files.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass

import torch

from autoep.checkpoint import (AutoEPCheckpointError, Topology, folder_files, load_file, model_files, optimizer_file,
                               read_topology, record_files, remove_stale_temporaries, temporary_path, verify_files,
                               write_topology)

OPTIMIZER_KEYS = ("exp_avg", "exp_avg_sq")


def _partitions(names, topology: Topology) -> list[tuple[int, list[int]]]:
    """How a ZeRO group's parameters were partitioned: [(slot, global ranks in partition
    order)]. Dense parameters: one slot (0) over all ranks. Experts: one slot per EP rank, over
    its EDP group ordered by EDP rank (the slots are stacked in EP-rank order later)."""
    experts = [name in topology.experts for name in names]
    if not any(experts):
        return [(0, list(range(topology.world_size)))]
    if not all(experts):
        raise AutoEPCheckpointError(f"a ZeRO parameter group mixes expert and dense parameters ({list(names)[:4]}); "
                                    "an engine from autoep.initialize never saves that")
    slots = []
    for ep_rank in sorted({ep for ep, _ in topology.rank_layout}):
        members = sorted((edp, rank) for rank, (ep, edp) in enumerate(topology.rank_layout) if ep == ep_rank)
        slots.append((ep_rank, [rank for _, rank in members]))
    return slots


def _unshard_zero12(shards: list[dict], topology: Topology) -> tuple[dict, dict, object]:
    """{key: {name: {slot: flat tensor}}}, param groups, step."""
    first = shards[0]["optimizer_state_dict"]
    full: dict[str, dict[str, dict[int, torch.Tensor]]] = {key: {} for key in ("fp32",) + OPTIMIZER_KEYS}
    step = None
    for index in range(len(first["param_slice_mappings"])):
        # A rank's mapping lists only the parameters with a fragment in its partition.
        names = list(dict.fromkeys(name for shard in shards
                                   for name in shard["optimizer_state_dict"]["param_slice_mappings"][index]))
        for slot, ranks in _partitions(names, topology):
            for key in full:
                pieces: dict[str, list[torch.Tensor]] = OrderedDict((name, []) for name in names)
                for rank in ranks:
                    state = shards[rank]["optimizer_state_dict"]
                    flat = state["single_partition_of_fp32_groups"][index] if key == "fp32" else \
                        state["base_optimizer_state"]["state"][index][key]
                    for name, address in state["param_slice_mappings"][index].items():
                        pieces[name].append(flat.narrow(0, address.start, address.numel))
                    step = state["base_optimizer_state"]["state"][index].get("step", step)
                for name, parts in pieces.items():
                    full[key].setdefault(name, {})[slot] = torch.cat(parts)
    return full, first["base_optimizer_state"]["param_groups"], step


def _unshard_zero3(shards: list[dict], param_shapes: list[dict], topology: Topology) -> tuple[dict, dict, object]:
    full: dict[str, dict[str, dict[int, torch.Tensor]]] = {key: {} for key in ("fp32",) + OPTIMIZER_KEYS}
    first = shards[0]["optimizer_state_dict"]
    step = None
    for index, shapes in enumerate(param_shapes):
        for slot, ranks in _partitions(shapes.keys(), topology):
            for rank in ranks:
                info = shards[rank]["optimizer_state_dict"]["ds_zero_partition_groups"][index]
                if list(info["partition_ranks"]) != ranks:
                    raise AutoEPCheckpointError(
                        f"{optimizer_file(topology, rank)}: group {index} is partitioned over ranks "
                        f"{list(info['partition_ranks'])}, the topology record says {ranks}")
            for key in full:
                flats = []
                for rank in ranks:
                    state = shards[rank]["optimizer_state_dict"]
                    flats.append(state["fp32_flat_groups"][index] if key == "fp32" else
                                 state["optimizer_state_dict"]["state"][index][key])
                    step = state["optimizer_state_dict"]["state"][index].get("step", step)
                offset = 0
                for name, shape in shapes.items():
                    numel = math.prod(shape)
                    chunk = math.ceil(numel / len(ranks))
                    value = torch.cat([flat.narrow(0, offset, chunk) for flat in flats])[:numel]
                    full[key].setdefault(name, {})[slot] = value
                    offset += chunk
                if offset != flats[0].numel():
                    raise AutoEPCheckpointError(f"ZeRO-3 group {index}: shapes cover {offset} elements per rank, "
                                                f"the shard holds {flats[0].numel()}")
    return full, first["optimizer_state_dict"]["param_groups"], step


@dataclass
class Unsharded:
    """A ZeRO 1/2/3 checkpoint's optimizer state, every parameter a full tensor (experts stacked
    to all E)."""
    topology: Topology
    tensors: dict[str, dict[str, torch.Tensor]]  # "fp32" / "exp_avg" / "exp_avg_sq" -> name -> tensor
    param_groups: list[dict]
    step: object
    model_files: list[str]
    model_state: dict  # the first model-states file


def unshard(input_folder: str) -> Unsharded:
    """Read a checkpoint tag folder saved by an engine from ``autoep.initialize`` at ZeRO 1-3."""
    if not os.path.isdir(input_folder):
        raise AutoEPCheckpointError(f"--input_folder {input_folder} is not a folder (pass a checkpoint tag folder, "
                                    "e.g. <save_dir>/global_step100)")
    topology = read_topology(input_folder)
    if topology.zero_stage not in (1, 2, 3):
        raise AutoEPCheckpointError(
            f"{input_folder} was saved at ZeRO stage {topology.zero_stage}; Universal conversion needs the ZeRO 1/2/3 "
            "optimizer shards. Save at ZeRO stage 1-3, or resume at the same topology with a regular load")
    optimizer_files = [optimizer_file(topology, rank) for rank in range(topology.world_size)]
    models = model_files(topology)
    verify_files(input_folder, topology, optimizer_files + models)
    shards = [load_file(os.path.join(input_folder, name)) for name in optimizer_files]
    model_state = load_file(os.path.join(input_folder, models[0]))
    try:
        if topology.zero_stage == 3:
            pieces, param_groups, step = _unshard_zero3(shards, model_state["param_shapes"], topology)
        else:
            pieces, param_groups, step = _unshard_zero12(shards, topology)
        shapes = {name: shape for group in model_state["param_shapes"] for name, shape in group.items()}
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as error:
        raise AutoEPCheckpointError(
            f"{input_folder}: its optimizer shards ({optimizer_files[0]} ...) or model file ({models[0]}) do not have "
            f"the layout DeepSpeed 0.19.8 writes for the topology it records ({type(error).__name__}: {error}); was it "
            "saved by an engine from autoep.initialize?") from None
    tensors: dict[str, dict[str, torch.Tensor]] = {key: {} for key in pieces}
    for key, by_param in pieces.items():
        for name, shape in shapes.items():
            if name not in by_param:
                raise AutoEPCheckpointError(f"{name}: no {key} found in any optimizer shard of {input_folder}")
            if name in topology.experts:  # shape: the local [E/ep, ...]
                tensor = torch.cat([by_param[name][ep].view(shape) for ep in sorted(by_param[name])], dim=0)
                if tensor.shape[0] != topology.experts[name]:
                    raise AutoEPCheckpointError(f"{name}: stacked {tensor.shape[0]} experts, the topology record "
                                                f"says {topology.experts[name]}")
            else:
                tensor = by_param[name][0].view(shape)
            tensors[key][name] = tensor
    return Unsharded(topology, tensors, param_groups, step, models, model_state)


def to_universal(input_folder: str, output_folder: str) -> None:
    """Convert the checkpoint tag folder ``input_folder`` (saved by an engine from
    ``autoep.initialize`` at ZeRO stage 1, 2 or 3) into the Universal Checkpoint tag folder
    ``output_folder``, which must not exist."""
    input_folder, output_folder = os.path.abspath(input_folder), os.path.abspath(output_folder)
    if os.path.exists(output_folder):
        raise FileExistsError(f"--output_folder {output_folder} already exists; choose a new folder (nothing was "
                              "written)")
    source = unshard(input_folder)
    topology = source.topology
    remove_stale_temporaries(output_folder)
    temporary = temporary_path(output_folder)
    os.makedirs(os.path.dirname(output_folder), exist_ok=True)
    try:
        os.makedirs(os.path.join(temporary, "zero"))
        for name in source.tensors["fp32"]:
            folder = os.path.join(temporary, "zero", name)
            os.makedirs(folder)
            for key, by_name in source.tensors.items():
                record = {"param": by_name[name]}
                if name in topology.experts:
                    record.update(cat_dim=0, is_expert_param=True, ep_num_experts=topology.experts[name])
                torch.save(record, os.path.join(folder, f"{key}.pt"))
            if source.step is not None:
                torch.save(source.step, os.path.join(folder, "step.pt"))
        groups = [{key: value for key, value in group.items() if key not in ("params", "name", "moe")}
                  for group in source.param_groups]
        # ZeRO-1/2 read "param_groups"; ZeRO-3 reads the step and hyperparameters from
        # "optimizer_state_dict". "name"/"moe" are left out: the loading engine's groups keep theirs.
        torch.save({"ds_version": source.model_state.get("ds_version"), "param_groups": groups,
                    "optimizer_state_dict": {"state": {0: {"step": source.step}}, "param_groups": groups}},
                   os.path.join(temporary, "zero", "optimizer_state.pt"))
        for name in source.model_files:
            shutil.copy2(os.path.join(input_folder, name), os.path.join(temporary, name))
        write_topology(temporary, dataclasses.replace(topology, files=record_files(temporary, folder_files(temporary))))
        os.rename(temporary, output_folder)
    finally:
        if os.path.exists(temporary):
            shutil.rmtree(temporary)
