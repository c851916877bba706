"""autoep.initialize under DeepSpeed ZeRO 0-3: training-step equivalence with a single-process
PyTorch AdamW run of the original model, and every rejection (raised before anything changes)."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch
import torch.distributed as dist

import autoep
from autoep.config import AutoEPConfigError
from autoep.versions import UnsupportedTransformersError
from matrix.models import CASES_BY_ID, DEFAULT_CASES, ModelSnapshot
from conformance.subjects import SUBJECTS
from conformance.training import BF16_STEPS, TrainingSetup, compare_training
from autoep import launch
from autoep.versions import at_least

pytestmark = pytest.mark.xdist_group("ranks")

AUTOEP = SUBJECTS["autoep"]


def _check_training(case_id: str, setup: TrainingSetup, dtype=torch.float32):
    checks = compare_training(CASES_BY_ID[case_id], AUTOEP, dtype, setup)
    failures = [str(check) for check in checks if not check.ok]
    assert not failures, failures
    assert sum(c.what.startswith(("param ", "update ")) for c in checks) >= 20  # every parameter


@pytest.mark.parametrize("autoep_size", [1, 2, 4])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_training_equivalence_mixtral(stage, autoep_size):
    _check_training("mixtral", TrainingSetup(stage, autoep_size))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_training_equivalence_with_gradient_accumulation(stage):
    _check_training("mixtral", TrainingSetup(stage, 2, grad_accum=2))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_training_equivalence_with_optimizer_from_config(stage):
    _check_training("mixtral", TrainingSetup(stage, 2, client_optimizer=False))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("case_id", ["mixtral", "qwen3_moe"])
def test_training_equivalence_bf16(case_id, stage):
    # One step (BF16_STEPS explains why), bounded by 2x plain DeepSpeed's own bf16 error on the
    # original model (see compare_training).
    _check_training(case_id, TrainingSetup(stage, 2, steps=BF16_STEPS), torch.bfloat16)


def test_bf16_training_is_compared_over_one_step():
    with pytest.raises(ValueError, match="steps=3"):
        compare_training(CASES_BY_ID["mixtral"], AUTOEP, torch.bfloat16, TrainingSetup(2, 2))


def linear_is_torch_on_rank() -> bool:
    import torch.nn.functional as F

    return F.linear is torch._C._nn.linear


def test_a_zero3_run_leaves_the_shared_rank_processes_as_it_found_them():
    # DeepSpeed's ZeRO-3 engine swaps torch.nn.functional.linear for the rest of the process.
    from conformance.training import global_batches, train_on_rank

    setup = TrainingSetup(3, 2, steps=1)
    launch.run(4, train_on_rank, "mixtral", "autoep", "float32", 0, setup, global_batches(64, 4, setup))
    assert launch.run(4, linear_is_torch_on_rank) == [True] * 4


@pytest.mark.parametrize("case_id", ["mixtral", "deepseek_v3"])
def test_zero3_routers_and_experts_above_persistence_threshold(case_id):
    # stage3_param_persistence_threshold=1: routers and experts are partitioned and gathered.
    _check_training(case_id, TrainingSetup(3, 2, zero3_low_persistence=True))


OTHER_PRESETS = [c.id for c in DEFAULT_CASES if c.id != "mixtral" and at_least(c.min_transformers)]


@pytest.mark.parametrize("case_id", OTHER_PRESETS)
def test_training_equivalence_every_preset(case_id):
    _check_training(case_id, TrainingSetup(2, 2))
    _check_training(case_id, TrainingSetup(3, 4))


@pytest.mark.slow
@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize("autoep_size", [1, 2, 4])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("case_id", OTHER_PRESETS)
def test_training_equivalence_full_grid(case_id, stage, autoep_size, grad_accum):
    _check_training(case_id, TrainingSetup(stage, autoep_size, grad_accum=grad_accum))


# ----------------------------------------------------------------------------- rejections

BASE = {"train_micro_batch_size_per_gpu": 1, "expert_parallel": {"enabled": True, "autoep_size": 2}}


def _with(**sections):
    config = {**BASE, **{k: v for k, v in sections.items() if k != "expert_parallel"}}
    if "expert_parallel" in sections:
        config["expert_parallel"] = {**BASE["expert_parallel"], **sections["expert_parallel"]}
    return config


class TensorParallelMPU:
    def get_model_parallel_world_size(self):
        return 2


REJECTIONS = {
    "autotp": (_with(tensor_parallel={"autotp_size": 2}), None, r"tensor_parallel.autotp_size=2: .*AutoTP"),
    "mpu": (_with(), TensorParallelMPU(), r"mpu \(tensor model parallel world size\)=2"),
    "mics": (_with(zero_optimization={"stage": 3, "mics_shard_size": 2}), None,
             r"zero_optimization.mics_shard_size=2: .*MiCS"),
    "hpz": (_with(zero_optimization={"stage": 3, "zero_hpz_partition_size": 2}), None,
            r"zero_optimization.zero_hpz_partition_size=2: .*hpZeRO"),
    "sequence_parallel": (_with(zero_optimization={"stage": 3}, sequence_parallel_size=2), None,
                          r"sequence_parallel_size=2: .*sequence parallelism"),
    "quantized_gradients": (_with(zero_optimization={"stage": 3, "zero_quantized_gradients": True}), None,
                            r"zero_optimization.zero_quantized_gradients=True: .*quantized gradients"),
    "expert_tensor_parallel": (_with(expert_parallel={"expert_tensor_parallel_size": 2}), None,
                               r"expert_tensor_parallel_size"),
    "load_balance_coeff": (_with(expert_parallel={"load_balance_coeff": 0.001}), None, r"load_balance_coeff"),
    "autoep_size_vs_experts": (_with(expert_parallel={"autoep_size": 3}), None,
                               r"autoep_size=3 does not divide the 4 experts of 'model.layers.0.mlp'; valid sizes"),
    "unknown_key": (_with(expert_parallel={"autoep_sise": 2}), None, r"autoep_sise.*Did you mean 'autoep_size'"),
}


@pytest.mark.parametrize("name", sorted(REJECTIONS))
def test_rejection_before_anything_changes(name, mixtral):
    config, mpu, message = REJECTIONS[name]
    snapshot = ModelSnapshot.of(mixtral)
    with pytest.raises(ValueError, match=message):
        autoep.initialize(model=mixtral, config=config, mpu=mpu)
    assert snapshot.unchanged(mixtral)
    assert not dist.is_initialized()  # no process group was created


def test_rejects_a_preset_the_installed_transformers_cannot_run(mixtral, monkeypatch):
    import dataclasses

    from autoep.presets import PRESETS

    monkeypatch.setitem(PRESETS, "mixtral", dataclasses.replace(PRESETS["mixtral"], min_transformers="99.0.0"))
    snapshot = ModelSnapshot.of(mixtral)
    with pytest.raises(UnsupportedTransformersError, match=r"preset 'mixtral' needs transformers>=99.0.0"):
        autoep.initialize(model=mixtral, config=BASE)
    assert snapshot.unchanged(mixtral) and not dist.is_initialized()


def initialize_and_report_on_rank(config: dict) -> dict:
    """Rank side: autoep.initialize must fail; report the error, whether the model is unchanged
    and which expert-parallel groups the call created (the shared rank processes may hold
    groups from earlier runs)."""
    from deepspeed.utils import groups as ds_groups

    existing = set(ds_groups._get_expert_parallel_group_dict())
    model = CASES_BY_ID["mixtral"].build()
    snapshot = ModelSnapshot.of(model)
    try:
        autoep.initialize(model=model, config=config)
        error = None
    except Exception as caught:
        error = f"{type(caught).__name__}: {caught}"
    return {"error": error, "unchanged": snapshot.unchanged(model),
            "ep_groups": sorted(set(ds_groups._get_expert_parallel_group_dict()) - existing)}


def test_rejects_autoep_size_not_dividing_world_size():
    # 4 experts: autoep_size=4 divides them, but not a world of 2.
    for outcome in launch.run(2, initialize_and_report_on_rank, _with(expert_parallel={"autoep_size": 4})):
        assert outcome["error"].startswith("AutoEPConfigError: expert_parallel.autoep_size=4 does not divide the "
                                           "data-parallel world size 2")
        assert outcome["unchanged"] and outcome["ep_groups"] == []


def test_rejects_an_unknown_deepspeed_version(mixtral, monkeypatch):
    import deepspeed

    monkeypatch.setattr(deepspeed, "__version__", "0.20.0")
    with pytest.raises(autoep.engine.DeepSpeedVersionError, match=r"verified with deepspeed 0.19.8; the installed "
                                                                   r"version is 0.20.0"):
        autoep.initialize(model=mixtral, config=BASE)


def test_example_trains_and_the_loss_falls():
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "examples/train.py", "--steps", "4"], cwd=root, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [float(value) for value in re.findall(r"^step \d+: loss ([0-9.]+)$", result.stdout, re.MULTILINE)]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.1, result.stdout


def test_deepspeed_subject_adapter_maps_the_peer_back_to_transformers_names():
    """The peer subject (DeepSpeed's built-in AutoEP) on a cell where it trains right (DeepSeek-V3,
    ZeRO-3, autoep_size 2): its renamed, re-stacked parameters match the reference, so the
    adapter's mapping is right and the peer's failures elsewhere are the peer's."""
    checks = compare_training(CASES_BY_ID["deepseek_v3"], SUBJECTS["deepspeed"], torch.float32, TrainingSetup(3, 2))
    assert all(check.ok for check in checks), [str(c) for c in checks if not c.ok]
    assert any(c.what.endswith("experts.gate_up_proj") for c in checks)


def test_zero0_fp32_engine_reports_the_global_norm_it_clipped_with():
    # DeepSpeed's ZeRO-0 fp32 path records no norm (get_global_grad_norm() is None); ours records
    # the global norm it clips with, which must be the reference's total norm before clipping.
    from conformance.tolerances import assert_close, tolerance
    from conformance.training import global_batches, reference_training, train_on_rank

    case, world, setup = CASES_BY_ID["mixtral"], 2, TrainingSetup(0, 2, steps=2)
    batches = global_batches(case.build(seed=0).config.get_text_config().vocab_size, world, setup)
    results = launch.run(world, train_on_rank, case.id, "autoep", "float32", 0, setup, batches)
    reference = reference_training(case, torch.float32, 0, setup, world, batches)["grad_norms"]
    assert bool((reference > 1.0).all())  # clipping is active at every step
    reported = torch.tensor([result["clipping"]["reported"] for result in results], dtype=torch.float64)
    assert_close("engine.get_global_grad_norm()", reported, reference.expand(world, setup.steps),
                 tolerance(torch.float32, "multi"))
