"""Each finding about the DeepSpeed peer (conformance/findings.py) reproduced precisely, one small
run each, and the peer driven the way DeepSpeed documents (config "optimizer" block, or a callable
that splits the MoE parameter groups) training right where DeepSpeed's AutoEP works."""

import os
import re

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch
import transformers
from packaging.version import Version

from autoep import launch
from conformance import findings
from conformance.findings import FINDINGS_BY_ID, classify, engine_outcome_on_rank, label, rejection_records
from matrix.models import CASES_BY_ID
from conformance.subjects import SUBJECTS
from conformance.tolerances import tolerance
from conformance.training import TrainingSetup, build_engine, compare_training, process_globals_restored, train_steps

pytestmark = pytest.mark.xdist_group("ranks")

DEEPSPEED = SUBJECTS["deepspeed"]
TRANSFORMERS = Version(transformers.__version__)


def _needs_peer():
    if (why := DEEPSPEED.unavailable_reason()) is not None:
        pytest.skip(why)


def _failures(checks) -> list[str]:
    return [str(check) for check in checks if not check.ok]


def _record(case, detail, version=transformers.__version__, zero_stage=2, resume=None, subject="deepspeed"):
    return {"transformers": version, "case": case, "zero_stage": zero_stage, "resume": resume, "subject": subject,
            "status": "fail", "detail": detail, "findings": []}


# --- the registry and the labelling of records (no processes) ---------------------------------

def test_every_finding_names_an_existing_test_and_failures_are_classified_by_signature():
    import sys

    module = sys.modules[__name__]
    for finding in findings.FINDINGS:
        if finding.subject == "torchtitan":  # reproduced in tests/test_titan.py (needs torchtitan)
            continue
        assert finding.reproduced_by.startswith(findings.TEST), finding.id
        assert hasattr(module, finding.reproduced_by.split("::")[1]), finding.reproduced_by
    ds1 = "Traceback ...\nTypeError: _CanRecordRegistry.get() takes 2 positional arguments but 3 were given"
    assert classify(_record("mixtral", ds1, "5.24.0")).id == "DS-1"
    assert classify(_record("mixtral", ds1, "5.22.2")) is None  # outside the finding's versions
    ds2 = "Traceback ...\nAttributeError: 'int' object has no attribute 'to'"
    assert classify(_record("qwen3_moe", ds2, "5.0.0")).id == "DS-2"
    assert classify(_record("deepseek_v2", "per-step loss: max|diff| 0.3", "5.24.0")).id == "DS-3"
    assert classify(_record("deepseek_v2-greedy-n_group1", "per-step loss: max|diff| 0.3")) is None
    assert classify(_record("mixtral", "param x: max|diff| 2e-4", zero_stage=3, resume="w2-ep1")).id == "DS-4"
    assert classify(_record("mixtral", "Traceback ...\nRuntimeError: something else", "5.24.0")) is None


def test_label_leaves_autoep_records_alone_and_marks_unclassified_peer_failures():
    class Cell:
        zero_stage, resume = 2, None

    autoep_record = _record("mixtral", "Traceback\nTypeError: x", subject="autoep")
    assert label(autoep_record, Cell, SUBJECTS["autoep"]) == {}
    unknown = label(_record("deepseek_v3", "Traceback\nRuntimeError: new"), Cell, DEEPSPEED)
    assert unknown["finding"] is None and unknown["findings"] == ["unclassified peer failure"]
    known = label(_record("deepseek_v2", "per-step loss: max|diff| 0.3"), Cell, DEEPSPEED)
    assert known["finding"] == "DS-3" and known["findings"][0].startswith("DS-3 (peer failure)")


# --- DS-0 and the documented optimizer routes ---------------------------------------------------

def test_ds0_plain_client_optimizer_is_refused_and_split_groups_train_right():
    """DeepSpeed's documented refusal of a plain client optimizer at ZeRO-2 is the labelled
    rejection cell; the same cell with DeepSpeed's split MoE groups (a callable, called after its
    AutoEP replaced the layers) trains like the reference."""
    _needs_peer()
    [record] = rejection_records(transformers.__version__, "deepspeed")
    assert record["status"] == "rejected_as_expected", record["detail"]
    assert record["finding"] == "DS-0" and "None of the param groups are marked as MoE" in record["detail"]
    setup = TrainingSetup(2, 2, optimizer_route="moe_groups_callable")
    failures = _failures(compare_training(CASES_BY_ID["deepseek_v3"], DEEPSPEED, torch.float32, setup, 2))
    assert not failures, failures


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_peer_trains_right_with_its_documented_config_optimizer(stage):
    """Before the subject chose its route, every ZeRO-1/2 cell of the peer failed with DS-0's
    assert (the harness's plain client optimizer), not on DeepSpeed."""
    _needs_peer()
    failures = _failures(compare_training(CASES_BY_ID["deepseek_v3"], DEEPSPEED, torch.float32,
                                          TrainingSetup(stage, 2), 2))
    assert not failures, failures


# --- DS-1 --------------------------------------------------------------------------------------

@pytest.mark.skipif(TRANSFORMERS < Version("5.23"), reason="DS-1 needs Transformers >= 5.23 (its registry change)")
def test_ds1_recorder_registry_type_error_on_transformers_5_23_and_later():
    _needs_peer()
    finding = FINDINGS_BY_ID["DS-1"]
    outcomes = launch.run(2, engine_outcome_on_rank, "mixtral", "deepspeed", 2, 2)
    assert all(outcome and re.search(finding.signature, outcome) for outcome in outcomes), outcomes
    # The same engine of a family without an aux loss (no recorder) is built.
    assert launch.run(2, engine_outcome_on_rank, "deepseek_v3", "deepspeed", 2, 2) == [None, None]


# --- DS-2 and DS-5: the recorded router logits on Transformers 5.0-5.2 --------------------------

def forward_on_rank(case_id: str, subject_name: str, zero_stage: int, autoep_size: int, ids: torch.Tensor) -> dict:
    """Rank side: the subject's engine's forward on ``ids`` (labels = ids): logits and aux loss,
    or the error; plus the group settings of DeepSpeed's routers."""
    import traceback

    with process_globals_restored():
        try:
            engine = build_engine(case_id, subject_name, "float32", 0, TrainingSetup(zero_stage, autoep_size))
            with torch.no_grad():
                out = engine(input_ids=ids, labels=ids)
        except Exception as error:
            return {"error": "".join(traceback.format_exception_only(error)).strip()}
        routers = [m for name, m in engine.module.named_modules() if name.endswith(".router")
                   and hasattr(m, "num_expert_groups")]
        aux = getattr(out, "aux_loss", None)
        return {"logits": out.logits.detach().clone(), "aux_loss": None if aux is None else float(aux),
                "groups": [(r.num_expert_groups, r.num_limited_groups) for r in routers]}


def _ids(case_id: str, seed: int = 5) -> torch.Tensor:
    vocab = CASES_BY_ID[case_id].build().config.vocab_size
    return torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(seed))


def _stock(case_id: str, ids: torch.Tensor):
    with torch.no_grad():
        return CASES_BY_ID[case_id].build(seed=0)(input_ids=ids, labels=ids)


@pytest.mark.skipif(not Version("5.0") <= TRANSFORMERS < Version("5.1"), reason="DS-2 is on Transformers 5.0.x")
def test_ds2_no_router_logits_recorded_on_transformers_5_0():
    _needs_peer()
    ids = _ids("mixtral")
    outcomes = launch.run(2, forward_on_rank, "mixtral", "deepspeed", 1, 2, ids)
    signature = FINDINGS_BY_ID["DS-2"].signature
    assert all(re.search(signature, outcome.get("error", "")) for outcome in outcomes), outcomes


@pytest.mark.skipif(not Version("5.1") <= TRANSFORMERS < Version("5.3"),
                    reason="DS-5 is on Transformers 5.0-5.2 (on 5.0 DS-2 fails first)")
def test_ds5_aux_loss_input_differs_on_transformers_5_0_to_5_2():
    """Logits match the stock model, the aux loss does not (raw logits vs probabilities); with the
    aux coefficient 0 the training cell matches the reference."""
    _needs_peer()
    ids = _ids("mixtral")
    got = launch.run(2, forward_on_rank, "mixtral", "deepspeed", 1, 2, ids)[0]
    assert "error" not in got, got
    want = _stock("mixtral", ids)
    tol = tolerance(torch.float32, "multi")
    assert torch.allclose(got["logits"], want.logits, rtol=tol.rtol, atol=tol.atol)
    assert abs(got["aux_loss"] - float(want.aux_loss)) > 1e-3, (got["aux_loss"], float(want.aux_loss))
    setup = TrainingSetup(2, 2, steps=1, aux_loss_coef=0.0)
    failures = _failures(compare_training(CASES_BY_ID["mixtral"], DEEPSPEED, torch.float32, setup, 2))
    assert not failures, failures


# --- DS-3: deepseek_v2 greedy routing with groups -----------------------------------------------

def test_ds3_deepseek_v2_greedy_routes_group_limited_when_n_group_above_1():
    """DeepSpeed's routers carry the config's n_group/topk_group although topk_method is greedy:
    logits far from the stock model's; with n_group=1 (as DeepSeek-V2-Lite) they match."""
    _needs_peer()
    tol = tolerance(torch.float32, "multi")
    for case_id, groups, matches in (("deepseek_v2", (2, 1), False), ("deepseek_v2-greedy-n_group1", (1, 1), True)):
        assert CASES_BY_ID[case_id].kwargs["topk_method"] == "greedy"
        ids = _ids(case_id)
        got = launch.run(2, forward_on_rank, case_id, "deepspeed", 1, 2, ids)[0]
        assert "error" not in got, got
        assert got["groups"] and set(got["groups"]) == {groups}, got["groups"]
        diff = float((got["logits"] - _stock(case_id, ids).logits).abs().max())
        if matches:
            assert diff <= tol.atol, f"{case_id}: logits off by {diff:.3g}"
        else:
            assert diff > 0.05, f"{case_id}: logits off by only {diff:.3g}: DS-3 no longer reproduces"


# --- DS-7: Qwen3.5's router_logits slot holds probabilities under DeepSpeed ---------------------

def test_ds7_qwen3_5_records_probabilities_where_transformers_records_logits():
    """DeepSpeed's Qwen3.5 adapter keeps the 'post_score' capture mode (softmax probabilities)
    while Transformers' recorder takes the router's output 0, the raw logits. Where the engine
    can be built (5.3-5.22): logits match the stock model, the aux loss is exactly the stock
    load_balancing_loss_func of the softmaxed logits, and with the aux coefficient 0 the
    training cell matches the reference."""
    _needs_peer()
    from deepspeed.module_inject.auto_ep_presets.base import ForwardContract
    from deepspeed.module_inject.auto_ep_presets.qwen3_5_moe import Qwen35MoePresetAdapter
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as qwen3_5

    assert Qwen35MoePresetAdapter().adjust_forward_contract(ForwardContract()).router_logits_capture_mode \
        == "post_score"
    stock = CASES_BY_ID["qwen3_5_moe"].build(seed=0)
    if TRANSFORMERS < Version("5.3"):
        pytest.skip("Transformers 5.0-5.2 record probabilities too: DeepSpeed agrees there")
    recorders = [(getattr(module, "_can_record_outputs", None) or {}).get("router_logits")
                 for module in stock.modules()]
    recorder = next(r for r in recorders if r is not None)
    assert recorder.target_class is qwen3_5.Qwen3_5MoeTopKRouter and recorder.index == 0
    router = next(m for m in stock.modules() if isinstance(m, qwen3_5.Qwen3_5MoeTopKRouter))
    hidden = torch.randn(5, stock.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # output 0 is the raw gate projection, not probabilities
        assert torch.equal(router(hidden)[0], torch.nn.functional.linear(hidden, router.weight))
    if TRANSFORMERS >= Version("5.23"):
        pytest.skip("on Transformers >= 5.23 DeepSpeed's engine is not built (DS-1)")
    ids = _ids("qwen3_5_moe")
    got = launch.run(2, forward_on_rank, "qwen3_5_moe", "deepspeed", 1, 2, ids)[0]
    assert "error" not in got, got
    with torch.no_grad():
        want = stock(input_ids=ids, labels=ids, output_router_logits=True)
    tol = tolerance(torch.float32, "multi")
    assert torch.allclose(got["logits"], want.logits, rtol=tol.rtol, atol=tol.atol)
    text = stock.config.get_text_config()
    as_deepspeed = qwen3_5.load_balancing_loss_func(tuple(torch.softmax(l, dim=-1) for l in want.router_logits),
                                                    text.num_experts, text.num_experts_per_tok)
    assert abs(got["aux_loss"] - float(want.aux_loss)) > 1e-3, (got["aux_loss"], float(want.aux_loss))
    assert abs(got["aux_loss"] - float(as_deepspeed)) <= 1e-5, (got["aux_loss"], float(as_deepspeed))
    setup = TrainingSetup(2, 2, steps=1, aux_loss_coef=0.0)
    failures = _failures(compare_training(CASES_BY_ID["qwen3_5_moe"], DEEPSPEED, torch.float32, setup, 2))
    assert not failures, failures


def test_ds7_labels_a_qwen3_5_cell_only_if_it_passes_without_the_aux_loss(monkeypatch):
    """A DS-7 label stands on a rerun with the aux coefficient 0 that passes; a rerun that still
    fails leaves the cell unclassified (the aux loss does not explain all of it)."""
    class Cell:
        zero_stage, resume, case, world_size, autoep_size = 2, None, "qwen3_5_moe", 4, 2

    record = _record("qwen3_5_moe", "per-step loss: max|diff|=0.0151 (OUT OF TOLERANCE)", "5.22.2")
    assert classify(record).id == "DS-7"
    assert classify(_record("qwen3_5_moe", record["detail"], "5.2.0")) is None
    for rerun, finding in (({"status": "pass", "detail": ""}, "DS-7"),
                           ({"status": "fail", "detail": "param x: max|diff|=1 (OUT OF TOLERANCE)"}, None)):
        monkeypatch.setattr(findings, "_judged_without_aux_loss",
                            lambda record, cell, subject, found, rerun=rerun: {**rerun, "findings": ["x"]})
        labelled = label(dict(record), Cell, DEEPSPEED)
        assert labelled["finding"] == finding, labelled
        assert ("passes" in labelled["findings"][-1]) == (finding is not None), labelled


# --- DS-4: ZeRO-3 Universal load shares one step tensor -----------------------------------------

def save_on_rank(folder: str) -> None:
    setup = TrainingSetup(3, 2, steps=1)
    with process_globals_restored():
        engine = build_engine("deepseek_v3", "deepspeed", "float32", 0, setup)
        batches = torch.randint(0, 96, (1, 2, 8), generator=torch.Generator().manual_seed(1))
        train_steps(engine, batches, [0], setup)
        engine.save_checkpoint(os.path.dirname(folder), tag=os.path.basename(folder))


def step_tensors_after_universal_load_on_rank(folder: str) -> dict:
    """Rank side: load the Universal folder at ZeRO-3, report whether the optimizer's sub-groups
    share one 'step' tensor, and the step counts after one more engine step."""
    setup = TrainingSetup(3, 2, steps=2)
    with process_globals_restored():
        engine = build_engine("deepseek_v3", "deepspeed", "float32", 1, setup, load_universal=True)
        engine.load_checkpoint(os.path.dirname(folder), tag=os.path.basename(folder))
        zero, base = engine.optimizer, engine.optimizer.optimizer
        steps = [base.state[flat]["step"] for flat in zero.fp32_partitioned_groups_flat]
        loaded = [float(step) for step in steps]
        shared = all(step is steps[0] for step in steps)
        batches = torch.randint(0, 96, (2, 2, 8), generator=torch.Generator().manual_seed(1))
        train_steps(engine, batches, [1], setup)
        after = [float(base.state[flat]["step"]) for flat in zero.fp32_partitioned_groups_flat]
        return {"sub_groups": len(steps), "shared": shared, "loaded": loaded, "after": after}


def test_ds4_zero3_universal_load_shares_one_step_tensor_between_sub_groups(tmp_path):
    _needs_peer()
    saved, universal = str(tmp_path / "saved"), str(tmp_path / "universal")
    launch.run(2, save_on_rank, saved)
    DEEPSPEED.to_universal(saved, universal)
    result = launch.run(2, step_tensors_after_universal_load_on_rank, universal)[0]
    assert result["sub_groups"] >= 2 and result["shared"], result
    assert result["loaded"] == [1.0] * result["sub_groups"], result
    # One engine step, but each sub-group's AdamW step incremented the one shared tensor.
    assert result["after"] == [1.0 + result["sub_groups"]] * result["sub_groups"], result


# --- DS-6: ZeRO-0 clips by the mean of the ranks' local gradient norms --------------------------

def zero0_clipping_on_rank(autoep_size: int, batches: torch.Tensor, clip_by: str) -> dict:
    """Rank side: DeepSpeed's AutoEP at ZeRO-0 (float32) trains ``batches``; the engine's clipping
    (``clip_fp32_gradients``) is wrapped to record, at each step, this rank's local gradient norm,
    DeepSpeed's norm (``runtime.utils.clip_grad_norm_``, the engine's own call) and the global norm
    of the same gradients (replicated ones once, each expert once). ``clip_by``: "deepspeed" (the
    engine's own clipping) or "global" (the same gradients clipped by the global norm)."""
    import torch.distributed as dist
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.runtime.utils import clip_grad_norm_
    from deepspeed.utils import groups

    from conformance.training import GRADIENT_CLIPPING

    setup = TrainingSetup(0, autoep_size)
    norms = {"local": [], "deepspeed": [], "global": []}
    with process_globals_restored():
        engine = build_engine("deepseek_v3", "deepspeed", "float32", 0, setup)
        assert engine.gradient_clipping() == GRADIENT_CLIPPING

        def clip_fp32_gradients():
            params = [p for p in engine.module.parameters() if p.grad is not None]
            dense = sum(float(p.grad.double().pow(2).sum()) for p in params if not is_moe_param(p))
            experts = torch.zeros((), dtype=torch.float64)
            for p in params:
                if is_moe_param(p):
                    experts += p.grad.double().pow(2).sum()
            local = (dense + float(experts)) ** 0.5
            names = {p.group_name for p in params if is_moe_param(p)}
            assert len(names) == 1, names
            dist.all_reduce(experts, group=groups._get_expert_parallel_group(names.pop()))
            norm = (dense + float(experts)) ** 0.5
            if clip_by == "deepspeed":  # engine.clip_fp32_gradients' own call
                ds_norm = clip_grad_norm_(parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(),
                                          mpu=engine.mpu)
            else:
                ds_norm = clip_grad_norm_(parameters=params, max_norm=float("inf"))  # the norm only (coef 1)
                coefficient = GRADIENT_CLIPPING / (norm + 1e-6)  # DeepSpeed's formula, by the global norm
                if coefficient < 1.0:
                    for p in params:
                        p.grad.mul_(coefficient)
            norms["local"].append(local)
            norms["deepspeed"].append(float(ds_norm))
            norms["global"].append(norm)

        engine.clip_fp32_gradients = clip_fp32_gradients
        losses = train_steps(engine, batches, range(setup.steps), setup)
        return {"norms": norms, "losses": losses, "params": DEEPSPEED.full_parameters(engine),
                "expert_shards": DEEPSPEED.expert_shards(engine.module)}


def test_ds6_zero0_clips_by_the_mean_of_local_norms_under_expert_parallelism():
    """The unclassified cell deepseek_v3 ZeRO-0 w4-ep4: DeepSpeed's ZeRO-0 fp32 clipping averages
    each rank's local gradient norm over the ranks, and each rank's gradient holds only its own
    experts, so the norm is too small, every gradient is clipped too little, and all parameters
    drift from the reference. The gradients themselves are right: their global norm is the
    reference's, and clipped by it the same engine trains like the reference."""
    _needs_peer()
    from conformance.training import GRADIENT_CLIPPING, assemble, global_batches, micro_batch, reference_training
    from conformance.tolerances import compare

    case, world, setup = CASES_BY_ID["deepseek_v3"], 4, TrainingSetup(0, 4)
    batches = global_batches(case.build(seed=0).config.get_text_config().vocab_size, world, setup)
    model = case.build(seed=0).train()  # the reference's first gradient and its norm
    for rank in range(world):
        ids = micro_batch(batches, 0, 0, rank, world, setup)
        (model(input_ids=ids, labels=ids).loss / world).backward()
    reference_norm = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
    assert reference_norm > GRADIENT_CLIPPING  # clipping is active, so its norm scales every update
    reference = reference_training(case, torch.float32, 0, setup, world, batches)
    tol = tolerance(torch.float32, "multi")

    runs = {clip_by: launch.run(world, zero0_clipping_on_rank, 4, batches, clip_by) for clip_by in ("deepspeed",
                                                                                                     "global")}
    for clip_by, results in runs.items():
        norms = [result["norms"] for result in results]
        assert all(len(n["deepspeed"]) == setup.steps for n in norms), "the engine did not clip via clip_fp32_gradients"
        local_norms = [n["local"][0] for n in norms]  # step 1
        deepspeed_norm, global_norm = norms[0]["deepspeed"][0], norms[0]["global"][0]
        assert len(set(local_norms)) == world, local_norms  # each rank's gradient holds other experts
        # The mechanism: DeepSpeed's norm is the mean of the local norms, ~1.7% below the global norm.
        assert compare("mean of local norms", torch.tensor(deepspeed_norm), torch.tensor(sum(local_norms) / world),
                       tol).ok, (deepspeed_norm, local_norms)
        assert compare("global norm", torch.tensor(global_norm), torch.tensor(reference_norm), tol).ok, \
            (global_norm, reference_norm)
        assert (reference_norm - deepspeed_norm) / reference_norm > 0.01, (deepspeed_norm, reference_norm)
        params = assemble(results)
        checks = [compare(f"param {name}", params[name], value, tol) for name, value in reference["params"].items()]
        failures = _failures(checks)
        worst = max(check.max_abs_diff for check in checks)
        if clip_by == "deepspeed":  # the cell's failure, every kind of parameter
            assert failures and worst > 1e-5, (worst, failures)
        else:  # the same engine and gradients, clipped by the global norm: as AutoEP's (~6e-8)
            assert not failures and worst < 1e-6, (worst, failures)


def test_ds6_labels_only_zero0_expert_parallel_training_cells():
    detail = "param model.layers.0.self_attn.q_proj.weight: max|diff|=1.46e-05 (OUT OF TOLERANCE)"

    def record(**changes):
        return {**_record("deepseek_v3", detail, "5.24.0", zero_stage=0), "world_size": 4, "autoep_size": 4,
                "dtype": "float32", "interop": None, **changes}

    assert classify(record()).id == "DS-6"
    assert classify(record(autoep_size=2, world_size=2)).id == "DS-6"
    assert classify(record(autoep_size=1)) is None  # every rank holds every expert: its norm is right
    assert classify(record(zero_stage=1)) is None  # ZeRO-1/2/3 compute the global norm
    assert classify(record(resume="w2-ep1")) is None  # checkpoint cells: not measured
    assert classify(record(detail="Traceback ...\nRuntimeError: x")) is None  # something raised
    assert classify(record(subject="autoep")) is None


# --- DS-8: a re-save killed half-way loads as a mix of two saves ------------------------------

def test_ds8_a_resave_killed_half_way_loads_as_a_mix_with_or_without_autoep(tmp_path):
    """The killed-resave fault (conformance/faults.py) on DeepSpeed's AutoEP (DeepSeek-V3, ZeRO-2 w2 ep2)
    and on plain DeepSpeed without expert parallelism (Mixtral, dense experts): both loads succeed with
    every rank's weights from the re-save and rank 1's optimizer state from the first save."""
    from conformance.faults import killed_resave

    _needs_peer()
    runs = {"deepspeed": ("deepseek_v3", 2), "conformance.subjects:PLAIN_DEEPSPEED": ("mixtral", 1)}
    for subject, (case, autoep_size) in runs.items():
        result = killed_resave(case, 2, 2, autoep_size, str(tmp_path / subject.replace(":", "-")),
                               subject_name=subject)
        assert result["status"] == "fail" and "a mix of the two saves" in result["detail"], (subject, result)
        counts = re.search(r"rank 0: (\d+) of (\d+) live tensors, (\d+) of (\d+) optimizer tensors differ; "
                           r"rank 1: (\d+) of \d+ live tensors, (\d+) of \d+ optimizer", result["detail"])
        live0, live, optimizer0, optimizer, live1, optimizer1 = map(int, counts.groups())
        assert live0 == live and optimizer0 == optimizer, result  # rank 0: everything from the re-save
        assert live1 > 0 and optimizer1 == 0, result  # rank 1: the re-save's weights, the first save's optimizer
        record = {"subject": "deepspeed", "status": "fail", "fault": "killed-resave", "transformers": "5.25.0",
                  "case": case, "zero_stage": 2, "world_size": 2, "autoep_size": autoep_size, "dtype": "float32",
                  "resume": None, "interop": None, "detail": result["detail"]}
        assert classify(record).id == "DS-8"


# --- HF-1: ZAYA's skip-class balancing bias is reset by from_pretrained ------------------------

@pytest.mark.skipif(TRANSFORMERS < Version("5.24"), reason="ZAYA is in Transformers 5.24 and later")
def test_hf1_zaya_from_pretrained_resets_the_skip_class_balancing_bias(tmp_path):
    """save_pretrained writes every router's balancing_biases; from_pretrained (plain, and so also with a
    DistributedConfig) loads them and then sets the last entry back to -1.0: the rest is the saved value."""
    from conformance.equivalence import batch

    model = CASES_BY_ID["zaya"].build(seed=0, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, dtype=torch.float32,
                                         attn_implementation=model.config._attn_implementation)
    saved = {name: b for name, b in model.named_buffers() if name.endswith("balancing_biases")}
    assert saved, "the ZAYA case has no router balancing_biases"
    for name, value in saved.items():
        after = dict(loaded.named_buffers())[name]
        assert float(value[-1]) != -1.0, name  # the case's value, which the load should keep
        assert torch.equal(after[:-1], value[:-1]) and float(after[-1]) == -1.0, (name, value, after)
    others = {name: p for name, p in loaded.state_dict().items() if not name.endswith("balancing_biases")}
    assert all(torch.equal(p, model.state_dict()[name]) for name, p in others.items())
    ids = batch(model.config.vocab_size, 7)
    with torch.no_grad():
        apart = float((loaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max())
    assert apart > 0.1, apart  # a different routing, not rounding
    record = {"subject": "transformers_ep", "status": "fail", "transformers": transformers.__version__,
              "case": "zaya", "zero_stage": "none", "resume": None, "interop": None, "dtype": "float32",
              "detail": "subject~reference: logits: max|diff|=0.61 (OUT OF TOLERANCE)"}
    assert classify(record).id == "HF-1"


# --- HF-2: Transformers 5.22's EP divides expert gradients by the world size once too often -----

@pytest.mark.skipif(not Version("5.20") <= TRANSFORMERS < Version("5.23"),
                    reason="HF-2 is on Transformers 5.20-5.22 (5.23.0 and later compute the expert gradients right)")
@pytest.mark.parametrize("world,ep,expert_ratio", [(2, 2, 0.5), (4, 4, 0.25), (4, 2, 1.0)])
def test_hf2_expert_gradients_are_divided_by_the_world_size_once_too_often_at_ep_equal_world(world, ep, expert_ratio):
    """Transformers' EP against the single-process gradient of the same global batch: every dense gradient
    right; the expert gradients 1/W of it where every expert lives whole on one rank (ep == world), right at
    ep 2 of 4 ranks (each expert on two ranks, FSDP-sharded)."""
    from conformance.equivalence import batch
    from conformance.parallel import run_subject_on_ranks
    from conformance.runs import run_model

    subject = SUBJECTS["transformers_ep"]
    if (why := subject.unavailable_reason()) is not None:
        pytest.skip(why)
    case = CASES_BY_ID["mixtral"]
    stock = case.build(seed=0, dtype=torch.float32)
    ids = batch(stock.config.vocab_size, 7, shape=(world, 8))
    want = run_model(stock, ids, micro_batches=world)
    got = run_subject_on_ranks(case, subject, torch.float32, 0, case.block(), ids, world, ep)
    for name, grad in got.grads.items():
        ratio = float(grad.double().norm() / want.grads[name].double().norm())
        expected = expert_ratio if ".experts." in name else 1.0
        assert abs(ratio - expected) < 1e-4, (name, ratio, expected)
        assert torch.allclose(grad.double(), expected * want.grads[name].double(), rtol=1e-4, atol=1e-6), name
    if expert_ratio != 1.0:
        record = {"subject": "transformers_ep", "status": "fail", "transformers": transformers.__version__,
                  "case": "mixtral", "zero_stage": "none", "resume": None, "interop": None, "dtype": "float32",
                  "world_size": world, "autoep_size": ep,
                  "detail": "subject~reference: grad model.layers.0.mlp.experts.down_proj: max|diff|=0.0774 (OUT OF "
                            "TOLERANCE)"}
        assert classify(record).id == "HF-2"
