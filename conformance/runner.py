"""Run the matrix cells for the installed Transformers version and record one result per cell."""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
import traceback

import torch

from autoep.presets.survey import installed_families
from conformance import findings
from conformance.checkpoints import resume_elsewhere
from conformance.equivalence import block_equivalence, model_equivalence
from conformance.faults import FAULTS
from conformance.interop import run_family
from conformance.subjects import missing_method_reason, subject_by_name
from conformance.tolerances import checks_record, set_cuda_numerics
from conformance.training import BF16_STEPS, TrainingSetup, compare_training
from matrix.cells import Cell, expected, profile_matrix, relative_cost
from matrix.experts_cases import NOT_RUN
from matrix.models import ALL_CASES, CASES_BY_ID, ModelSnapshot
from matrix.profiles import DEFAULT_PROFILE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEVICES = ("cpu", "cuda")  # --device; on CUDA every rank gets its own GPU (autoep.launch.backend_for)


def gpus_needed(cell: Cell) -> int:
    """GPUs a cell needs on CUDA: one per rank, at both ends of a checkpoint cell."""
    resume_world = cell.resume_topology[0] if cell.resume is not None else 0
    return max(cell.world_size, resume_world)


def device_unfit_reason(cell: Cell, device: str) -> str | None:
    """Why ``cell`` cannot run on ``device`` here (recorded as "skipped"), or None."""
    if device == "cpu":
        return None
    if device != "cuda":
        raise ValueError(f"device={device!r}: choose one of {', '.join(DEVICES)}")
    if cell.interop is not None:
        return ("interop cells run on the CPU only (conformance/interop.py has no device plumbing); "
                "run them with --device cpu")
    needed, visible = gpus_needed(cell), torch.cuda.device_count()
    if needed > visible:
        return f"needs {needed} GPU{'s' if needed > 1 else ''}, {visible} visible"
    return None


def run_cell(cell: Cell, subject_name: str = "autoep", device: str = "cpu") -> dict:
    """Run one cell for the subject; ``device="cuda"`` runs the subject on CUDA (one GPU per rank,
    NCCL) against the CPU reference, and records a cell that does not fit the visible GPUs as
    skipped, with the reason."""
    expectation = expected(cell)
    subject = subject_by_name(subject_name)
    record = {"cell": cell.id, **cell.to_json(), "subject": subject_name, "expected": expectation.outcome,
              "reason": expectation.reason, "findings": [], "device": device,
              "peer": bool(getattr(subject, "is_peer", False))}
    started = time.perf_counter()
    if expectation.outcome in ("not_applicable", "not_implemented"):
        record["status"] = expectation.outcome
    elif cell.interop and not hasattr(subject, "apply"):
        record.update(status="not_applicable", reason=f"interop cells use the subject's in-process apply(); the "
                                                      f"{subject_name} subject has none (it runs only inside "
                                                      f"deepspeed.initialize)")
    elif (why := getattr(subject, "not_applicable_reason", lambda cell: None)(cell)) is not None:
        record.update(status="not_applicable", reason=why)
    elif (why := missing_method_reason(subject, cell)) is not None:
        record.update(status="not_applicable", reason=why)
    elif (why := _unavailable(subject, cell)) is not None:
        record.update(status="skipped", reason=why)
    elif (why := device_unfit_reason(cell, device)) is not None:
        record.update(status="skipped", reason=why)
    elif expectation.outcome == "rejected":
        if not hasattr(subject, "apply"):
            record.update(status="skipped", reason=f"the {subject_name} subject has no in-process apply()")
        else:
            record.update(_run_rejection(cell, subject, expectation.error, device))
    else:
        if device == "cuda":
            set_cuda_numerics()  # what the CUDA tolerances assume (each rank process sets it too)
        record.update(_run_equivalence(cell, subject, device))
    record.update(findings.label(record, cell, subject))  # a peer's failure gets its finding id
    record["seconds"] = round(time.perf_counter() - started, 3)
    return record


def _unavailable(subject, cell) -> str | None:
    """The subject's ``unavailable_reason(cell)``; a subject without one can run every cell."""
    check = getattr(subject, "unavailable_reason", None)
    return None if check is None else check(cell)


def _run_rejection(cell: Cell, subject, error_name: str, device: str = "cpu") -> dict:
    case = CASES_BY_ID[cell.case]
    try:
        model = case.build(dtype=DTYPES[cell.dtype]).to(device)
    except Exception as error:  # the family does not exist in this Transformers at all
        return {"status": "rejected_as_expected",
                "detail": f"model class unavailable: {type(error).__name__}: {error}"[:400]}
    snapshot = ModelSnapshot.of(model)
    try:
        subject.apply(model, case.block(autoep_size=cell.autoep_size))
    except Exception as error:
        if type(error).__name__ != error_name:
            return {"status": "fail", "detail": f"{type(error).__name__}: {error}"[:400] + f" (expected {error_name})"}
        if not snapshot.unchanged(model):
            return {"status": "fail", "detail": f"{error_name} was raised, but only after the model was changed"}
        return {"status": "rejected_as_expected", "detail": f"{type(error).__name__}: {error}"[:400]}
    return {"status": "fail", "detail": f"expected {error_name}, but the subject accepted the model"}


def _run_equivalence(cell: Cell, subject, device: str = "cpu") -> dict:
    case = CASES_BY_ID[cell.case]
    dtype = DTYPES[cell.dtype]
    if cell.resume is not None:
        return _run_checkpoint(cell, subject, device)
    if cell.interop is not None:
        return _run_interop(cell, subject)
    if cell.fault is not None:
        return _run_fault(cell, subject, device)
    if cell.zero_stage != "none":
        return _run_training(cell, subject, device)
    try:
        if cell.world_size == 1 and cell.autoep_size == 1:
            model_result = model_equivalence(case, subject, dtype, device=device)
            block_results = block_equivalence(case, subject, dtype, device=device)
        else:  # rank processes; the block-level multi-process cases live in the tests
            model_result = model_equivalence(case, subject, dtype, world_size=cell.world_size,
                                             autoep_size=cell.autoep_size, device=device)
            block_results = []
    except Exception:
        return {"status": "fail", "detail": traceback.format_exc()[-1500:]}
    failures = model_result.failures() + [f for block in block_results for f in block.failures()]
    return {
        "status": "pass" if not failures else "fail",
        "detail": "; ".join(failures[:5]),
        "findings": model_result.findings,
        "input_seed": model_result.input_seed,
        "tolerance": {"rtol": model_result.tolerance.rtol, "atol": model_result.tolerance.atol,
                      "metric": model_result.tolerance.metric},
        "max_abs_diff": model_result.to_json()["max_abs_diff"],
        "block_max_abs_diff": max((c.max_abs_diff for b in block_results for items in b.comparisons.values()
                                   for c in items), default=0.0),
    }


def _run_training(cell: Cell, subject, device: str = "cpu") -> dict:
    """A ZeRO cell: AdamW steps of the subject's DeepSpeed engine vs single-process PyTorch
    (3 steps in float32, BF16_STEPS in bf16)."""
    setup = TrainingSetup(int(cell.zero_stage), cell.autoep_size, zero_init=cell.build == "zero-init")
    if cell.dtype != "float32":
        setup = dataclasses.replace(setup, steps=BF16_STEPS)
    try:
        checks = compare_training(CASES_BY_ID[cell.case], subject, DTYPES[cell.dtype], setup, cell.world_size,
                                  device=device)
    except Exception:
        return {"status": "fail", "detail": traceback.format_exc()[-1500:]}
    return checks_record(checks)


def _run_checkpoint(cell: Cell, subject, device: str = "cpu") -> dict:
    """A checkpoint cell: train, save, convert to Universal (the subject's converter), resume on
    another topology; the 4 per-step losses and final parameters vs single-process PyTorch."""
    try:
        with tempfile.TemporaryDirectory(prefix="autoep-conformance-") as folder:
            checks = resume_elsewhere(cell.case, int(cell.zero_stage), (cell.world_size, cell.autoep_size),
                                      cell.resume_topology, folder, subject_name=subject.name, device=device,
                                      zero_init=cell.build == "zero-init")
    except Exception:
        return {"status": "fail", "detail": traceback.format_exc()[-1500:]}
    return checks_record(checks)


def _run_fault(cell: Cell, subject, device: str = "cpu") -> dict:
    """A fault cell: the fault injected, then a load on every rank (conformance/faults.py)."""
    try:
        with tempfile.TemporaryDirectory(prefix="autoep-conformance-") as folder:
            return FAULTS[cell.fault](cell.case, int(cell.zero_stage), cell.world_size, cell.autoep_size, folder,
                                      subject_name=subject.name, device=device)
    except Exception:
        return {"status": "fail", "detail": traceback.format_exc()[-1500:]}


def _run_interop(cell: Cell, subject) -> dict:
    """An interop cell: the subject's model used with one Transformers/PyTorch feature, judged
    against the stock model (conformance/interop.py)."""
    try:
        result = run_family(cell.interop, CASES_BY_ID[cell.case], subject, DTYPES[cell.dtype])
    except Exception:
        return {"status": "fail", "detail": traceback.format_exc()[-1500:]}
    if result.not_applicable:
        return {"status": "not_applicable", "reason": result.not_applicable, "findings": result.findings,
                "measured": result.detail}
    failures = result.failures()
    finite = [check.max_abs_diff for check in result.checks if check.max_abs_diff != float("inf")]
    return {"status": "pass" if not failures else "fail", "detail": "; ".join(failures[:5]),
            "findings": result.findings, "measured": result.detail,
            "max_abs_diff": {"subject~original": max(finite, default=0.0)}}


def run_matrix(transformers: str, subject_name: str = "autoep", case_filter: str | None = None,
               profile: str = DEFAULT_PROFILE, progress=None, device: str = "cpu") -> list[dict]:
    """Every cell of ``profile`` on ``transformers`` for the subject (those whose case id contains
    ``case_filter``), then the subject's labelled rejection cell. ``progress`` (default: stdout)
    gets one line per finished cell. ``device``: see :func:`run_cell`."""
    subject = subject_by_name(subject_name)
    cells = [cell for cell in profile_matrix(transformers, profile, peer=getattr(subject, "is_peer", False))
             if not case_filter or case_filter in cell.case]
    meter = Progress(cells, f"{subject_name} tf{transformers} {profile}", progress or sys.stdout,
                     cost=lambda cell: 0.0 if _unavailable(subject, cell) is not None
                     or device_unfit_reason(cell, device) is not None else relative_cost(cell))
    records = []
    for cell in cells:
        records.append(run_cell(cell, subject_name, device))
        meter.finished(cell, records[-1])
    records += findings.rejection_records(transformers, subject_name, case_filter)  # a peer's labelled rejection
    if not getattr(subject, "is_peer", False) and not case_filter:
        records += uncovered_family_records(transformers, subject_name)
    for record in records:
        record["profile"] = profile
        record.setdefault("device", "cpu")  # a peer's labelled rejection cell runs on the CPU (gloo)
    return records


def uncovered_family_records(transformers: str, subject_name: str) -> list[dict]:
    """A cell for every MoE family of the installed Transformers that no conformance case covers (a
    family a newer release adds): "unclassified", with the family's verdict, never silently absent."""
    covered = {case.model_type for case in ALL_CASES} | {case.preset for case in ALL_CASES} | set(NOT_RUN)
    records = []
    for family in installed_families():
        if set(family.model_types) & covered or (family.refusal is not None and family.refusal.hard):
            continue  # (a family the table refuses in every mode has its verdict and reason already)
        verdict = f"{family.status}, mode {family.mode}" + (f": {family.reason}" if family.reason else "")
        records.append({
            "cell": f"tf{transformers}/{family.folder}/unclassified", "transformers": transformers,
            "case": family.folder, "zero_stage": "none", "world_size": 1, "autoep_size": 1, "dtype": "float32",
            "resume": None, "interop": None, "build": None, "subject": subject_name, "peer": False,
            "expected": "unclassified", "status": "unclassified", "findings": [], "device": "cpu", "seconds": 0.0,
            "reason": f"the installed Transformers has the MoE family {family.folder} ({', '.join(family.model_types)}; "
                      f"{verdict}) and no conformance case covers it: add one to matrix/experts_cases.py"})
    return records


class Progress:
    """One line per finished cell: counter, outcome, seconds, cell, and the time left, estimated
    from the seconds spent so far per unit of ``cost`` (cells the subject cannot run cost 0)."""

    def __init__(self, cells: list[Cell], title: str, stream, cost=relative_cost):
        self.cost = cost
        self.total_cost = sum(cost(cell) for cell in cells) or 1.0
        self.count, self.done, self.done_cost = len(cells), 0, 0.0
        self.started = time.perf_counter()
        self.title, self.stream = title, stream
        print(f"{title}: {self.count} cells", file=stream, flush=True)

    def finished(self, cell: Cell, record: dict) -> None:
        self.done += 1
        self.done_cost += self.cost(cell)
        elapsed = time.perf_counter() - self.started
        left = elapsed / self.done_cost * (self.total_cost - self.done_cost) if self.done_cost else 0.0
        label = record["status"] + (f" ({record['finding']})" if record.get("finding") else "")
        print(f"[{self.done:>3}/{self.count}] {label:<22} {record['seconds']:7.1f}s  {cell.id}  "
              f"(elapsed {_minutes(elapsed)}, about {_minutes(left)} left)", file=self.stream, flush=True)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
