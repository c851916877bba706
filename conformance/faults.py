"""Fault cells: what a subject's checkpoints are after a rank dies in the middle of a save.

``killed-resave``: on W ranks, one training step, a save into tag ``step`` (complete), a second
step, and a save into the same tag again that rank 1 does not survive: it exits at the first file it
writes (``torch.save``, through which DeepSpeed's checkpoint engine and AutoEP both write); the
launcher then ends the other ranks. A fresh engine on every rank loads tag ``step``. Conformant:
every rank refuses the load (an exception on every rank), or every rank holds exactly what the
complete save held (live weights, master weights, Adam's moments and step:
:func:`conformance.checkpoints.engine_view`). Anything else fails the cell: a load that succeeds
with other values (a mix of the two saves), ranks that disagree (one loads, another refuses), or a
rank that does not return (the launcher's timeout ends it).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from autoep import launch
from conformance.checkpoints import differences, engine_view
from conformance.training import TrainingSetup, build_engine, global_batches, process_globals_restored, train_steps
from matrix.models import CASES_BY_ID

TAG = "step"
DYING_RANK = 1
KILLED_EXIT = 86  # the exit status of the rank killed in the middle of the re-save
LOAD_TIMEOUT_S = 180.0  # a load that has not returned on every rank by then is a hang


def _views_folder(folder: str) -> str:
    return folder + "-views"  # beside the checkpoint folder, not in it


def killed_resave_on_rank(case_id: str, subject_name: str, setup: TrainingSetup, folder: str,
                          batches: torch.Tensor) -> str:
    """Rank side: step, complete save (this rank's view of it kept beside the folder), step, re-save
    into the same tag; rank ``DYING_RANK`` exits at its first file write of the re-save. Returns
    "re-saved" on a rank that finished the re-save (on every rank: the fault was not injected)."""
    rank = dist.get_rank()
    with process_globals_restored():
        engine = build_engine(case_id, subject_name, "float32", 0, setup)
        train_steps(engine, batches, range(1), setup)
        engine.save_checkpoint(folder, tag=TAG)
        os.makedirs(_views_folder(folder), exist_ok=True)
        torch.save(engine_view(engine), os.path.join(_views_folder(folder), f"rank{rank}.pt"))
        train_steps(engine, batches, [1], setup)
        save = torch.save
        if rank == DYING_RANK:
            def dying(*args, **kwargs):
                os._exit(KILLED_EXIT)
            torch.save = dying
        try:
            engine.save_checkpoint(folder, tag=TAG)
        finally:
            torch.save = save
        return "re-saved"


def load_on_rank(case_id: str, subject_name: str, setup: TrainingSetup, folder: str) -> dict:
    """Rank side: a fresh engine (other initial weights) loads tag ``step``; returns whether it was
    refused (and the error) or what differs from this rank's view of the complete save."""
    with process_globals_restored():
        engine = build_engine(case_id, subject_name, "float32", 1, setup)
        try:
            path, _ = engine.load_checkpoint(folder, tag=TAG)
        except Exception as error:  # noqa: BLE001 - any refusal counts, if every rank refuses
            return {"outcome": "refused", "error": f"{type(error).__name__}: {error}"[:600]}
        if path is None:
            return {"outcome": "refused", "error": "load_checkpoint loaded nothing (returned None)"}
        saved = torch.load(os.path.join(_views_folder(folder), f"rank{dist.get_rank()}.pt"), weights_only=True)
        loaded = engine_view(engine)
        return {"outcome": "loaded", "differences": differences(loaded, saved, ["live", "optimizer"]),
                "tensors": {kind: len(saved[kind]) for kind in ("live", "optimizer")}}


def killed_resave(case_id: str, zero_stage: int, world: int, autoep_size: int, folder: str,
                  subject_name: str = "autoep", device: str = "cpu") -> dict:
    """The cell: the record fields ``status`` ("pass", "fail" or "not_applicable") and ``detail``."""
    setup = TrainingSetup(zero_stage, autoep_size, steps=2)
    case = CASES_BY_ID[case_id]
    batches = global_batches(case.build().config.get_text_config().vocab_size, world, setup)
    checkpoint = os.path.join(folder, "checkpoint")
    try:
        outcomes = launch.run(world, killed_resave_on_rank, case_id, subject_name, setup, checkpoint, batches,
                              device=device)
    except launch.RankError as error:
        if f"exited with code {KILLED_EXIT}" not in str(error):
            return {"status": "fail", "detail": f"the training and saves before the fault failed: {error}"[-1500:]}
    else:
        return {"status": "not_applicable",
                "reason": f"rank {DYING_RANK} wrote no file in the re-save ({outcomes}): no fault to inject"}
    try:
        loads = launch.run(world, load_on_rank, case_id, subject_name, setup, checkpoint, device=device,
                           timeout=LOAD_TIMEOUT_S)
    except launch.RankTimeout as error:
        return {"status": "fail", "detail": f"after a rank was killed in a re-save, the load hung: {error}"[:1500]}
    except launch.RankError as error:
        return {"status": "fail", "detail": f"after a rank was killed in a re-save, a load crashed: {error}"[-1500:]}
    outcomes = [load["outcome"] for load in loads]
    if all(outcome == "refused" for outcome in outcomes):
        return {"status": "pass", "detail": f"every rank refused the load: {loads[0]['error']}"}
    if all(outcome == "loaded" for outcome in outcomes):
        if not any(load["differences"] for load in loads):
            return {"status": "pass", "detail": "every rank loaded exactly the last complete save"}
        counts = "; ".join(
            f"rank {rank}: " + ", ".join(
                f"{sum(found.startswith(kind + ' ') for found in load['differences'])} of {total} {kind} tensors"
                for kind, total in load["tensors"].items()) + " differ"
            for rank, load in enumerate(loads))
        first = [f"rank {rank}: {found}" for rank, load in enumerate(loads) for found in load["differences"]][:3]
        return {"status": "fail", "detail": f"the load succeeded on every rank with a state that is not the last "
                                            f"complete save (a mix of the two saves): {counts} (first: "
                                            f"{'; '.join(first)})"}
    return {"status": "fail", "detail": "the ranks disagree: " + "; ".join(
        f"rank {rank} {load['outcome']}" + (f" ({load['error'][:200]})" if load["outcome"] == "refused" else "")
        for rank, load in enumerate(loads))}


FAULTS = {"killed-resave": killed_resave}
