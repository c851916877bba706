"""Checkpoint conformance: what an engine holds after a load equals what it held when it saved.

Rank side only (run through ``autoep.launch``). Each rank compares its own view, bit for bit:
live weights (gathered under ZeRO-3), fp32 master weights and Adam's ``exp_avg`` /
``exp_avg_sq``; expert tensors are this rank's local slices, so every EP rank's experts are
checked where they live.
"""

from __future__ import annotations

import torch

from conformance.models import CASES_BY_ID
from conformance.training import ADAMW, TrainingSetup, deepspeed_config, micro_batch, process_globals_restored

LOAD_MODES = {
    "full": {},
    "module_only": {"load_module_only": True},
    "no_optimizer_states": {"load_optimizer_states": False},
}


def engine_view(engine) -> dict[str, dict[str, torch.Tensor]]:
    """{"live": {parameter name: weights}, "optimizer": {key: tensor}}. The optimizer part is
    the torch optimizer under the engine as it is: its parameters (ZeRO's flat fp32
    partitions of this rank, or the parameters themselves at ZeRO-0 in fp32) and its state
    (exp_avg, exp_avg_sq, step), keyed by group and position."""
    import deepspeed

    view: dict[str, dict[str, torch.Tensor]] = {"live": {}, "optimizer": {}}
    for name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
            view["live"][name] = param.detach().to("cpu", copy=True)
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer
    for index, group in enumerate(base.param_groups):
        for position, param in enumerate(group["params"]):
            key = f"group{index}[{position}]"
            view["optimizer"][f"{key}.master"] = param.detach().to("cpu", copy=True)
            for name, value in base.state.get(param, {}).items():
                value = value if torch.is_tensor(value) else torch.tensor(value)
                view["optimizer"][f"{key}.{name}"] = value.detach().to("cpu", copy=True)
    return view


def differences(got: dict, want: dict, kinds) -> list[str]:
    found = []
    for kind in kinds:
        if got[kind].keys() != want[kind].keys():
            found.append(f"{kind}: names differ ({sorted(got[kind].keys() ^ want[kind].keys())[:3]})")
            continue
        for name, value in want[kind].items():
            if not torch.equal(got[kind][name], value):
                diff = (got[kind][name].double() - value.double()).abs().max() if got[kind][name].shape == \
                    value.shape else float("inf")
                found.append(f"{kind} {name}: max|diff| {float(diff):.3g}")
    return found


def _engine(case_id: str, setup: TrainingSetup, dtype_name: str, seed: int):
    import autoep

    model = CASES_BY_ID[case_id].build(seed=seed, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
    engine, *_ = autoep.initialize(model=model, optimizer=optimizer, config=deepspeed_config(setup, dtype_name))
    return engine


def _train(engine, batches, steps, setup):
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    for step in steps:
        ids = micro_batch(batches, step, 0, rank, world, setup)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()


def round_trip_on_rank(case_id: str, setup: TrainingSetup, dtype_name: str, folder: str, mode: str,
                       batches: torch.Tensor) -> list[str]:
    """Train 2 steps, save, take a 3rd step; a fresh engine (other initial weights) loads in
    ``mode`` and must hold the saved state bit for bit; after a full load its 3rd step must
    equal the uninterrupted one. Returns this rank's differences (empty: exact)."""
    with process_globals_restored():
        engine = _engine(case_id, setup, dtype_name, seed=0)
        _train(engine, batches, range(2), setup)
        engine.save_checkpoint(folder, tag="saved")
        saved = engine_view(engine)
        _train(engine, batches, [2], setup)
        continued = engine_view(engine)
        del engine

        fresh = _engine(case_id, setup, dtype_name, seed=1)
        path, _ = fresh.load_checkpoint(folder, tag="saved", **LOAD_MODES[mode])
        if path is None:
            return ["load_checkpoint loaded nothing"]
        loaded = engine_view(fresh)
        found = [f"after load: {d}" for d in differences(loaded, saved, ["live"])]
        masters = {key: value for key, value in saved["optimizer"].items() if key.endswith(".master")}
        if mode == "full":
            found += [f"after load: {d}" for d in differences(loaded, saved, ["optimizer"])]
            _train(fresh, batches, [2], setup)
            found += [f"next step: {d}" for d in differences(engine_view(fresh), continued, list(continued))]
        else:  # the master weights must follow the loaded weights; the moments start afresh
            got = {key: loaded["optimizer"][key] for key in masters if key in loaded["optimizer"]}
            found += [f"after load: {d}" for d in differences({"master": got}, {"master": masters}, ["master"])]
        return found
