"""Findings about peer subjects: one entry per class of peer failure, each with its cause, where
it applies, the signature that recognises it in a cell's record, and the test that reproduces it.

A peer's failing cell gets the id of the finding whose signature it carries (``label``); one that
matches none stays "fail (unclassified)". A semantic difference from the host Transformers is
labelled as such, and the rest of its cell is judged apart from it. The exit status of the suite
depends on the ``autoep`` subject only; none of this applies to it.
"""

from __future__ import annotations

import re
import traceback
from dataclasses import dataclass
from typing import Callable

from packaging.version import Version

from autoep import launch
from conformance.subjects import SUBJECTS
from conformance.tolerances import checks_record
from conformance.training import TrainingSetup, build_engine, compare_training, process_globals_restored
from matrix.cells import Cell, expected
from matrix.models import CASES_BY_ID

TEST = "tests/test_findings.py::"
TITAN_TEST = "tests/test_titan.py::"  # the TorchTitan findings run where torchtitan is installed (nox -s titan)


@dataclass(frozen=True)
class Finding:
    id: str
    kind: str  # "peer failure" | "semantic difference" | "documented rejection"
    subject: str
    cause: str  # one line
    affects: str  # Transformers versions and cases, in words
    applies: Callable[[dict], bool]  # on a cell record (transformers, case, zero_stage, resume, ...)
    signature: str | None  # regex searched in the failure detail (None: numeric, see ``applies``)
    reproduced_by: str
    # A peer failure confined to the aux loss: its training cells are run again with the aux
    # coefficient 0, and the label stands only if that run passes (else the cell is unclassified).
    judged_without_aux: bool = False

    def matches(self, record: dict) -> bool:
        if not self.applies(record):
            return False
        detail = record.get("detail", "")
        if self.signature is None:  # a numeric signature: values compared and found apart, nothing raised
            return "Traceback" not in detail
        return re.search(self.signature, detail) is not None

    def text(self) -> str:
        return f"{self.id} ({self.kind}): {self.cause} [{self.affects}; reproduced by {self.reproduced_by}]"


def _version(record: dict) -> Version:
    return Version(record["transformers"])


def _case_kwargs(record: dict) -> dict:
    case = CASES_BY_ID.get(record["case"])
    return case.kwargs if case is not None else {}


def _has_aux_loss(record: dict) -> bool:
    case = CASES_BY_ID.get(record["case"])
    return case is not None and case.has_aux_loss


def _greedy_with_groups(record: dict) -> bool:
    kwargs = _case_kwargs(record)
    return kwargs.get("topk_method") == "greedy" and (kwargs.get("n_group") or 1) > 1


def _titan_numeric(record: dict) -> bool:
    """A TorchTitan cell judged by numbers (not the interop cells that check names, TT-6/TT-7)."""
    return record["subject"] == "torchtitan" and record.get("interop") not in ("param_order", "hf_roundtrip")


def _zero0_expert_parallel_training(record: dict) -> bool:
    """A ZeRO-0 float32 training cell (not a checkpoint or interop cell) whose ranks hold
    different experts (DS-6: DeepSpeed's ZeRO-0 clipping norm; ZeRO-1/2/3 compute it right)."""
    return (str(record["zero_stage"]) == "0" and record.get("autoep_size", 1) > 1
            and record.get("dtype", "float32") == "float32" and record.get("resume") is None
            and record.get("fault") is None
            and record.get("interop") is None)


# The DeepSpeed presets that install DeepSpeed's router-logits recorder (MiniMax-M3's uses the
# same top-level recorder adapter as Mixtral's).
RECORDER_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "qwen3_5_moe", "minimax_m3_vl")

FINDINGS = [
    Finding("DS-0", "documented rejection", "deepspeed",
            "a plain client optimizer (one non-MoE parameter group, built before deepspeed.initialize) is refused "
            "by ZeRO-1/2: 'The model has moe layers, but None of the param groups are marked as MoE'; DeepSpeed "
            "documents the config \"optimizer\" block or split_params_into_different_moe_groups_for_optimizer",
            "every version and case, ZeRO-1/2",
            lambda r: str(r["zero_stage"]) in ("1", "2"),
            r"AssertionError: The model has moe layers, but None of the param groups are marked as MoE",
            TEST + "test_ds0_plain_client_optimizer_is_refused_and_split_groups_train_right"),
    Finding("DS-1", "peer failure", "deepspeed",
            "DeepSpeed's AutoEP installs its router-logits recorder with the pre-5.23 signature of Transformers' "
            "_CanRecordRegistry.get (two arguments); 5.23 added one, so building the engine raises TypeError",
            "Transformers >= 5.23; mixtral, qwen2_moe, qwen3_moe, qwen3_5_moe, minimax_m3 (the presets with a "
            "router-logits recorder)",
            lambda r: _version(r) >= Version("5.23") and r["case"].split("-")[0] in RECORDER_FAMILIES,
            r"TypeError: _CanRecordRegistry\.get\(\) takes 2 positional arguments but 3 were given",
            TEST + "test_ds1_recorder_registry_type_error_on_transformers_5_23_and_later"),
    Finding("DS-2", "peer failure", "deepspeed",
            "DeepSpeed's import of Transformers' output recorder fails silently on 5.0, so no router logits are "
            "recorded and load_balancing_loss_func returns the int 0: 'int' object has no attribute 'to'",
            "Transformers 5.0.x; the cases with an aux loss",
            lambda r: Version("5.0") <= _version(r) < Version("5.1") and _has_aux_loss(r),
            r"AttributeError: 'int' object has no attribute 'to'",
            TEST + "test_ds2_no_router_logits_recorded_on_transformers_5_0"),
    Finding("DS-3", "peer failure", "deepspeed",
            "DeepSpeed copies n_group/topk_group into its router and routes group-limited where Transformers' "
            "topk_method='greedy' ignores the groups (logits off by up to 1.35); n_group=1 matches",
            "every version; deepseek_v2 with topk_method='greedy' and n_group > 1 (the default deepseek_v2 case)",
            lambda r: r["case"].startswith("deepseek_v2") and _greedy_with_groups(r),
            None,
            TEST + "test_ds3_deepseek_v2_greedy_routes_group_limited_when_n_group_above_1"),
    Finding("DS-4", "peer failure", "deepspeed",
            "after a ZeRO-3 Universal load every optimizer sub-group holds the same 'step' tensor; torch AdamW "
            "increments it in place once per sub-group, so bias correction runs ahead and the parameters drift "
            "(~2e-4; unshared, 6e-8)",
            "every version and case; ZeRO-3 checkpoint (Universal resume) cells with a torch optimizer",
            lambda r: str(r["zero_stage"]) == "3" and bool(r.get("resume")),
            None,
            TEST + "test_ds4_zero3_universal_load_shares_one_step_tensor_between_sub_groups"),
    Finding("DS-5", "semantic difference", "deepspeed",
            "DeepSpeed records raw gate logits where Transformers 5.0-5.2 records softmax probabilities (and "
            "softmaxes again in load_balancing_loss_func): the aux loss differs (mixtral 2.0449 vs 2.0101) while "
            "logits match; the rest of the cell is judged with the aux coefficient 0",
            "Transformers 5.0-5.2 (5.0 is hidden by DS-2); the cases with an aux loss",
            lambda r: Version("5.0") <= _version(r) < Version("5.3") and _has_aux_loss(r),
            None,
            TEST + "test_ds5_aux_loss_input_differs_on_transformers_5_0_to_5_2"),
    Finding("DS-6", "peer failure", "deepspeed",
            "ZeRO-0 fp32 gradient clipping (engine.clip_fp32_gradients -> runtime.utils.clip_grad_norm_) uses the "
            "mean over ranks of each rank's local gradient norm, and under expert parallelism each rank holds only "
            "its own experts: the norm is too small (deepseek_v3 step 1: 4.1334 at ep4, 4.1579 at ep2, true "
            "4.2065), every gradient is clipped too little and all parameters drift (1.46e-5 at ep4, 9.6e-6 at "
            "ep2 after 3 steps); clipped by the global norm the same gradients match to 6e-8",
            "every version and case (DeepSpeed's code; measured on 5.24.0); ZeRO-0 float32 training cells with "
            "autoep_size > 1",
            _zero0_expert_parallel_training,
            None,
            TEST + "test_ds6_zero0_clips_by_the_mean_of_local_norms_under_expert_parallelism"),
    Finding("DS-7", "peer failure", "deepspeed",
            "DeepSpeed's Qwen3.5 preset adapter leaves router_logits_capture_mode at its default 'post_score', so "
            "its layer puts softmax probabilities in the router_logits slot where Transformers records the raw "
            "logits (Qwen3_5MoeTopKRouter output 0); load_balancing_loss_func softmaxes them again: the aux loss is "
            "wrong (2.0007 vs 2.0086, one process, seed 0) while logits match to 2e-6",
            "Transformers 5.3-5.22 (measured on 5.16.1, 5.20.2 and 5.22.2; 5.0-5.2 record probabilities, so "
            "DeepSpeed agrees there; on >= 5.23 DS-1 fails first); qwen3_5_moe cases",
            lambda r: Version("5.3") <= _version(r) < Version("5.23") and r["case"].startswith("qwen3_5_moe"),
            None,
            TEST + "test_ds7_qwen3_5_records_probabilities_where_transformers_records_logits",
            judged_without_aux=True),
    Finding("DS-8", "peer failure", "deepspeed",
            "DeepSpeed's engine writes a checkpoint tag's files in place and marks nothing complete: a re-save into "
            "an existing tag that one rank does not finish loads silently as a mix of the two saves (measured, "
            "ZeRO-2 w2 ep2, rank 1 killed at its first file: every rank's weights from the re-save, rank 1's "
            "optimizer state and its experts from the first save); plain DeepSpeed without expert parallelism does "
            "the same, so the cause is DeepSpeed's checkpointing, not its AutoEP",
            "every version and case where its engine builds (DeepSpeed's code; measured on 5.25.0, deepseek_v3); "
            "the killed-resave fault cells",
            lambda r: r.get("fault") == "killed-resave",
            r"a mix of the two saves",
            TEST + "test_ds8_a_resave_killed_half_way_loads_as_a_mix_with_or_without_autoep"),
    # TorchTitan 0.3.0's MoE replacement (conformance/titan.py), measured on Transformers 5.24.0.
    Finding("TT-1", "peer failure", "torchtitan",
            "TorchTitan's MoE swaps out the Transformers router module that the output recorder hooks, so no "
            "router logits are recorded; with output_router_logits the stock load_balancing_loss_func gets an "
            "empty tuple and the forward raises IndexError (no aux loss can be produced)",
            "Transformers 5.24.0 (observed); the cases with an aux loss (mixtral, qwen2_moe, qwen3_moe, qwen3_5_moe)",
            lambda r: r["subject"] == "torchtitan" and _has_aux_loss(r),
            r"in load_balancing_loss_func[\s\S]*IndexError: tuple index out of range",
            TITAN_TEST + "test_tt1_no_router_logits_recorded_so_the_aux_loss_raises"),
    Finding("TT-2", "peer failure", "torchtitan",
            "TorchTitan's converter renames gate.e_score_correction_bias to 'expert_bias' but its MoE buffer is "
            "'expert_bias_E': load_state_dict(strict=False) drops the correction bias silently (routing then "
            "uses a zero bias: deepseek_v3 logits off by 2.96); the subject refuses the model",
            "every version; deepseek_v3 cases (the presets with a correction bias)",
            lambda r: r["subject"] == "torchtitan" and r["case"].startswith("deepseek_v3"),
            r"TitanWeightsNotLoaded: .*unexpected \[[^\]]*\.expert_bias'",
            TITAN_TEST + "test_tt2_correction_bias_is_not_loaded_by_titans_converter"),
    Finding("TT-3", "peer failure", "torchtitan",
            "TorchTitan builds its router from n_group/topk_group and routes group-limited where Transformers' "
            "DeepSeek-V2 topk_method='greedy' ignores the groups (logits off by 1.09; n_group=1 matches up to TT-5)",
            "every version; deepseek_v2 with topk_method='greedy' and n_group > 1 (the default deepseek_v2 case)",
            lambda r: _titan_numeric(r) and r["case"].startswith("deepseek_v2") and _greedy_with_groups(r),
            None,
            TITAN_TEST + "test_tt3_and_tt4_deepseek_v2_routing_follows_deepseek_v3_group_rule"),
    Finding("TT-4", "peer failure", "torchtitan",
            "TorchTitan scores expert groups by the sum of each group's top-2 scores (DeepSeek-V3's rule) where "
            "DeepSeek-V2's topk_method='group_limited_greedy' takes each group's maximum (logits off by 1.36)",
            "every version; deepseek_v2 with topk_method='group_limited_greedy'",
            lambda r: _titan_numeric(r) and _case_kwargs(r).get("topk_method") == "group_limited_greedy",
            None,
            TITAN_TEST + "test_tt3_and_tt4_deepseek_v2_routing_follows_deepseek_v3_group_rule"),
    Finding("TT-5", "peer failure", "torchtitan",
            "GroupedExperts.forward casts tokens and expert weights to bf16 before torch._grouped_mm whatever the "
            "model dtype: a float32 model's MoE output carries bf16 rounding (logits off by 7e-3 to 6e-2 on the "
            "tiny cases, |logits| <= 7; with the cast removed they match to 3e-6)",
            "every version; float32 cells of every case the other TT findings leave running",
            lambda r: _titan_numeric(r) and r["dtype"] == "float32",
            None,
            TITAN_TEST + "test_tt5_float32_experts_run_in_bf16"),
    Finding("TT-6", "peer failure", "torchtitan",
            "TorchTitan's MoE renames and splits the block's parameters (router.gate.weight, "
            "routed_experts.inner_experts.w1_EFD/w3_EFD/w2_EDF, shared_experts.w1/w2/w3, buffer expert_bias_E): "
            "named_parameters/state_dict differ from the stock model and a stock optimizer state does not load "
            "(parameter group size differs)",
            "every version and case; interop param_order cells",
            lambda r: r["subject"] == "torchtitan" and r.get("interop") == "param_order",
            r"\(different names\)",
            TITAN_TEST + "test_tt6_and_tt7_titan_names_break_stock_optimizer_state_and_save_pretrained"),
    Finding("TT-7", "peer failure", "torchtitan",
            "save_pretrained of the replaced model writes TorchTitan's names; from_pretrained into the stock class "
            "leaves every expert and router weight at its fresh init (gate_up_proj off by ~0.7); TorchTitan's "
            "inverse converter titan_to_hf_moe_state_dict is not wired into save_pretrained",
            "every version and case; interop hf_roundtrip cells",
            lambda r: r["subject"] == "torchtitan" and r.get("interop") == "hf_roundtrip",
            r"model\.save_pretrained: weight \S+ vs the stock model",
            TITAN_TEST + "test_tt6_and_tt7_titan_names_break_stock_optimizer_state_and_save_pretrained"),
    # Transformers' own expert parallelism (conformance/transformers_ep.py), measured on Transformers 5.25.0.
    Finding("HF-1", "peer failure", "transformers_ep",
            "from_pretrained, the entry point of Transformers' EP, sets the skip-class entry of every ZAYA router's "
            "balancing_biases back to -1.0 after loading the checkpoint (ZayaPreTrainedModel._init_weights assigns "
            "balancing_biases[-1] unguarded, marked 'trf-ignore: TRF012'): a saved value there is lost and tokens "
            "route differently (the ZAYA case holds a small random value there: logits off by 0.61)",
            "Transformers 5.24.0 and later (ZAYA's first release); zaya cases (any export loaded with "
            "from_pretrained meets it, autoep's included)",
            lambda r: r["subject"] == "transformers_ep" and r["case"].startswith("zaya"),
            None,
            TEST + "test_hf1_zaya_from_pretrained_resets_the_skip_class_balancing_bias"),
    Finding("HF-2", "peer failure", "transformers_ep",
            "where ep_size equals fsdp_size * tp_size (every expert whole on one rank), the expert gradients come "
            "out divided by the world size once too often: 1/W of the global-batch gradient (0.5 at 2 ranks, "
            "0.25 at 4 ranks with ep 4; the dense gradients and ep 2 of 4 ranks are right; fixed in 5.23.0)",
            "Transformers 5.20.2 and 5.22.2 (observed; 5.23.0 and later right); plain-PyTorch EP cells with autoep_size == "
            "world size",
            lambda r: r["subject"] == "transformers_ep" and Version("5.20") <= _version(r) < Version("5.23")
            and r.get("world_size", 1) > 1 and r.get("autoep_size") == r.get("world_size"),
            r"grad \S+experts\.\S+: max\|diff\|",
            TEST + "test_hf2_expert_gradients_are_divided_by_the_world_size_once_too_often_at_ep_equal_world"),
]
FINDINGS_BY_ID = {finding.id: finding for finding in FINDINGS}


def classify(record: dict) -> Finding | None:
    """The peer-failure finding whose signature a failing record carries (DS-0 and DS-5 are
    matched where they are run, not here), or None."""
    for finding in FINDINGS:
        if finding.kind == "peer failure" and finding.subject == record["subject"] and finding.matches(record):
            return finding
    return None


def label(record: dict, cell, subject) -> dict:
    """Updates for a finished cell record of a peer subject: a failure gets its finding id (or
    ``finding: None``, "fail (unclassified)"); a cell with a semantic difference is judged again
    without it (aux coefficient 0) and labelled. Records of ``autoep`` are left as they are."""
    if not getattr(subject, "is_peer", False) or record.get("status") != "fail":
        return {}
    semantic = FINDINGS_BY_ID["DS-5"]
    finding = classify(record)
    if finding is None and semantic.subject == subject.name and semantic.matches(record):
        if cell.zero_stage != "none" and cell.resume is None:
            return _judged_without_aux_loss(record, cell, subject, semantic)
        finding = semantic  # a checkpoint cell: labelled, not run again without the aux loss
    if finding is not None and finding.judged_without_aux and cell.zero_stage != "none" and cell.resume is None:
        judged = _judged_without_aux_loss(record, cell, subject, finding)
        if judged["status"] == "pass":
            return {"finding": finding.id, "findings": record.get("findings", []) + [
                f"{finding.text()}; with the aux coefficient 0 the cell passes"]}
        return {"finding": None, "findings": record.get("findings", []) + [
            f"unclassified peer failure: {finding.id} would explain the aux loss, but with the aux coefficient 0 "
            f"the cell still fails: {judged.get('detail', '')[:300]}"]}
    if finding is None:
        return {"finding": None, "findings": record.get("findings", []) + ["unclassified peer failure"]}
    return {"finding": finding.id, "findings": record.get("findings", []) + [finding.text()]}


def _judged_without_aux_loss(record: dict, cell, subject, finding: Finding) -> dict:
    """The training cell again with router_aux_loss_coef 0: its status is the cell's; the first
    run's differences are the semantic difference's measurement."""
    import torch

    setup = TrainingSetup(int(cell.zero_stage), cell.autoep_size, aux_loss_coef=0.0)
    try:
        judged = checks_record(compare_training(CASES_BY_ID[cell.case], subject, torch.float32, setup,
                                                 cell.world_size))
    except Exception:
        judged = {"status": "fail", "detail": traceback.format_exc()[-1500:]}
    measured = f"with the aux coefficient 0.1: {record.get('detail', '')[:300]}"
    return {**judged, "semantic_difference": finding.id, "aux_loss_coef": 0.0,
            "findings": record.get("findings", []) + [f"{finding.text()}; measured {measured}"]}


# The labelled rejection cell of a peer: driven against its documentation, it must refuse.
REJECTION_CELLS = {"deepspeed": dict(finding="DS-0", case="deepseek_v3", zero_stage=2, world_size=2, autoep_size=2,
                                     optimizer_route="client")}


def rejection_records(transformers: str, subject_name: str, case_filter: str | None = None) -> list[dict]:
    """The subject's labelled rejection cell (none for ``autoep``): "rejected_as_expected" when
    the engine refuses with the finding's signature, else "fail"."""
    spec = REJECTION_CELLS.get(subject_name)
    if spec is None or (case_filter and case_filter not in spec["case"]):
        return []

    if expected(Cell(transformers, spec["case"], spec["zero_stage"], spec["world_size"], spec["autoep_size"],
                     "float32")).outcome != "pass":  # the case itself is refused on this version (4.x)
        return []
    import time

    finding = FINDINGS_BY_ID[spec["finding"]]
    record = {"cell": f"tf{transformers}/{spec['case']}/zero-{spec['zero_stage']}/w{spec['world_size']}-ep"
                      f"{spec['autoep_size']}/float32/optimizer-{spec['optimizer_route']}",
              "transformers": transformers, "case": spec["case"], "zero_stage": spec["zero_stage"],
              "world_size": spec["world_size"], "autoep_size": spec["autoep_size"], "dtype": "float32",
              "resume": None, "interop": None, "optimizer_route": spec["optimizer_route"], "subject": subject_name,
              "expected": "rejected", "reason": finding.cause, "finding": finding.id, "findings": [finding.text()]}
    started = time.perf_counter()
    if (why := SUBJECTS[subject_name].unavailable_reason()) is not None:
        record.update(status="skipped", reason=why)
        return [record]
    outcomes = launch.run(spec["world_size"], engine_outcome_on_rank, spec["case"], subject_name,
                          spec["zero_stage"], spec["autoep_size"], spec["optimizer_route"])
    refused = all(re.search(finding.signature, outcome or "") for outcome in outcomes)
    record.update(status="rejected_as_expected" if refused else "fail",
                  detail=(outcomes[0] or "the engine was built: no rejection")[-400:],
                  seconds=round(time.perf_counter() - started, 3))
    return [record]


def engine_outcome_on_rank(case_id: str, subject_name: str, zero_stage: int, autoep_size: int,
                           optimizer_route: str | None = None, aux_loss_coef: float | None = None) -> str | None:
    """Rank side: build the subject's engine; None if it was built, else the error as
    "Type: message" (with the last traceback lines)."""
    setup = TrainingSetup(zero_stage, autoep_size, optimizer_route=optimizer_route, aux_loss_coef=aux_loss_coef)
    with process_globals_restored():
        try:
            build_engine(case_id, subject_name, "float32", 0, setup)
        except Exception as error:
            return "".join(traceback.format_exception_only(error)).strip()
    return None


def table() -> str:
    """The findings as a Markdown table (for the report)."""
    lines = ["| id | kind | cause | affects | reproduced by |", "|---|---|---|---|---|"]
    for f in FINDINGS:
        lines.append(f"| {f.id} | {f.kind} | {f.cause} | {f.affects} | `{f.reproduced_by}` |")
    return "\n".join(lines)
