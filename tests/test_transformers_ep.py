"""Transformers' own expert parallelism as a conformance subject (conformance/transformers_ep.py):
which cells it takes, how its reduced gradients are judged, and its cells against the reference."""

from __future__ import annotations

import pytest
import torch

from conformance.parallel import reduce_like_an_engine, reduced_gradients_agree
from conformance.runner import run_cell
from conformance.runs import RunOutput
from conformance.subjects import SUBJECTS
from conformance.transformers_ep import NO_DEEPSPEED, ONE_PROCESS_AGAIN, PLAIN_MODULES, ep_plan
from matrix.cells import profile_matrix
from matrix.models import CASES_BY_ID
from matrix.profiles import NEWEST

pytestmark = pytest.mark.xdist_group("ranks")

SUBJECT = SUBJECTS["transformers_ep"]


def _cells() -> dict:
    return {cell.id: cell for cell in profile_matrix(NEWEST, "full", peer=True)}


def _needs_subject():
    if (why := SUBJECT.unavailable_reason()) is not None:
        pytest.skip(why)


def _output(grads: dict) -> dict:
    return {"run": RunOutput(torch.zeros(1), torch.zeros(()), None, grads), "expert_shards": {}}


def test_reduced_gradients_are_taken_as_they_are_only_when_every_rank_reports_the_same():
    same = {"w": torch.tensor([1.0, 2.0]), "v": torch.tensor([3.0])}
    outputs = [_output({k: v.clone() for k, v in same.items()}) for _ in range(4)]
    taken = reduce_like_an_engine(outputs, SUBJECT)
    assert all(torch.equal(taken[k], same[k]) for k in same)  # not divided again by the world size
    assert torch.equal(reduce_like_an_engine(outputs)["w"], same["w"])  # the mean of equal local ones
    apart = [_output(dict(same)), _output({"w": torch.tensor([1.0, 2.5]), "v": torch.tensor([3.0])})]
    with pytest.raises(AssertionError, match=r"w: rank 1's reduced gradient differs from rank 0's"):
        reduce_like_an_engine(apart, SUBJECT)
    with pytest.raises(AssertionError, match="other parameters"):
        reduced_gradients_agree([same, {"w": same["w"]}])
    # A subject reporting local gradients as if reduced is caught by the same check (ranks' micro-batches differ).
    local = [_output({"w": torch.tensor([float(rank), 0.0])}) for rank in range(2)]
    with pytest.raises(AssertionError, match="differs"):
        reduce_like_an_engine(local, SUBJECT)


def test_cells_it_takes_and_the_reason_for_each_it_does_not():
    from transformers import LlamaConfig, MixtralConfig

    assert ep_plan(MixtralConfig()) and not ep_plan(LlamaConfig())
    cells = _cells()
    zero = next(c for c in cells.values() if c.case == "mixtral" and c.zero_stage != "none")
    assert SUBJECT.not_applicable_reason(zero) == NO_DEEPSPEED
    plain = next(c for c in cells.values() if c.case.startswith("plain_"))
    assert SUBJECT.not_applicable_reason(plain) == PLAIN_MODULES
    refused = next(c for c in cells.values() if CASES_BY_ID[c.case].refused_with is not None)
    assert "expects autoep's refusal" in SUBJECT.not_applicable_reason(refused)
    for cell_id in ("mixtral/zero-none/w4-ep2/float32", "mixtral/zero-none/w1-ep1/interop-hf_roundtrip/float32",
                    "qwen3_moe/zero-none/w1-ep1/float32"):
        assert SUBJECT.not_applicable_reason(cells[f"tf{NEWEST}/{cell_id}"]) is None, cell_id
    for cell_id in ("mixtral-top1/zero-none/w1-ep1/float32", "mixtral/zero-none/w1-ep1/bfloat16",
                    "mixtral@experts/zero-none/w1-ep1/float32"):  # the stock model's load path again
        assert SUBJECT.not_applicable_reason(cells[f"tf{NEWEST}/{cell_id}"]) == ONE_PROCESS_AGAIN, cell_id


def test_expert_parallel_cells_one_after_another_on_the_shared_ranks():
    """Four ranks, ep 2 and ep 4, fp32 and bf16, on the same rank processes: every cell equals the reference
    and the stock model (the second cell used to find a DTensor result cached with the first cell's mesh,
    whose process groups were gone)."""
    _needs_subject()
    cells = _cells()
    for cell_id in ("mixtral/zero-none/w4-ep2/float32", "mixtral/zero-none/w4-ep2/bfloat16",
                    "deepseek_v3/zero-none/w4-ep4/float32", "mixtral@experts/zero-none/w4-ep2/float32"):
        record = run_cell(cells[f"tf{NEWEST}/{cell_id}"], "transformers_ep")
        assert record["status"] == "pass", (cell_id, record.get("detail"))


def test_the_model_keeps_the_mode_it_was_given():
    """from_pretrained returns eval mode; the suite's models come in the mode the cell runs them in (PhiMoE's
    router differs between the two: the one-process cell failed by 1.43 in the logits before)."""
    _needs_subject()
    case = CASES_BY_ID["phimoe"]
    for training in (False, True):
        model = case.build(seed=0, dtype=torch.float32).train(training)
        assert SUBJECT.apply(model, case.block()).training is training
    record = run_cell(_cells()[f"tf{NEWEST}/phimoe/zero-none/w1-ep1/float32"], "transformers_ep")
    assert record["status"] == "pass", record.get("detail")


def test_a_peer_that_cannot_run_here_records_its_cells_skipped_and_exits_0(tmp_path, monkeypatch, capsys):
    """As transformers_ep on a Transformers whose DistributedConfig has no ep_size (4.57.6): the run goes on,
    every cell it would take is recorded skipped with the reason (a subject under test still exits 2)."""
    import json
    import sys

    from conformance.__main__ import main

    (tmp_path / "absent_peer.py").write_text(
        "class AbsentPeer:\n"
        "    name = 'absent_peer:AbsentPeer'\n"
        "    is_peer = True\n"
        "    def unavailable_reason(self, cell=None):\n"
        "        return 'not installed here'\n"
        "    def apply(self, model, block):\n"
        "        raise AssertionError('never called')\n"
        "    def expert_shards(self, model):\n"
        "        return {}\n"
        "class AbsentUnderTest(AbsentPeer):\n"
        "    name = 'absent_peer:AbsentUnderTest'\n"
        "    is_peer = False\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    assert main(["run", "--subject", "absent_peer:AbsentPeer", "--profile", "smoke", "--case", "mixtral-top1",
                 "--out", str(out)]) == 0
    assert "its cells are recorded skipped" in capsys.readouterr().out
    part = json.loads(next((out / "conformance-report" / "smoke").glob("*absent_peer*.json")).read_text())
    records = part["records"] if isinstance(part, dict) else part
    assert records and {r["status"] for r in records} == {"skipped"}
    assert all(r["reason"] == "not installed here" for r in records)
    assert main(["run", "--subject", "absent_peer:AbsentUnderTest", "--profile", "smoke", "--case", "mixtral-top1",
                 "--out", str(out)]) == 2
    del sys.modules["absent_peer"]
