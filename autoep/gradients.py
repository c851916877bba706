"""Gradient reduction for expert parallelism without DeepSpeed (DESIGN section 5).

After ``loss.backward()`` on every rank (each loss the mean over its own micro-batch, equal
micro-batches), :func:`reduce_gradients` leaves on every rank the gradient of the
global-batch mean loss:

- replicated parameters (router, shared experts, attention, embeddings): summed over all
  ranks of the base group and divided by its size W;
- expert parameters: summed over the expert-data-parallel group (the ranks holding the same
  experts) and divided by W, because each holder's local gradient already carries the tokens
  its EP peers sent it.

A ``DistributedDataParallel`` wrapper would average expert gradients over ranks that hold
different experts; use this (or ``autoep.initialize`` under DeepSpeed) instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn



def expert_parameters(model: nn.Module) -> dict[int, nn.Module]:
    """id(parameter) -> the replaced unit (autoep.api.replaced_layers) whose experts it is a slice of."""
    from autoep.api import replaced_layers

    return {id(param): unit for _, unit in replaced_layers(model) for _, param in unit.expert_named_parameters()}


@torch.no_grad()
def reduce_gradients(model: nn.Module, group=None) -> None:
    """All-reduce every gradient of ``model`` in place as described above. ``group`` is the
    base group passed to ``autoep.apply`` (default: the whole world). Collective: every rank
    calls it, with the same model structure. Parameters without a gradient are skipped on
    every rank alike (their ``grad`` is None everywhere, or the call raises)."""
    world = dist.get_world_size(group)
    experts = expert_parameters(model)
    for name, param in model.named_parameters():
        if param.grad is None:
            if param.requires_grad:
                raise RuntimeError(f"reduce_gradients: {name} has no gradient on rank {dist.get_rank()}; "
                                   "every rank must run backward through the same parameters")
            continue
        layer = experts.get(id(param))
        if layer is not None and layer.ep_groups is not None:
            if layer.ep_groups.edp_group is not None:
                dist.all_reduce(param.grad, group=layer.ep_groups.edp_group)
        else:
            dist.all_reduce(param.grad, group=group)
        param.grad.div_(world)
