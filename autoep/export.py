"""``autoep.save_pretrained``: a stock Hugging Face checkpoint (``config.json`` +
``model.safetensors``) with every expert gathered, which ``from_pretrained`` on the original
model class loads.

From a live engine or model (collective: every rank calls it): ZeRO-3 partitions are gathered
and each layer's expert slices are all-gathered over its EP group and stacked to all E
experts; rank 0 writes. From a checkpoint tag folder saved by an engine from
``autoep.initialize`` (no job needed): ZeRO 0-2 take DeepSpeed's model file (replicated
weights) and AutoEP's expert files; ZeRO-3 takes the unsharded fp32 master weights in the
model's dtype (what the live weights are made from).

AutoEP keeps the original parameter names, so the state dict needs no renaming. The output is
written to a temporary sibling folder and renamed into place; a failure leaves nothing, and the
temporary of an export that was killed is removed by the next export to the same folder. A
checkpoint folder's files are checked against the sizes and SHA-256 recorded at save before
they are read, and unpickled with ``weights_only=True`` and an allow-list.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from torch import nn

from autoep.api import replaced_layers
from autoep.checkpoint import (MODEL_CONFIG_FILE, AutoEPCheckpointError, expert_file, load_file, model_files,
                               read_topology, remove_stale_temporaries, temporary_path, verify_files)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with full tensors on CPU (collective under expert parallelism
    or ZeRO-3: every rank, same order)."""
    import torch.distributed as dist

    experts = {id(param): layer for _, layer in replaced_layers(model) for _, param in layer.expert_named_parameters()}
    params = dict(model.named_parameters(remove_duplicate=False))
    state = {}
    for name, value in model.state_dict(keep_vars=True).items():
        param = params.get(name)
        if param is None:
            state[name] = value.detach().to("cpu", copy=True)
            continue
        if hasattr(param, "ds_id"):  # ZeRO-3 partition
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                tensor = param.detach().clone()
        else:
            tensor = param.detach().clone()
        layer = experts.get(id(param))
        if layer is not None and layer.ep_groups is not None and layer.ep_groups.ep_group is not None:
            parts = [torch.empty_like(tensor) for _ in range(layer.ep_groups.ep_size)]
            dist.all_gather(parts, tensor.contiguous(), group=layer.ep_groups.ep_group)  # EP-rank order
            tensor = torch.cat(parts, dim=0)
        state[name] = tensor.cpu()
    return state


def state_from_checkpoint(folder: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(full state dict, Transformers config dict) from a checkpoint tag folder."""
    topology = read_topology(folder)
    config_path = os.path.join(folder, MODEL_CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise AutoEPCheckpointError(f"{config_path} is missing: the checkpoint does not record the model's "
                                    "Transformers config")
    ep_ranks = sorted({ep for ep, _ in topology.rank_layout})
    read = [MODEL_CONFIG_FILE]  # (at ZeRO-3, autoep.universal.unshard checks the files it reads)
    if topology.zero_stage < 3:
        read += model_files(topology) + [expert_file(ep) for ep in ep_ranks]
    verify_files(folder, topology, read)
    with open(config_path) as handle:
        config = json.load(handle)
    dtype = DTYPES[topology.dtype]
    if topology.zero_stage == 3:
        from autoep.universal import unshard

        source = unshard(folder)
        state = {name: value.to(dtype) for name, value in source.tensors["fp32"].items()}
        module = source.model_state.get("module") or {}
        for name, value in module.items():  # buffers (ZeRO-3 parameters there are empty placeholders)
            if name not in state:
                state[name] = value
        return state, config
    state = dict(_entry(os.path.join(folder, model_files(topology)[0]), "module"))
    pieces = [_entry(os.path.join(folder, expert_file(ep)), "experts") for ep in ep_ranks]
    for name, num_experts in topology.experts.items():
        if any(name not in piece for piece in pieces):
            raise AutoEPCheckpointError(f"{name} is missing from an expert file of {folder}")
        state[name] = torch.cat([piece[name] for piece in pieces], dim=0)
        if state[name].shape[0] != num_experts:
            raise AutoEPCheckpointError(f"{name}: {state[name].shape[0]} experts in the expert files, the topology "
                                        f"record says {num_experts}")
    return state, config


def _entry(path: str, key: str) -> dict:
    """``load_file(path)[key]``, a mapping of names to tensors, or an error naming the file and key."""
    payload = load_file(path)
    value = payload.get(key) if isinstance(payload, dict) else None
    if not isinstance(value, dict) or not all(isinstance(t, torch.Tensor) for t in value.values()):
        raise AutoEPCheckpointError(f"{path}: expected a mapping with {key!r} holding named tensors, found a "
                                    f"{type(payload).__name__} without it "
                                    "(a damaged or foreign file): refused")
    return value


def _write(output_dir: str, state: dict[str, torch.Tensor], config) -> None:
    from safetensors.torch import save_file

    output_dir = os.path.abspath(output_dir)
    remove_stale_temporaries(output_dir)
    temporary = temporary_path(output_dir)
    os.makedirs(os.path.dirname(output_dir), exist_ok=True)
    try:
        os.makedirs(temporary)
        if isinstance(config, dict):
            with open(os.path.join(temporary, "config.json"), "w") as handle:
                json.dump(config, handle, indent=2, sort_keys=True)
        else:
            config.save_pretrained(temporary)
        # Separate storage per tensor (safetensors refuses shared storage).
        save_file({name: value.contiguous().clone() for name, value in state.items()},
                  os.path.join(temporary, "model.safetensors"), metadata={"format": "pt"})
        os.rename(temporary, output_dir)
    finally:
        if os.path.exists(temporary):
            shutil.rmtree(temporary)


def save_pretrained(source, output_dir: str) -> None:
    """Write a Hugging Face checkpoint of ``source``: an engine from ``autoep.initialize``, a
    model after ``autoep.apply`` (collective: call on every rank), or the path of a
    checkpoint tag folder saved by such an engine. ``output_dir`` must not exist."""
    exists = os.path.exists(output_dir)
    if isinstance(source, (str, os.PathLike)):
        if exists:
            raise FileExistsError(f"output_dir {output_dir} already exists; choose a new folder (nothing was written)")
        state, config = state_from_checkpoint(os.fspath(source))
        _write(output_dir, state, config)
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # Every rank's verdict, agreed before rank 0 can create the folder: a rank whose EP group
        # finished gathering first must not make a slower rank see its own output as "existing".
        verdicts = [None] * dist.get_world_size()
        dist.all_gather_object(verdicts, exists)
        exists = any(verdicts)
    if exists:
        raise FileExistsError(f"output_dir {output_dir} already exists; choose a new folder (nothing was written)")
    model = getattr(source, "module", source)
    state = full_state_dict(model)
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        _write(output_dir, state, model.config)
    if distributed:
        dist.barrier()
