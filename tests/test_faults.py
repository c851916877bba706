"""Faults across ranks and time: a save stopped half-way never loads (as a mix or at all), a failure
of any kind on one rank becomes the same error on every rank (no rank waits), routing is read from
the modules that run, crafted or damaged records give one line naming the file and field, bounded
work, applied models pickle, symbolic links and wrappers are refused."""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import shutil

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch

import autoep
from autoep import checkpoint as ckpt
from autoep import launch
from autoep.checkpoint import TOPOLOGY_FILE, AutoEPCheckpointError
from autoep.cli import main as cli_main
from matrix.models import CASES_BY_ID
from conformance.training import TrainingSetup, build_engine, global_batches, process_globals_restored, train_steps

pytestmark = pytest.mark.xdist_group("ranks")

VOCAB, WORLD, TIMEOUT_S = 96, 2, 180
Z2 = TrainingSetup(2, 2)


# ---- rank side ---------------------------------------------------------------------------------

def _engine(seed: int = 0):
    engine = build_engine("mixtral", "autoep", "float32", seed, Z2)
    train_steps(engine, global_batches(VOCAB, WORLD, Z2), range(1), Z2)
    return engine


def save_then_die_resaving(folder: str) -> None:
    """A complete save, one more step, then a re-save into the same tag that rank 1 does not survive
    (it dies once DeepSpeed's part of the save began; rank 0 is killed by the launcher)."""
    import torch.distributed as dist
    from deepspeed.runtime.engine import DeepSpeedEngine

    with process_globals_restored():
        engine = _engine()
        engine.save_checkpoint(folder, tag="step")
        train_steps(engine, global_batches(VOCAB, WORLD, Z2, seed=5), range(1), Z2)
        original = DeepSpeedEngine.save_checkpoint

        def dying(self, *args, **kwargs):
            if dist.get_rank() == 1:
                os._exit(1)
            return original(self, *args, **kwargs)

        DeepSpeedEngine.save_checkpoint = dying
        try:
            engine.save_checkpoint(folder, tag="step")
        finally:
            DeepSpeedEngine.save_checkpoint = original


def load_outcome(folder: str, tag: str, fail_on_rank: int | None = None, failure: str = "") -> str:
    """Load ``tag``; rank ``fail_on_rank``'s file checks raise ``failure`` (an exception class name)."""
    import torch.distributed as dist

    with process_globals_restored():
        engine = build_engine("mixtral", "autoep", "float32", 1, Z2)
        check = ckpt.check_files
        if dist.get_rank() == fail_on_rank:
            def failing(*args, **kwargs):
                raise {"PermissionError": PermissionError, "KeyError": KeyError}[failure]("planted on this rank")
            ckpt.check_files = failing
        try:
            engine.load_checkpoint(folder, tag=tag)
            return "loaded"
        except AutoEPCheckpointError as error:
            return str(error)
        finally:
            ckpt.check_files = check


def save_outcome(folder: str, fail_on_rank: int) -> str:
    """Save, with rank ``fail_on_rank``'s expert file write raising OSError (a full disk)."""
    import torch.distributed as dist

    with process_globals_restored():
        engine = _engine()
        write = ckpt.write_experts
        if dist.get_rank() == fail_on_rank:
            def full_disk(*args, **kwargs):
                raise OSError(28, "No space left on device")
            ckpt.write_experts = full_disk
        try:
            engine.save_checkpoint(folder, tag="full")
            return "saved"
        except AutoEPCheckpointError as error:
            return str(error)
        finally:
            ckpt.write_experts = write


# ---- 1. a killed re-save -----------------------------------------------------------------------

def test_a_resave_killed_half_way_is_refused_by_every_load_conversion_and_export(tmp_path):
    folder = str(tmp_path)
    with pytest.raises(launch.RankError):
        launch.run(WORLD, save_then_die_resaving, folder, timeout=TIMEOUT_S)
    tag = os.path.join(folder, "step")
    assert json.load(open(os.path.join(tag, TOPOLOGY_FILE)))["state"] == "incomplete"
    outcomes = launch.run(WORLD, load_outcome, folder, "step", timeout=TIMEOUT_S)
    assert all("is an incomplete save" in outcome and "previous tag" in outcome for outcome in outcomes), outcomes
    with pytest.raises(AutoEPCheckpointError, match="is an incomplete save"):
        autoep.to_universal(tag, str(tmp_path / "universal"))
    assert cli_main(["export-hf", "--input_folder", tag, "--output_dir", str(tmp_path / "hf")]) == 2
    assert not os.path.exists(tmp_path / "universal") and not os.path.exists(tmp_path / "hf")


# ---- 2, 3. verdicts agreed whatever the exception ------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("saved"))

    launch.run(WORLD, save_outcome, folder, -1, timeout=TIMEOUT_S)
    return folder


@pytest.mark.parametrize("failure", ["PermissionError", "KeyError"])
def test_any_exception_in_one_ranks_checks_is_every_ranks_error(saved, failure):
    outcomes = launch.run(WORLD, load_outcome, saved, "full", 1, failure, timeout=TIMEOUT_S)
    assert outcomes[0] == outcomes[1] and f"{failure}: " in outcomes[0] and "planted on this rank" in outcomes[0]


def test_a_save_failing_on_one_rank_fails_on_every_rank_without_a_hang(tmp_path):
    outcomes = launch.run(WORLD, save_outcome, str(tmp_path), 1, timeout=TIMEOUT_S)
    assert outcomes[0] == outcomes[1] and "No space left on device" in outcomes[0] and "cannot be saved" in outcomes[0]
    assert json.load(open(tmp_path / "full" / TOPOLOGY_FILE))["state"] == "incomplete"
    assert not os.path.exists(tmp_path / "latest")


# ---- 4. routing read from the modules ------------------------------------------------------------

@pytest.mark.parametrize("case_id,field,value", [
    ("mixtral", "num_experts_per_tok", 3), ("qwen3_moe", "num_experts_per_tok", 1),
    ("deepseek_v3", "num_experts_per_tok", 3), ("granitemoe", "num_experts_per_tok", 1),
    ("qwen3_moe", "norm_topk_prob", False), ("deepseek_v3", "routed_scaling_factor", 2.0),
    ("deepseek_v3", "norm_topk_prob", False), ("qwen2_moe", "norm_topk_prob", True), ("mixtral", "num_experts_per_tok", 1),
])
def test_a_config_that_disagrees_with_the_blocks_is_never_computed_silently(case_id, field, value):
    model = CASES_BY_ID[case_id].build()
    stock = copy.deepcopy(model)
    setattr(model.config, field, value)
    with pytest.raises(autoep.DetectionError, match=f"={value!r}|gives {field}"):
        autoep.inspect(model, {"replacement": "block"})
    autoep.apply(model)  # auto: the experts level, whose block routes with its own value, as the stock one
    assert {spec.mode for spec in autoep.inspect(stock)} == {"block"}
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(input_ids=ids).logits, stock(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


# ---- 7, 8, 10, 12. records, bounds, links, foreign conversions -------------------------------------

def _copy_tag(saved: str, tmp_path) -> str:
    tag = str(tmp_path / "tag")
    shutil.copytree(os.path.join(saved, "full"), tag)
    return tag


def _edit_record(tag: str, edit) -> None:
    path = os.path.join(tag, TOPOLOGY_FILE)
    record = json.load(open(path))
    edit(record)
    json.dump(record, open(path, "w"))


@pytest.mark.parametrize("edit,field", [
    (lambda r: r["files"][next(iter(r["files"]))].pop("sha256"), "files"),
    (lambda r: r.update(files=list(r["files"])), "files"),
    (lambda r: r.update(dtype="float64"), "dtype"),
    (lambda r: r.update(world_size=3_000_000), "world_size"),
    (lambda r: r.update(world_size=300_000), "world_size"),
    (lambda r: r.update(rank_layout=[[0, 0]]), "rank_layout"),
    (lambda r: r.update(autoep_size="2"), "autoep_size"),
    (lambda r: r.update(layers=[]), "layers"),
], ids=["sha256-missing", "files-a-list", "dtype-float64", "world-3M", "world-300k", "rank-layout", "ep-a-string",
        "layers-a-list"])
def test_a_malformed_record_is_one_line_naming_the_file_and_field(saved, tmp_path, capsys, edit, field):
    tag = _copy_tag(saved, tmp_path)
    _edit_record(tag, edit)
    assert cli_main(["to-universal", "--input_folder", tag, "--output_folder", str(tmp_path / "u")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 1000 and TOPOLOGY_FILE in err and f"field {field!r}" in err, err


def test_a_model_file_of_the_wrong_shape_names_the_file(saved, tmp_path, capsys):
    tag = _copy_tag(saved, tmp_path)
    torch.save([1, 2, 3], os.path.join(tag, "mp_rank_00_model_states.pt"))
    _edit_record(tag, lambda r: r.update(files=None))  # (its checksum would catch the change first)
    assert cli_main(["export-hf", "--input_folder", tag, "--output_dir", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mp_rank_00_model_states.pt" in err, err


@pytest.mark.parametrize("content", [b"step\x00evil", b"\xff\xfe\xfd", b"x" * 5000], ids=["nul", "not-utf8", "huge"])
def test_a_latest_that_is_not_a_tag_name_is_refused(tmp_path, content):
    (tmp_path / "latest").write_bytes(content)
    with pytest.raises(AutoEPCheckpointError, match="latest"):
        ckpt.read_latest(str(tmp_path))


def test_a_temporary_with_an_impossible_pid_does_not_break_later_writes(tmp_path):
    final = tmp_path / "record.json"
    planted = tmp_path / f"record.json.tmp-{ckpt._HOST}-{2 ** 70}"
    planted.write_text("left by a crafted name")
    ckpt._atomic_write(str(final), lambda path: open(path, "w").write("{}"))
    assert final.read_text() == "{}" and not planted.exists()


def test_a_file_that_links_out_of_the_tag_is_refused(saved, tmp_path):
    tag = _copy_tag(saved, tmp_path)
    outside = tmp_path / "elsewhere.pt"
    shutil.move(os.path.join(tag, ckpt.expert_file(1)), outside)
    os.symlink(outside, os.path.join(tag, ckpt.expert_file(1)))
    problems = ckpt.check_files(tag, ckpt.read_topology(tag), [ckpt.expert_file(1)])
    assert problems and "outside the checkpoint folder" in problems[0] and "symbolic link" in problems[0]
    with pytest.raises(AutoEPCheckpointError, match="outside the checkpoint folder"):
        autoep.save_pretrained(tag, str(tmp_path / "hf"))


def universal_load_outcome(folder: str) -> str:
    with process_globals_restored():
        engine = build_engine("mixtral", "autoep", "float32", 1, Z2, load_universal=True)
        try:
            engine.load_checkpoint(os.path.dirname(folder), tag=os.path.basename(folder))
            return "loaded"
        except AutoEPCheckpointError as error:
            return str(error)


def test_a_universal_folder_not_made_by_autoep_names_the_converter_to_use(saved, tmp_path):
    universal = str(tmp_path / "universal")
    autoep.to_universal(os.path.join(saved, "full"), universal)
    os.remove(os.path.join(universal, TOPOLOGY_FILE))  # what DeepSpeed's ds_to_universal writes: no AutoEP record
    outcomes = launch.run(WORLD, universal_load_outcome, universal, timeout=TIMEOUT_S)
    assert outcomes[0] == outcomes[1] and "autoep to-universal" in outcomes[0] and "ds_to_universal" in outcomes[0]


# ---- 7, 9. wrappers, pickling ---------------------------------------------------------------------

def test_a_wrapped_model_is_refused_naming_the_wrapper_and_the_fix():
    model = CASES_BY_ID["mixtral"].build()
    wrapped = torch.nn.DataParallel(model)
    with pytest.raises(ValueError, match="DataParallel wrapper around MixtralForCausalLM.*bare model"):
        autoep.apply(wrapped)

    class DistributedDataParallel(torch.nn.Module):  # the class name is what is recognised (no process group here)
        def __init__(self, module):
            super().__init__()
            self.module = module

    with pytest.raises(ValueError, match="DDP averages every gradient.*autoep.reduce_gradients"):
        autoep.inspect(DistributedDataParallel(model))


@pytest.mark.parametrize("case_id", ["mixtral", "deepseek_v3", "gpt_oss", "mixtral@experts"])
def test_an_applied_model_pickles_and_loads_back_equal(case_id):
    case = CASES_BY_ID[case_id]
    model = autoep.apply(case.build(), case.block())
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    for copy_ in (torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(model))):
        assert [type(m).__name__ for m in copy_.modules()] == [type(m).__name__ for m in model.modules()]
        assert torch.equal(copy_(input_ids=ids).logits, model(input_ids=ids).logits)


def plain_save_load(folder: str) -> str:
    """ZeRO-2 save and load of the model built from plain modules (its config is not a Transformers
    config: nothing to record for export, and no rank may wait on one that failed writing it)."""
    setup = TrainingSetup(2, 2)
    with process_globals_restored():
        engine = build_engine("plain_mixtral", "autoep", "float32", 0, setup)
        train_steps(engine, global_batches(VOCAB, WORLD, setup), range(1), setup)
        engine.save_checkpoint(folder, tag="plain")
        fresh = build_engine("plain_mixtral", "autoep", "float32", 1, setup)
        path, _ = fresh.load_checkpoint(folder, tag="plain")
        return "loaded" if path is not None else "nothing loaded"


def test_a_model_whose_config_is_not_a_transformers_config_saves_and_loads(tmp_path):
    assert launch.run(WORLD, plain_save_load, str(tmp_path), timeout=TIMEOUT_S) == ["loaded", "loaded"]
    assert not os.path.exists(tmp_path / "plain" / ckpt.MODEL_CONFIG_FILE)


# ---- a fresh attack: DeepSpeed settings beside AutoEP -------------------------------------------

CONFLICTS = {
    "autotp": ({"tensor_parallel": {"autotp_size": 2}}, "tensor_parallel.autotp_size=2"),
    "mics": ({"zero_optimization": {"stage": 2, "mics_shard_size": 2}}, "zero_optimization.mics_shard_size=2"),
    "hpz": ({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}}, "zero_hpz_partition_size=2"),
    "qwz": ({"zero_optimization": {"stage": 3, "zero_quantized_weights": True}}, "zero_quantized_weights=True"),
    "qgz": ({"zero_optimization": {"stage": 3, "zero_quantized_gradients": True}}, "zero_quantized_gradients=True"),
    "offload-optimizer": ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
                          "offload_optimizer.device='cpu'"),
    "offload-param": ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}},
                      "offload_param.device='cpu'"),
    "pipeline": ({"pipeline": {"stages": 2}}, "pipeline.stages=2"),
    "fp16+bf16": ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "fp16.enabled=True.*bf16.enabled is true"),
    "fp16": ({"fp16": {"enabled": True}}, "fp16.enabled=True"),
    "sequence-parallel": ({"sequence_parallel_size": 2}, "sequence_parallel_size=2"),
    "grad-accum-dtype": ({"data_types": {"grad_accum_dtype": "bf16"}}, "data_types.grad_accum_dtype='bf16'"),
    "expert-tensor-parallel": ({"expert_parallel": {"enabled": True, "expert_tensor_parallel_size": 2}},
                               "expert_tensor_parallel_size=2"),
    "top-level-moe": ({"moe": {"enabled": True, "ep_size": 2}}, "moe=.*DeepSpeed has no top-level \"moe\" setting"),
}


@pytest.mark.parametrize("name", list(CONFLICTS))
def test_a_deepspeed_setting_autoep_cannot_run_is_refused_before_anything_changes(name):
    from autoep.config import AutoEPConfigError
    from matrix.model_case import ModelSnapshot

    edit, message = CONFLICTS[name]
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
              "expert_parallel": {"enabled": True, "autoep_size": 1}, **edit}
    model = CASES_BY_ID["mixtral"].build()
    snapshot = ModelSnapshot.of(model)
    with pytest.raises(AutoEPConfigError, match=message):
        autoep.initialize(model=model, config=config)
    assert snapshot.unchanged(model)


# ---- the conformance fault cell -------------------------------------------------------------------

def test_the_killed_resave_cell_passes_autoep_and_fails_a_save_that_is_not_a_transaction():
    """conformance/faults.py on Mixtral ZeRO-2 w2 ep2: AutoEP's load is refused on every rank; the
    mutant whose record says complete before the files are written loads a mix of the two saves."""
    from conformance.runner import run_cell
    from matrix.cells import Cell
    from matrix.profiles import NEWEST

    cell = Cell(NEWEST, "mixtral", 2, 2, 2, "float32", fault="killed-resave")
    record = run_cell(cell, "autoep")
    assert record["status"] == "pass" and "every rank refused the load" in record["detail"], record
    assert "incomplete save" in record["detail"], record
    mutated = run_cell(cell, "mutants.bank:save_not_a_transaction")
    assert mutated["status"] == "fail" and "a mix of the two saves" in mutated["detail"], mutated
