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
    with pytest.raises(AttributeError, match="no mutant"):
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
