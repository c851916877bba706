"""TorchTitan 0.3.0's MoE replacement as a conformance subject (conformance/titan.py): the subject
runs where TorchTitan runs, refuses what it cannot load, and each TorchTitan finding (TT-n in
conformance/findings.py) is reproduced with its measured numbers.

Runs only where torchtitan is installed (its own pinned environment, ``nox -s titan``)."""

import os
import subprocess
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest

pytest.importorskip("torchtitan", reason="torchtitan is not installed: these tests run in `nox -s titan`")

import copy  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

from autoep import launch  # noqa: E402
from conformance import findings, titan  # noqa: E402
from conformance.equivalence import model_equivalence  # noqa: E402
from matrix.models import CASES_BY_ID  # noqa: E402
from conformance.parallel import subject_step_on_rank  # noqa: E402
from conformance.runner import run_cell  # noqa: E402
from conformance.subjects import SUBJECTS  # noqa: E402
from matrix.cells import Cell  # noqa: E402

pytestmark = pytest.mark.xdist_group("ranks")

TITAN = SUBJECTS["torchtitan"]
VERSION = transformers.__version__


def _cell(case: str, dtype: str = "float32", zero_stage="none", world: int = 1, ep: int = 1,
          interop: str | None = None) -> Cell:
    return Cell(VERSION, case, zero_stage, world, ep, dtype, interop=interop)


def _fp32_grouped_experts(self, x_RD, num_tokens_per_expert_E):
    """Diagnosis only: TorchTitan's expert computation without its bf16 cast."""
    offsets = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
    gate = torch._grouped_mm(x_RD, self.w1_EFD.transpose(-2, -1), offs=offsets)
    up = torch._grouped_mm(x_RD, self.w3_EFD.transpose(-2, -1), offs=offsets)
    return torch._grouped_mm(F.silu(gate) * up, self.w2_EDF.transpose(-2, -1), offs=offsets)


@pytest.fixture
def fp32_experts(monkeypatch):
    from torchtitan.models.common.moe import GroupedExperts

    monkeypatch.setattr(GroupedExperts, "forward", _fp32_grouped_experts)


def _stock_and_titan(case_id: str, aux: bool = False):
    """The stock model (router logits off unless ``aux``) and TorchTitan's replacement of a copy."""
    stock = CASES_BY_ID[case_id].build()
    stock.config.output_router_logits = aux
    return stock, TITAN.apply(copy.deepcopy(stock), {})


def _logit_gap(stock, replaced) -> float:
    input_ids = torch.randint(0, stock.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return float((stock(input_ids=input_ids).logits - replaced(input_ids=input_ids).logits).abs().max())


# --- the subject ---------------------------------------------------------------------------------

def test_registered_without_importing_torchtitan_and_says_where_it_runs(monkeypatch):
    probe = "import sys, conformance.subjects as s; print('torchtitan' in s.SUBJECTS, 'torchtitan' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.split() == ["True", "False"]  # registered; torchtitan imported only on use
    monkeypatch.setattr(titan, "titan_installed", lambda: False)
    assert TITAN.unavailable_reason() == titan.NOT_INSTALLED and "nox -s titan" in titan.NOT_INSTALLED


def test_unavailable_reason_names_the_cells_it_cannot_run():
    assert TITAN.unavailable_reason() is None
    assert TITAN.unavailable_reason(_cell("mixtral")) is None
    assert TITAN.unavailable_reason(_cell("mixtral", world=4, ep=2)) is None
    assert TITAN.unavailable_reason(_cell("mixtral", zero_stage=2, world=4, ep=2)) == titan.NO_DEEPSPEED
    record = run_cell(_cell("mixtral", zero_stage=3, world=4, ep=4), "torchtitan")
    assert record["status"] == "skipped" and "does not run under DeepSpeed" in record["reason"]


def test_gradients_come_back_under_transformers_names_and_match_the_reference(fp32_experts):
    """With only the bf16 cast of TT-5 removed, the replacement of a case no other finding touches
    agrees with the reference and the stock model on logits, loss and every gradient (which the
    subject's mapping renames back: gate_up_proj from w1|w3, router, shared experts)."""
    result = model_equivalence(CASES_BY_ID["deepseek_v2-greedy-n_group1"], TITAN, torch.float32)
    assert not result.failures(), result.failures()
    grads = {c.what for c in result.comparisons["subject~original"] if c.what.startswith("grad ")}
    assert "grad model.layers.0.mlp.experts.gate_up_proj" in grads
    assert "grad model.layers.0.mlp.shared_experts.gate_proj.weight" in grads
    assert "grad model.layers.1.mlp.gate.weight" in grads
    assert result.max_diff("subject~original", "logits") < 1e-5


def test_bfloat16_cells_pass_where_no_finding_applies():
    record = run_cell(_cell("deepseek_v2-greedy-n_group1", "bfloat16"), "torchtitan")
    assert record["status"] == "pass", record.get("detail")


def test_expert_parallel_on_two_gloo_ranks_shards_the_experts_and_matches():
    """ep=2 without TorchTitan's trainer: gloo mesh, partial-DTensor backend, each MoE's own
    parallelize. Rank r holds experts [2r, 2r+2) of 4, and the engine-style reduction of the
    rank gradients matches the single-process reference in bf16."""
    case = CASES_BY_ID["deepseek_v2-greedy-n_group1"]
    input_ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(5))
    outputs = launch.run(2, subject_step_on_rank, case.id, "torchtitan", "bfloat16", 0, {"autoep_size": 2}, input_ids)
    shards = [output["expert_shards"] for output in outputs]
    assert shards[0]["model.layers.0.mlp.experts.gate_up_proj"] == (0, 4)
    assert shards[1]["model.layers.0.mlp.experts.down_proj"] == (2, 4)
    assert outputs[0]["run"].grads["model.layers.0.mlp.experts.gate_up_proj"].shape == (2, 32, 32)
    result = model_equivalence(case, TITAN, torch.bfloat16, world_size=2, autoep_size=2)
    assert not result.failures(), result.failures()


# --- findings TT-1 .. TT-5 -------------------------------------------------------------------------

def test_every_titan_finding_names_a_test_here_and_records_are_labelled():
    module = sys.modules[__name__]
    titan_findings = [f for f in findings.FINDINGS if f.subject == "torchtitan"]
    assert [f.id for f in titan_findings] == ["TT-1", "TT-2", "TT-3", "TT-4", "TT-5", "TT-6", "TT-7"]
    for finding in titan_findings:
        assert finding.reproduced_by.startswith(findings.TITAN_TEST), finding.id
        assert hasattr(module, finding.reproduced_by.split("::")[1]), finding.reproduced_by
    unknown = {"transformers": VERSION, "case": "deepseek_v2-greedy-n_group1", "dtype": "bfloat16",
               "zero_stage": "none", "resume": None, "subject": "torchtitan", "status": "fail",
               "detail": "Traceback\nRuntimeError: new", "findings": []}
    labelled = findings.label(unknown, _cell(unknown["case"], "bfloat16"), TITAN)
    assert labelled["finding"] is None and labelled["findings"] == ["unclassified peer failure"]


def test_tt1_no_router_logits_recorded_so_the_aux_loss_raises():
    stock, replaced = _stock_and_titan("mixtral", aux=True)
    input_ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(3))
    assert stock(input_ids=input_ids, labels=input_ids).aux_loss is not None
    with pytest.raises(IndexError, match="tuple index out of range"):
        replaced(input_ids=input_ids, labels=input_ids)
    for case in ("mixtral", "qwen3_moe", "qwen2_moe", "qwen3_5_moe"):
        for dtype in ("float32", "bfloat16"):
            record = run_cell(_cell(case, dtype), "torchtitan")
            assert (record["status"], record["finding"]) == ("fail", "TT-1"), (case, dtype, record.get("detail"))


def test_tt2_correction_bias_is_not_loaded_by_titans_converter(fp32_experts):
    from torchtitan.experiments.transformers_modeling_backend.state_dict_adapter import hf_to_titan_moe_state_dict

    stock = CASES_BY_ID["deepseek_v3"].build()
    with pytest.raises(titan.TitanWeightsNotLoaded, match=r"unexpected \['model.layers.0.mlp.expert_bias'"):
        TITAN.apply(copy.deepcopy(stock), {})
    converted = hf_to_titan_moe_state_dict(stock.state_dict())
    assert "model.layers.0.mlp.expert_bias" in converted  # TorchTitan's buffer is named expert_bias_E
    # What a silent strict=False load costs, and the same model with the one key renamed by hand.
    monkey = pytest.MonkeyPatch()
    try:
        monkey.setattr(titan, "_load_hf_weights", lambda model, state, convert, specs:
                       model.load_state_dict(convert(state), strict=False))
        dropped = TITAN.apply(copy.deepcopy(stock), {})
        monkey.setattr(titan, "_load_hf_weights", lambda model, state, convert, specs: model.load_state_dict(
            {k.replace(".expert_bias", ".expert_bias_E"): v for k, v in convert(state).items()}, strict=True))
        renamed = TITAN.apply(copy.deepcopy(stock), {})
    finally:
        monkey.undo()
    assert float(dropped.model.layers[0].mlp.expert_bias_E.abs().max()) == 0.0
    assert 2.5 < _logit_gap(stock, dropped) < 3.5  # measured 2.96
    assert _logit_gap(stock, renamed) < 1e-5  # measured 8e-7: the bias is all that is lost
    for case in ("deepseek_v3", "deepseek_v3-grouped-scaled"):
        record = run_cell(_cell(case), "torchtitan")
        assert (record["status"], record["finding"]) == ("fail", "TT-2"), record.get("detail")


def test_tt3_and_tt4_deepseek_v2_routing_follows_deepseek_v3_group_rule(fp32_experts):
    """bf16 cast removed, so what remains is routing: greedy with n_group=1 matches, greedy with
    n_group=2 (TT-3) and group_limited_greedy (TT-4) do not."""
    assert _logit_gap(*_stock_and_titan("deepseek_v2-greedy-n_group1")) < 1e-5  # measured 9.5e-7
    assert 1.0 < _logit_gap(*_stock_and_titan("deepseek_v2")) < 1.2  # measured 1.09
    assert 0.2 < _logit_gap(*_stock_and_titan("deepseek_v2-E6-top1")) < 0.3  # measured 0.246
    assert 1.3 < _logit_gap(*_stock_and_titan("deepseek_v2-group_limited")) < 1.45  # measured 1.36
    assert run_cell(_cell("deepseek_v2", "bfloat16"), "torchtitan")["finding"] == "TT-3"
    assert run_cell(_cell("deepseek_v2-group_limited", "bfloat16"), "torchtitan")["finding"] == "TT-4"


def test_tt5_float32_experts_run_in_bf16(monkeypatch):
    gaps = {case: _logit_gap(*_stock_and_titan(case)) for case in ("mixtral", "qwen3_5_moe")}
    assert 0.015 < gaps["mixtral"] < 0.035 and 0.04 < gaps["qwen3_5_moe"] < 0.08, gaps  # 0.0234, 0.0579
    monkeypatch.setattr(__import__("torchtitan.models.common.moe", fromlist=["GroupedExperts"]).GroupedExperts,
                        "forward", _fp32_grouped_experts)
    assert _logit_gap(*_stock_and_titan("mixtral")) < 1e-5  # measured 1.1e-6
    monkeypatch.undo()
    record = run_cell(_cell("deepseek_v2-greedy-n_group1"), "torchtitan")
    assert (record["status"], record["finding"]) == ("fail", "TT-5")
    assert "logits: max|diff|=0.0135" in record["detail"]


def test_tt6_and_tt7_titan_names_break_stock_optimizer_state_and_save_pretrained():
    stock, replaced = _stock_and_titan("deepseek_v2-greedy-n_group1")
    names = [name for name, _ in replaced.named_parameters()]
    assert "model.layers.0.mlp.routed_experts.inner_experts.w1_EFD" in names
    assert len(names) == len(list(stock.parameters())) + 2  # gate_up_proj split into w1 and w3, per layer
    order = run_cell(_cell("deepseek_v2-greedy-n_group1", interop="param_order"), "torchtitan")
    assert (order["status"], order["finding"]) == ("fail", "TT-6"), order.get("detail")
    assert "the stock AdamW state did not load" in order["detail"]
    roundtrip = run_cell(_cell("deepseek_v2-greedy-n_group1", interop="hf_roundtrip"), "torchtitan")
    assert (roundtrip["status"], roundtrip["finding"]) == ("fail", "TT-7"), roundtrip.get("detail")


def test_bench_torchtitan_block_computes_the_stock_block_in_bf16():
    """The benchmark's TorchTitan row (benchmarks/peers.py) times the stock block's computation:
    a bf16 model's block after TorchTitan's replacement equals the stock block within the bf16
    bound, output and input gradient (its fp32 model is bf16 inside: TT-5)."""
    from benchmarks.blocks import block_of, block_output, build_block_model, layer_inputs
    from benchmarks.peers import build
    from conformance.tolerances import compare, tolerance

    shape = dict(family="mixtral", hidden=64, intermediate=128, experts=4, top_k=2)
    block, _ = build("torchtitan", shape, torch.bfloat16, 1)
    stock = block_of(build_block_model(shape, torch.bfloat16))
    x, upstream = layer_inputs(shape, 32, torch.bfloat16)
    results = []
    for module in (block, stock):
        x.grad = None
        out = block_output(module(x))
        (out.float() * upstream).sum().backward()
        results.append((out.detach(), x.grad.clone()))
    tol = tolerance(torch.bfloat16)
    assert compare("output", results[0][0], results[1][0], tol).ok
    assert compare("input grad", results[0][1], results[1][1], tol).ok
