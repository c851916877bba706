"""Checkpoint conformance: what an engine holds after a load equals what it held when it saved.

Rank side only (run through ``autoep.launch``). Each rank compares its own view, bit for bit:
live weights (gathered under ZeRO-3), fp32 master weights and Adam's ``exp_avg`` /
``exp_avg_sq``; expert tensors are this rank's local slices, so every EP rank's experts are
checked where they live.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io

import torch

from autoep import launch
from conformance.ranks import rank_device
from conformance.subjects import subject_by_name
from conformance.tolerances import compare, tolerance
from conformance.training import (TrainingSetup, assemble, build_engine, global_batches, on_cpu, process_globals_restored,
                                  reference_training, train_on_rank, train_steps)
from matrix.models import CASES_BY_ID

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
    # ZeRO-3 puts its flat fp32 partitions into the torch optimizer's groups only during a step.
    flat3 = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    groups = [{"params": [flat]} for flat in flat3] if flat3 is not None else base.param_groups
    if not any(group["params"] for group in groups):
        raise AssertionError("the engine's optimizer holds no parameters: nothing to compare")
    for index, group in enumerate(groups):
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


def round_trip_on_rank(case_id: str, setup: TrainingSetup, dtype_name: str, folder: str, mode: str,
                       batches: torch.Tensor) -> list[str]:
    """Train 2 steps, save, take a 3rd step; a fresh engine (other initial weights) loads in
    ``mode`` and must hold the saved state bit for bit; after a full load its 3rd step must
    equal the uninterrupted one. Returns this rank's differences (empty: exact)."""
    with process_globals_restored():
        engine = build_engine(case_id, "autoep", dtype_name, 0, setup)
        train_steps(engine, batches, range(2), setup)
        engine.save_checkpoint(folder, tag="saved")
        saved = engine_view(engine)
        train_steps(engine, batches, [2], setup)
        continued = engine_view(engine)
        del engine

        fresh = build_engine(case_id, "autoep", dtype_name, 1, setup)
        path, _ = fresh.load_checkpoint(folder, tag="saved", **LOAD_MODES[mode])
        if path is None:
            return ["load_checkpoint loaded nothing"]
        loaded = engine_view(fresh)
        found = [f"after load: {d}" for d in differences(loaded, saved, ["live"])]
        masters = {key: value for key, value in saved["optimizer"].items() if key.endswith(".master")}
        if mode == "full":
            found += [f"after load: {d}" for d in differences(loaded, saved, ["optimizer"])]
            train_steps(fresh, batches, [2], setup)
            found += [f"next step: {d}" for d in differences(engine_view(fresh), continued, list(continued))]
        else:  # the master weights must follow the loaded weights; the moments start afresh
            got = {key: loaded["optimizer"][key] for key in masters if key in loaded["optimizer"]}
            found += [f"after load: {d}" for d in differences({"master": got}, {"master": masters}, ["master"])]
        return found


def resume_elsewhere(case_id: str, zero_stage: int, source: tuple[int, int], target: tuple[int, int], folder: str,
                     steps_before: int = 2, steps_after: int = 2, subject_name: str = "autoep",
                     device: str = "cpu", zero_init: bool = False) -> list:
    """Train ``steps_before`` steps at ``source`` (world, autoep_size), save, convert to a
    Universal Checkpoint (with the subject's converter), resume at ``target`` for ``steps_after`` steps. The per-step losses
    and the final parameters must equal a single-process AdamW run of the original model on
    the same global batches (4 micro-batches per step at both ends: world x gradient
    accumulation = 4, so the objective is the same). ``device="cuda"``: the engines run one GPU per
    rank (the reference on the CPU). ``zero_init``: both ends build the model under
    deepspeed.zero.Init (ZeRO-3)."""
    import os

    micro_batches = 4
    total = steps_before + steps_after
    setups = {}
    for end, (world, autoep_size) in (("source", source), ("target", target)):
        if micro_batches % world:
            raise ValueError(f"world size {world} does not divide the {micro_batches} micro-batches of a step")
        setups[end] = TrainingSetup(zero_stage, autoep_size, steps=total, grad_accum=micro_batches // world,
                                    zero_init=zero_init)
    case = CASES_BY_ID[case_id]
    batches = global_batches(case.build().config.get_text_config().vocab_size, source[0], setups["source"])
    saved, universal = os.path.join(folder, "saved"), os.path.join(folder, "universal")
    first = launch.run(source[0], train_on_rank, case_id, subject_name, "float32", 0,
                       dataclasses.replace(setups["source"], steps=steps_before), batches, save_to=saved, device=device)
    reloaded = launch.run(source[0], reload_on_rank, case_id, subject_name,
                          dataclasses.replace(setups["source"], steps=steps_before), saved, device=device)
    converter_log = io.StringIO()  # DeepSpeed's converter prints its stages; kept for a failure
    try:
        with contextlib.redirect_stdout(converter_log):
            subject_by_name(subject_name).to_universal(saved, universal)
    except Exception as error:
        raise RuntimeError(f"{subject_name} Universal conversion failed; its output:\n{converter_log.getvalue()[-2000:]}") \
            from error
    second = launch.run(target[0], train_on_rank, case_id, subject_name, "float32", 0, setups["target"], batches,
                        first_step=steps_before, load_universal=universal, device=device)
    losses = torch.tensor([result["losses"] for result in first]).mean(dim=0).tolist() + \
        torch.tensor([result["losses"] for result in second]).mean(dim=0).tolist()
    want = reference_training(case, torch.float32, 0, TrainingSetup(zero_stage, 1, steps=total), micro_batches,
                              batches)
    tol = tolerance(torch.float32, "multi", device)
    got = assemble(second)
    return [compare("per-step loss", torch.tensor(losses), want["losses"], tol)] + \
        [compare(f"param {name}", got[name], value, tol) for name, value in want["params"].items()] + \
        reload_checks(assemble(reloaded), assemble(first))


def reload_on_rank(case_id: str, subject_name: str, setup: TrainingSetup, folder: str) -> dict:
    """Rank side: a fresh engine (other initial weights) at the topology that saved ``folder``
    loads it the regular way, weights only ("no_optimizer_states": the live weights come from
    the model files, and under ZeRO 0-2 each EP rank's experts from AutoEP's expert files, not
    from the optimizer's fp32 partitions, which would hide a wrong expert file); returns its
    parameters as :func:`conformance.training.train_on_rank` does."""
    import os

    subject = subject_by_name(subject_name)
    rank_device()  # on CUDA: the math settings the tolerances assume
    with process_globals_restored():
        engine = build_engine(case_id, subject_name, "float32", 1, setup)
        path, _ = engine.load_checkpoint(os.path.dirname(folder), tag=os.path.basename(folder),
                                         **LOAD_MODES["no_optimizer_states"])
        if path is None:
            raise RuntimeError(f"nothing was loaded from {folder}")
        return {"params": on_cpu(subject.full_parameters(engine)),
                "expert_shards": subject.expert_shards(engine.module)}


def reload_checks(reloaded: dict, saved: dict) -> list:
    """The weights a same-topology regular load restores equal the saved ones, bit for bit."""

    tol = tolerance(torch.float32, "checkpoint")
    return [compare(f"regular reload: param {name}", reloaded[name], value, tol) for name, value in saved.items()]
