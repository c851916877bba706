"""The mutant bank (mutants/): its shape, and that a kill is the planted bug, not the cell."""

import pytest
import transformers

from conformance.runner import run_cell
from matrix.cells import Cell, default_matrix
from mutants.__main__ import active_cells, hunt
from mutants.bank import BANK, BY_ID

VERSION = transformers.__version__


def test_bank_has_at_least_15_cited_mutants_each_with_active_cells():
    assert len(BANK) >= 15
    assert len(BY_ID) == len(BANK), "mutant ids must be unique"
    cells = default_matrix(VERSION)
    for mutant in BANK:
        assert mutant.id.isidentifier() and mutant.description and mutant.source, mutant.id
        assert any(mutant.active(cell) for cell in cells), f"{mutant.id}: no active cell"
        assert active_cells(mutant, VERSION), f"{mutant.id}: no active cell expected to pass"
        assert mutant.name == f"mutants.bank:{mutant.id}"


def test_rank_processes_find_a_mutant_by_name():
    from conformance.subjects import subject_by_name

    assert subject_by_name("mutants.bank:padding_rows_leak") is BY_ID["padding_rows_leak"]
    with pytest.raises(LookupError, match="no mutant 'no_such_mutant'"):  # (conformance.subjects.UnknownSubject)
        subject_by_name("mutants.bank:no_such_mutant")


@pytest.mark.parametrize("mutant_id", ["capacity_token_drop", "router_logits_slot_swapped"])
def test_cheap_mutant_is_killed_by_its_first_cell_which_autoep_passes(mutant_id):
    mutant = BY_ID[mutant_id]
    first = active_cells(mutant, VERSION)[0]
    assert (first.zero_stage, first.world_size) == ("none", 1)  # one process: cheap
    row = hunt(mutant, VERSION)
    assert row["killed"] and row["killing_cell"] == first.id, row
    assert "OUT OF TOLERANCE" in row["what_differed"]
    # The unmutated subject passes the same cell: the kill is the bug, not the cell.
    assert run_cell(first, "autoep")["status"] == "pass"


def test_a_mutant_is_only_in_the_subject_table_while_it_runs():
    from conformance.subjects import SUBJECTS

    hunt(BY_ID["padding_rows_leak"], VERSION)
    assert not any(name.startswith("mutants.") for name in SUBJECTS)


def test_a_mutant_without_a_killing_cell_is_reported_as_survivor(monkeypatch):
    mutant = BY_ID["capacity_token_drop"]
    cell = Cell(VERSION, "mixtral-topk_eq_E", "none", 1, 1, "float32")  # top_k = E: nothing exceeds capacity
    monkeypatch.setattr("mutants.__main__.active_cells", lambda *args, **kwargs: [cell])
    row = hunt(mutant, VERSION)
    assert not row["killed"] and row["cells_run"] == [{"cell": cell.id, "status": "pass",
                                                       "seconds": row["cells_run"][0]["seconds"]}]


def test_clip_norm_mutant_is_active_where_ranks_hold_different_experts():
    mutant = BY_ID["clip_norm_mean_of_local_norms"]
    cell = Cell(VERSION, "deepseek_v3", 0, 4, 2, "float32")
    assert mutant.active(cell)
    assert mutant.active(Cell(VERSION, "deepseek_v3", 0, 4, 4, "float32"))
    assert not mutant.active(Cell(VERSION, "deepseek_v3", 0, 4, 1, "float32"))  # every rank: every expert
    assert not mutant.active(Cell(VERSION, "deepseek_v3", 1, 4, 2, "float32"))  # ZeRO-1/2/3: their own clipping


def test_clipping_norm_check_kills_clip_norm_mutant_where_parameters_alone_do_not():
    """deepseek_v3 ZeRO-0 w4-ep2: the mean of local norms is 1.2% small; after 3 steps the
    parameters drift 1.1e-5 (inside the tolerance: before the clipping checks the mutant passed
    this cell), while the norm the engine clipped with, reported and applied, is out of tolerance.
    The unmutated subject passes the same cell, its reported norm compared (not skipped)."""
    from mutants.__main__ import registered

    cell = Cell(VERSION, "deepseek_v3", 0, 4, 2, "float32")
    with registered(BY_ID["clip_norm_mean_of_local_norms"]) as name:
        record = run_cell(cell, name)
    assert record["status"] == "fail", record
    failed = [part.split(":")[0] for part in record["detail"].split("; ")]
    assert failed == ["grad norm (engine.get_global_grad_norm, every rank, per step)",
                      "clip coefficient applied (every rank, per step)"], record["detail"]
    assert run_cell(cell, "autoep")["status"] == "pass"
