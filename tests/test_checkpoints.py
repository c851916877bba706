"""Checkpoints of engines from autoep.initialize: same-topology round trips are exact on every
rank (every EP rank's experts included), and a checkpoint that cannot be loaded here fails
before anything is loaded, naming the file or the topologies."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest

from autoep import launch
from autoep.checkpoint import AutoEPCheckpointError, expert_file
from conformance.checkpoints import LOAD_MODES, differences, engine_view, round_trip_on_rank
from conformance.training import TrainingSetup, build_engine, global_batches, process_globals_restored, train_steps

pytestmark = pytest.mark.xdist_group("ranks")

VOCAB = 96  # matrix.models.COMMON


@pytest.mark.parametrize("mode", list(LOAD_MODES))
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_same_topology_round_trip_is_exact(stage, mode, tmp_path):
    # World 4, autoep_size 2: ranks 1 and 3 hold experts that DeepSpeed's own model file lacks.
    setup = TrainingSetup(stage, 2, steps=3)
    found = launch.run(4, round_trip_on_rank, "mixtral", setup, "float32", str(tmp_path), mode,
                       global_batches(VOCAB, 4, setup))
    assert found == [[]] * 4, found
    assert os.path.isfile(tmp_path / "saved" / "autoep_topology.json")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_same_topology_round_trip_is_exact_in_bf16(stage, tmp_path):
    # bf16 live weights, fp32 master weights and moments (DeepSpeed's bf16 optimizers).
    setup = TrainingSetup(stage, 2, steps=3)
    found = launch.run(4, round_trip_on_rank, "mixtral", setup, "bfloat16", str(tmp_path), "full",
                       global_batches(VOCAB, 4, setup))
    assert found == [[]] * 4, found


def save_on_rank(setup: TrainingSetup, folder: str) -> None:
    with process_globals_restored():
        engine = build_engine("mixtral", "autoep", "float32", 0, setup)
        train_steps(engine, global_batches(VOCAB, 4, setup), range(1), setup)
        engine.save_checkpoint(folder, tag="saved")


def failed_load_on_rank(setup: TrainingSetup, folder: str, case_id: str = "mixtral",
                        tag: str = "saved") -> tuple[str, list[str]]:
    """(the error, what the failed load changed in this rank's engine). A tag other than
    "saved" is loaded as a Universal Checkpoint."""
    with process_globals_restored():
        engine = build_engine(case_id, "autoep", "float32", 1, setup, load_universal=tag != "saved")
        before = engine_view(engine)
        try:
            engine.load_checkpoint(folder, tag=tag)
        except AutoEPCheckpointError as error:
            return str(error), differences(engine_view(engine), before, ["live", "optimizer"])
        return "loaded", []


@pytest.fixture(scope="module")
def saved_w4_ep2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("w4-ep2")
    launch.run(4, save_on_rank, TrainingSetup(2, 2), str(folder))
    return folder


def _copy(folder, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def test_load_on_another_autoep_size_fails_naming_both_topologies(saved_w4_ep2):
    outcomes = launch.run(4, failed_load_on_rank, TrainingSetup(2, 4), str(saved_w4_ep2))
    for message, changed in outcomes:
        assert "autoep_size 2" in message and "autoep_size 4" in message, message
        assert "autoep to-universal" in message
        assert changed == []


def test_load_on_another_world_size_fails_naming_both_topologies(saved_w4_ep2):
    outcomes = launch.run(2, failed_load_on_rank, TrainingSetup(2, 2), str(saved_w4_ep2))
    for message, changed in outcomes:
        assert "world size 4" in message and "world size 2" in message, message
        assert changed == []


def test_a_checkpoint_of_another_preset_is_refused_by_regular_and_universal_loads(saved_w4_ep2, tmp_path):
    from autoep.universal import to_universal

    folder = _copy(saved_w4_ep2, tmp_path)
    to_universal(str(folder / "saved"), str(folder / "universal"))
    for tag in ("saved", "universal"):
        for message, changed in launch.run(4, failed_load_on_rank, TrainingSetup(2, 2), str(folder), "qwen3_moe",
                                           tag):
            assert "preset mixtral" in message and "preset qwen3_moe" in message, message
            assert "another model, preset or expert count" in message and changed == []


def test_a_missing_expert_shard_fails_on_every_rank_naming_the_file(saved_w4_ep2, tmp_path):
    folder = _copy(saved_w4_ep2, tmp_path)
    os.remove(folder / "saved" / expert_file(1))
    outcomes = launch.run(4, failed_load_on_rank, TrainingSetup(2, 2), str(folder))
    messages = [message for message, _ in outcomes]
    # Every rank checks every file before any loads: all raise the same error naming it.
    assert len(set(messages)) == 1 and expert_file(1) in messages[0] and "missing" in messages[0], messages
    assert all(changed == [] for _, changed in outcomes)


def test_a_truncated_expert_shard_fails_naming_the_file(saved_w4_ep2, tmp_path):
    folder = _copy(saved_w4_ep2, tmp_path)
    path = folder / "saved" / expert_file(0)
    path.write_bytes(path.read_bytes()[:100])
    outcomes = launch.run(4, failed_load_on_rank, TrainingSetup(2, 2), str(folder))
    for rank in range(4):
        assert expert_file(0) in outcomes[rank][0] and "truncated" in outcomes[rank][0], outcomes[rank][0]
    assert all(changed == [] for _, changed in outcomes)


def test_a_checkpoint_without_autoep_topology_is_refused(saved_w4_ep2, tmp_path):
    folder = _copy(saved_w4_ep2, tmp_path)
    os.remove(folder / "saved" / "autoep_topology.json")
    for message, changed in launch.run(4, failed_load_on_rank, TrainingSetup(2, 2), str(folder)):
        assert "autoep_topology.json is missing" in message and changed == []


RESUMES = [((4, 2), (2, 1)), ((2, 2), (4, 4)), ((4, 4), (4, 2))]


@pytest.mark.parametrize("source,target", RESUMES, ids=lambda t: f"w{t[0]}-ep{t[1]}")
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_universal_resume_on_another_topology_continues_the_same_training(stage, source, target, tmp_path):
    # 2 steps at source, autoep to-universal, 2 steps at target == 4 uninterrupted reference steps.
    from conformance.checkpoints import resume_elsewhere

    checks = resume_elsewhere("mixtral", stage, source, target, str(tmp_path))
    failures = [str(check) for check in checks if not check.ok]
    assert not failures, failures
    assert len(checks) > 20


def test_universal_load_slices_by_the_engines_own_ep_layout_not_a_larger_group_left_in_the_process(tmp_path):
    """DeepSpeed slices Universal expert tensors by the largest EP group registered in the process;
    an earlier engine at ep 2 (ours or DeepSpeed's own AutoEP) leaves one. Found by the bench's
    DeepSpeed peer test sharing rank processes with this file: the w4-ep2 -> w2-ep1 ZeRO-1 resume
    then took 4 of 8 experts and failed. The autoep engine now loads by its own layout."""
    from conformance.checkpoints import resume_elsewhere

    pool = launch.shared_pool(2)
    pool.run(_stale_expert_group, 2, True)
    try:
        checks = resume_elsewhere("mixtral", 1, (4, 2), (2, 1), str(tmp_path))
    finally:
        pool.run(_stale_expert_group, 2, False)
    failures = [str(check) for check in checks if not check.ok]
    assert not failures, failures


def _stale_expert_group(size: int, present: bool) -> None:
    """Register (or drop again) DeepSpeed's ``ep_size_<size>`` groups in this rank process, as an
    engine built earlier in the process would have left them."""
    import deepspeed
    from deepspeed.utils import groups

    deepspeed.init_distributed()  # DeepSpeed's comm over the rank's existing process group
    name = f"ep_size_{size}"
    registries = [groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS,
                  groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS]
    if present:
        assert name not in groups._get_expert_parallel_group_dict()
        groups._create_expert_and_data_parallel(size)
        assert groups._get_max_expert_size_name() == name
    else:
        for registry in registries:
            registry.pop(name, None)


@pytest.fixture(scope="module")
def saved_w4_ep2_zero3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("w4-ep2-z3")
    launch.run(4, save_on_rank, TrainingSetup(3, 2), str(folder))
    return folder


def _run_cli(*args):
    from autoep.cli import main

    return main(["to-universal", *args])


def test_to_universal_refuses_an_existing_output_folder(saved_w4_ep2, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert _run_cli("--input_folder", str(saved_w4_ep2 / "saved"), "--output_folder", str(tmp_path / "out")) == 2
    assert "already exists" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_to_universal_with_a_damaged_shard_names_it_and_writes_nothing(saved_w4_ep2_zero3, tmp_path, damage, capsys):
    folder = _copy(saved_w4_ep2_zero3, tmp_path)
    shard = folder / "saved" / "zero_pp_rank_3_mp_rank_00_optim_states.pt"
    before = sorted(os.listdir(folder / "saved"))
    if damage == "missing":
        os.remove(shard)
    else:
        shard.write_bytes(shard.read_bytes()[:1000])
    out = tmp_path / "universal"
    assert _run_cli("--input_folder", str(folder / "saved"), "--output_folder", str(out)) == 2
    assert "zero_pp_rank_3_mp_rank_00_optim_states.pt" in capsys.readouterr().err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith("universal")]
    assert sorted(os.listdir(folder / "saved")) == [p for p in before if damage != "missing" or
                                                     p != shard.name]


def test_to_universal_output_loads_and_the_input_is_unchanged(saved_w4_ep2_zero3, tmp_path, capsys):
    import hashlib

    def digest(folder):
        return {p: hashlib.sha256((folder / p).read_bytes()).hexdigest() for p in sorted(os.listdir(folder))}

    before = digest(saved_w4_ep2_zero3 / "saved")
    assert _run_cli("--input_folder", str(saved_w4_ep2_zero3 / "saved"), "--output_folder",
                    str(tmp_path / "universal")) == 0
    assert digest(saved_w4_ep2_zero3 / "saved") == before
    assert (tmp_path / "universal" / "zero" / "model.layers.0.mlp.experts.gate_up_proj" / "fp32.pt").is_file()


def test_to_universal_refuses_a_zero0_checkpoint(tmp_path, capsys):
    launch.run(4, save_on_rank, TrainingSetup(0, 2), str(tmp_path / "z0"))
    assert _run_cli("--input_folder", str(tmp_path / "z0" / "saved"), "--output_folder", str(tmp_path / "u")) == 2
    assert "ZeRO stage 0" in capsys.readouterr().err and not (tmp_path / "u").exists()


def export_on_rank(setup: TrainingSetup, folder: str, ids):
    """Train 2 steps, save a DeepSpeed checkpoint and a live Hugging Face export; return this
    rank's parameters (local expert slices), their placement and the engine's logits on ``ids``."""
    import autoep
    from conformance.subjects import SUBJECTS

    with process_globals_restored():
        engine = build_engine("mixtral", "autoep", "float32", 0, setup)
        train_steps(engine, global_batches(VOCAB, 4, setup), range(2), setup)
        engine.save_checkpoint(folder, tag="saved")
        autoep.save_pretrained(engine, os.path.join(folder, "hf_live"))
        engine.module.eval()
        logits = engine.module(input_ids=ids).logits.detach()
        subject = SUBJECTS["autoep"]
        return {"params": subject.full_parameters(engine), "expert_shards": subject.expert_shards(engine.module),
                "logits": logits}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_hugging_face_export_loads_into_the_original_class(stage, tmp_path):
    import torch
    from safetensors.torch import load_file

    import autoep
    from matrix.models import CASES_BY_ID
    from conformance.tolerances import assert_close, tolerance
    from conformance.training import assemble

    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))
    results = launch.run(4, export_on_rank, TrainingSetup(stage, 2, steps=2), str(tmp_path), ids)
    trained = assemble(results)
    model_class = type(CASES_BY_ID["mixtral"].build())
    exported = model_class.from_pretrained(tmp_path / "hf_live").eval()
    # Every weight, all 4 experts of each layer included, is the trained one bit for bit.
    params = dict(exported.named_parameters())
    assert params.keys() == trained.keys()
    assert all(torch.equal(params[name], value) for name, value in trained.items())
    # The original Transformers blocks reproduce the trained AutoEP model's logits (the same
    # weights through another implementation of the same math: float32 summation order only).
    with torch.no_grad():
        assert_close("logits", exported(input_ids=ids).logits, results[0]["logits"], tolerance(torch.float32))
    # Offline, from the DeepSpeed checkpoint folder (the console command): the same file contents.
    from autoep.cli import main

    assert main(["export-hf", "--input_folder", str(tmp_path / "saved"), "--output_dir",
                 str(tmp_path / "hf_offline")]) == 0
    live, offline = load_file(tmp_path / "hf_live" / "model.safetensors"), \
        load_file(tmp_path / "hf_offline" / "model.safetensors")
    assert live.keys() == offline.keys()
    assert all(torch.equal(live[name], offline[name]) for name in live)
    with pytest.raises(FileExistsError, match="already exists"):
        autoep.save_pretrained(str(tmp_path / "saved"), str(tmp_path / "hf_offline"))


def native_moe_zero3_on_rank() -> str:
    """autoep.initialize at ZeRO-3 on a model that also holds a native DeepSpeed MoE layer."""
    import torch
    from deepspeed.moe.layer import MoE

    import autoep
    from matrix.models import CASES_BY_ID
    from conformance.training import ADAMW, deepspeed_config

    with process_globals_restored():
        model = CASES_BY_ID["mixtral"].build().train()
        model.native_moe = MoE(hidden_size=32, expert=torch.nn.Linear(32, 32), num_experts=2, ep_size=1, k=1)
        try:
            autoep.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), **ADAMW),
                              config=deepspeed_config(TrainingSetup(3, 2), "float32"))
        except Exception as error:
            return f"{type(error).__name__}: {error}"
        return "accepted"


def test_zero3_rejects_a_model_that_also_holds_native_deepspeed_moe_layers():
    for outcome in launch.run(2, native_moe_zero3_on_rank):
        assert outcome.startswith("AutoEPConfigError: zero_optimization.stage=3 with native "
                                  "deepspeed.moe.layer.MoE modules (['native_moe'"), outcome
        assert "AutoEP-managed" in outcome
