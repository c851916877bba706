"""State of a shared rank process: its device, and the process groups a run creates there
(released when the run ends, so the next run on the same process starts as it found it)."""

from __future__ import annotations

import contextlib
import gc
import os

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from autoep import groups as autoep_groups
from conformance.tolerances import set_cuda_numerics


def rank_device() -> torch.device:
    """This rank process's device: ``cuda:r`` in a CUDA pool (the launcher made it current and set
    AUTOEP_DEVICE), with the CUDA math settings the tolerances assume; else the CPU."""
    if os.environ.get("AUTOEP_DEVICE") == "cuda":
        set_cuda_numerics()
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def process_groups_released(keep=lambda: ()):
    """Rank side: destroy the process groups created inside the block (the subject's EP/EDP
    groups, DeepSpeed's expert groups), except those ``keep()`` names (groups a library caches
    for later runs). Rank processes are shared between runs and a gloo group keeps its threads
    until destroyed: measured, after ~250 cells each 4-rank worker held 880 gloo threads
    (pt_gloo_runloop, gloo_tcp_loop) and the cells ran 5-10x slower (load average 135)."""
    before = set(c10d._world.pg_map)
    cached_before = set(autoep_groups._CACHE)
    try:
        yield
    finally:
        # autoep reuses its EP/EDP groups per (ranks, autoep_size); the block's are destroyed
        # below, so the cache forgets them (a later run creates its own).
        for key in set(autoep_groups._CACHE) - cached_before:
            del autoep_groups._CACHE[key]
        kept = {id(group) for group in keep()}
        destroyed = [g for g in list(c10d._world.pg_map) if g not in before and id(g) not in kept]
        for group in destroyed:
            try:
                dist.destroy_process_group(group)
            except Exception:  # already destroyed by its owner
                pass
        if destroyed:
            forget_dtensor_meshes()
        gc.collect()  # a destroyed gloo group's threads end when the last reference to it goes


def forget_dtensor_meshes() -> None:
    """Clear the caches in which torch's DTensor keeps results that hold a DeviceMesh (sharding
    propagation, Python and the C++ fast path; redistribution plans; mesh topology). A mesh compares
    equal to any later mesh of the same layout, so once the groups above are destroyed a cached result
    would hand a later run on this process a mesh whose groups are gone: measured with Transformers'
    EP (conformance/transformers_ep.py), the second w4-ep2 cell on the same ranks failed with "Could
    not resolve the process group registered under the name N" while loading or gathering. A user's
    process keeps its groups and never meets this."""
    from torch.distributed.tensor import _redistribute
    from torch.distributed.tensor._collective_utils import MeshTopoInfo
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache

    _clear_sharding_prop_cache()
    _redistribute._gen_transform_infos.cache_clear()
    MeshTopoInfo.build_from_mesh.cache_clear()
