"""Expert-parallel (EP) and expert-data-parallel (EDP) process groups. See DESIGN section 5.

Over the ranks of a base group (the default process group, or one passed in), listed in
order as positions 0..W-1:

- EP groups are ``autoep_size`` consecutive positions: {0..ep-1}, {ep..2ep-1}, ...
  A token's experts live in its EP group; the AllToAll runs over it.
- EDP groups are the positions with the same EP rank: {0, ep, 2ep, ...}, {1, ep+1, ...}.
  They hold the same experts; expert gradients are summed over them (and divided by W).

Sizes are validated before any group is created; every rank must call :func:`build_groups`
with the same arguments, in the same order (``new_group`` is collective).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch.distributed as dist

from autoep.config import AutoEPConfigError


def valid_autoep_sizes(world_size: int | None, expert_counts: Iterable[int]) -> list[int]:
    """Sizes dividing the world size (when known) and every expert count."""
    counts = sorted(set(expert_counts))
    limit = world_size if world_size is not None else min(counts, default=1)
    return [size for size in range(1, limit + 1)
            if (world_size is None or world_size % size == 0) and all(count % size == 0 for count in counts)]


def check_autoep_size(autoep_size: int, world_size: int | None, expert_counts: dict[str, int]) -> None:
    """Raise AutoEPConfigError unless ``autoep_size`` divides every layer's expert count
    (``expert_counts``: layer name -> number of experts) and the world size (when known)."""
    valid = valid_autoep_sizes(world_size, expert_counts.values())
    where = f"this model and world size {world_size}" if world_size is not None else "this model"
    for name, count in expert_counts.items():
        if count % autoep_size:
            raise AutoEPConfigError(
                f"expert_parallel.autoep_size={autoep_size} does not divide the {count} experts of {name!r}; "
                f"valid sizes for {where}: {valid}.")
    if world_size is not None and world_size % autoep_size:
        raise AutoEPConfigError(
            f"expert_parallel.autoep_size={autoep_size} does not divide the data-parallel world size "
            f"{world_size}; valid sizes for {where}: {valid}.")


@dataclass(frozen=True, eq=False)
class ExpertParallelGroups:
    """This rank's view of the EP / EDP layout. ``ep_group``/``edp_group`` are ``None`` when
    they would hold only this rank (no collective is needed)."""

    world_size: int
    rank: int                    # this process's global rank
    ep_size: int
    ep_ranks: tuple[int, ...]    # global ranks of this rank's EP group, in EP-rank order
    edp_ranks: tuple[int, ...]   # global ranks of this rank's EDP group
    ep_group: object | None
    edp_group: object | None

    @property
    def ep_rank(self) -> int:
        """This rank's index in its EP group: it holds experts [ep_rank*E/ep, (ep_rank+1)*E/ep)."""
        return self.ep_ranks.index(self.rank)

    @classmethod
    def from_process_groups(cls, world_size: int, ep_group, edp_group) -> "ExpertParallelGroups":
        """Wrap EP/EDP groups made elsewhere (DeepSpeed's), whatever their rank order."""
        ep_ranks = tuple(dist.get_process_group_ranks(ep_group))
        edp_ranks = tuple(dist.get_process_group_ranks(edp_group))
        return cls(world_size, dist.get_rank(), len(ep_ranks), ep_ranks, edp_ranks,
                   ep_group if len(ep_ranks) > 1 else None, edp_group if len(edp_ranks) > 1 else None)

    def __deepcopy__(self, memo) -> "ExpertParallelGroups":
        return self  # process groups are handles to shared communicators, never copied

    def __repr__(self) -> str:
        return (f"ExpertParallelGroups(world={self.world_size}, ep_size={self.ep_size}, ep_rank={self.ep_rank}, "
                f"ep_ranks={self.ep_ranks}, edp_ranks={self.edp_ranks})")


def layout(base_ranks: tuple[int, ...], ep_size: int) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """(EP groups, EDP groups) as tuples of global ranks; pure arithmetic, no collective."""
    world = len(base_ranks)
    ep_groups = [tuple(base_ranks[start:start + ep_size]) for start in range(0, world, ep_size)]
    edp_groups = [tuple(base_ranks[ep_rank::ep_size]) for ep_rank in range(ep_size)]
    return ep_groups, edp_groups


_CACHE: dict[tuple[tuple[int, ...], int], ExpertParallelGroups] = {}


def build_groups(autoep_size: int, base_group=None, expert_counts: dict[str, int] | None = None
                 ) -> ExpertParallelGroups:
    """EP/EDP groups of ``autoep_size`` over ``base_group`` (default: the whole world).

    Groups are created once per (base ranks, autoep_size) and reused, so applying AutoEP to
    several models in one job does not create communicators again.
    """
    check_autoep_size(autoep_size, None, expert_counts or {})
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"expert_parallel.autoep_size={autoep_size} needs torch.distributed to be initialized "
            "(torch.distributed.init_process_group, torchrun, deepspeed, or autoep.launch.RankPool) "
            "before autoep.apply; with a single process use autoep_size=1.")
    base_ranks = tuple(dist.get_process_group_ranks(base_group)) if base_group is not None \
        else tuple(range(dist.get_world_size()))
    check_autoep_size(autoep_size, len(base_ranks), expert_counts or {})
    key = (base_ranks, autoep_size)
    if key in _CACHE:
        return _CACHE[key]
    me = dist.get_rank()
    if me not in base_ranks:
        raise ValueError(f"rank {me} is not a member of the process group passed to autoep ({base_ranks})")
    ep_groups, edp_groups = layout(base_ranks, autoep_size)
    mine_ep = mine_edp = None
    # new_group is collective over the whole world: every rank creates every group, in order.
    for members in ep_groups:
        group = dist.new_group(list(members)) if len(members) > 1 else None
        if me in members:
            ep_ranks, mine_ep = members, group
    for members in edp_groups:
        group = dist.new_group(list(members)) if len(members) > 1 else None
        if me in members:
            edp_ranks, mine_edp = members, group
    groups = ExpertParallelGroups(len(base_ranks), me, autoep_size, ep_ranks, edp_ranks, mine_ep, mine_edp)
    _CACHE[key] = groups
    return groups
