"""Checkpoint folders come from elsewhere: reading one runs no code from it (only DeepSpeed's few
classes are unpickled), damage to any file is found before anything is loaded, converted or
exported (every rank raising the same error naming the file, none loading, none hanging), tags
stay inside the checkpoint folder, and temporaries of killed writers do not pile up."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch

from autoep import checkpoint as ckpt
from autoep import launch
from autoep.checkpoint import TOPOLOGY_FILE, AutoEPCheckpointError
from conformance.checkpoints import differences, engine_view
from conformance.training import TrainingSetup, build_engine, global_batches, process_globals_restored, train_steps

pytestmark = pytest.mark.xdist_group("ranks")

VOCAB = 96  # matrix.models.COMMON
WORLD = 2
TIMEOUT_S = 180  # a rank left waiting in a collective shows up as a RankTimeout, not a hung run


# ---- rank side ---------------------------------------------------------------------------------

def save_on_rank(setup: TrainingSetup, folder: str) -> None:
    with process_globals_restored():
        engine = build_engine("mixtral", "autoep", "float32", 0, setup)
        train_steps(engine, global_batches(VOCAB, WORLD, setup), range(1), setup)
        engine.save_checkpoint(folder, tag="saved")


def load_on_rank(setup: TrainingSetup, attempts: list, universal: bool = False) -> list[tuple[str, list, list]]:
    """For each (load_dir, tag) in turn, on one engine: ("loaded" or the error, the unverified-
    checkpoint warnings, what a failed load changed in the engine). A ("save", dir, tag) entry
    saves instead."""
    results = []
    with process_globals_restored():
        engine = build_engine("mixtral", "autoep", "float32", 1, setup, load_universal=universal)
        for attempt in attempts:
            before = engine_view(engine)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ckpt.UnverifiedCheckpointWarning)
                try:
                    if attempt[0] == "save":
                        engine.save_checkpoint(attempt[1], tag=attempt[2])
                    else:
                        engine.load_checkpoint(attempt[0], tag=attempt[1])
                    outcome, changed = "loaded", []
                except AutoEPCheckpointError as error:
                    outcome, changed = str(error), differences(engine_view(engine), before, ["live", "optimizer"])
            unverified = [str(w.message) for w in caught if issubclass(w.category, ckpt.UnverifiedCheckpointWarning)]
            results.append((outcome, unverified, changed))
    return results


def load_everywhere(setup: TrainingSetup, load_dir, tag="saved", universal: bool = False):
    """[(outcome, warnings, changed)] per rank, for one load."""
    return [per_rank[0] for per_rank in launch.run(WORLD, load_on_rank, setup, [(str(load_dir), tag)], universal,
                                                    timeout=TIMEOUT_S)]


# ---- fixtures and file surgery -----------------------------------------------------------------

Z2, Z3 = TrainingSetup(2, 2), TrainingSetup(3, 2)


@pytest.fixture(scope="module")
def saved_z2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("z2")
    launch.run(WORLD, save_on_rank, Z2, str(folder), timeout=TIMEOUT_S)
    return folder


@pytest.fixture(scope="module")
def saved_z3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("z3")
    launch.run(WORLD, save_on_rank, Z3, str(folder), timeout=TIMEOUT_S)
    return folder


def copy_of(folder, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(folder, target)
    return target


def rewrite_record(tag_folder, files="current"):
    """Set the topology record's checksums to the folder's current files (what someone crafting
    a whole folder would do), or to ``files``."""
    path = tag_folder / TOPOLOGY_FILE
    record = json.loads(path.read_text())
    record["files"] = ckpt.record_files(str(tag_folder), ckpt.folder_files(str(tag_folder))) \
        if files == "current" else files
    path.write_text(json.dumps(record))


def flip_bytes(path, count=64):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(byte ^ 0xFF for byte in data[middle:middle + count])
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


class RunsAShellCommand:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def craft(path, marker):
    torch.save({"module": RunsAShellCommand(marker), "dp_world_size": WORLD}, path)


def cli(capsys, *argv) -> tuple[int, str]:
    from autoep.cli import main

    code = main(list(argv))
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---- item 7: no code runs from a checkpoint file -------------------------------------------------

def test_a_crafted_model_file_runs_nothing_in_conversion_export_or_load(saved_z2, tmp_path, capsys):
    folder = copy_of(saved_z2, tmp_path)
    marker = tmp_path / "ran"
    craft(folder / "saved" / "mp_rank_00_model_states.pt", marker)
    rewrite_record(folder / "saved")  # its checksums match: only the unpickling guard stands
    for command, output in (("to-universal", "--output_folder"), ("export-hf", "--output_dir")):
        code, err = cli(capsys, command, "--input_folder", str(folder / "saved"), output, str(tmp_path / command))
        assert code == 2 and "mp_rank_00_model_states.pt" in one_line(err) and "posix.system" in err, err
        assert not marker.exists() and not (tmp_path / command).exists()
    for outcome, _, changed in load_everywhere(Z2, folder):
        assert "mp_rank_00_model_states.pt" in outcome and "posix.system" in outcome, outcome
        assert changed == []
    assert not marker.exists()


def test_safe_loading_forces_weights_only_on_every_torch_load(tmp_path):
    # DeepSpeed's own reads pass weights_only=False; during an AutoEP load they are forced safe.
    marker = tmp_path / "ran"
    craft(tmp_path / "evil.pt", marker)
    with ckpt.safe_loading():
        with pytest.raises(pickle.UnpicklingError, match="posix.system"):
            torch.load(tmp_path / "evil.pt", weights_only=False)
    assert not marker.exists() and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    with pytest.raises(AutoEPCheckpointError, match=r"evil\.pt needs posix\.system"):
        ckpt.load_file(str(tmp_path / "evil.pt"))
    assert not marker.exists()


# ---- item 8: damage is found before anything is read ---------------------------------------------

def test_save_records_size_and_sha256_of_every_file(saved_z2):
    import hashlib

    folder = saved_z2 / "saved"
    files = json.loads((folder / TOPOLOGY_FILE).read_text())["files"]
    on_disk = sorted(p.name for p in folder.iterdir() if p.name != TOPOLOGY_FILE)
    assert sorted(files) == on_disk and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in files
    for name, record in files.items():
        data = (folder / name).read_bytes()
        assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert (saved_z2 / "latest").read_text() == "saved"


def test_a_corrupted_optimizer_shard_is_refused_by_conversion_export_and_load(saved_z3, tmp_path, capsys):
    folder = copy_of(saved_z3, tmp_path)
    shard = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    flip_bytes(folder / "saved" / shard)
    for command, output in (("to-universal", "--output_folder"), ("export-hf", "--output_dir")):
        code, err = cli(capsys, command, "--input_folder", str(folder / "saved"), output, str(tmp_path / command))
        assert code == 2 and shard in one_line(err) and "SHA-256" in err, err
        assert not (tmp_path / command).exists()
    outcomes = load_everywhere(Z3, folder)
    assert len({outcome for outcome, _, _ in outcomes}) == 1, outcomes  # the same error on every rank
    for outcome, _, changed in outcomes:
        assert shard in outcome and "SHA-256" in outcome and changed == [], outcome


def test_a_checkpoint_without_checksums_loads_with_a_warning(saved_z2, tmp_path):
    from autoep.universal import to_universal

    folder = copy_of(saved_z2, tmp_path)
    rewrite_record(folder / "saved", files=None)  # as written before checksums were recorded
    with pytest.warns(ckpt.UnverifiedCheckpointWarning, match="cannot be detected"):
        to_universal(str(folder / "saved"), str(folder / "universal"))
    for outcome, unverified, _ in load_everywhere(Z2, folder):
        assert outcome == "loaded" and unverified and "no file checksums" in unverified[0], (outcome, unverified)
    # The Universal output records its own files: its load verifies them without a warning.
    for outcome, unverified, _ in load_everywhere(Z2, folder, "universal", universal=True):
        assert outcome == "loaded" and unverified == [], (outcome, unverified)


# ---- item 9: every rank checks before any rank loads -----------------------------------------------

@pytest.mark.parametrize("stage,shard,record", [
    (2, "zero_pp_rank_1_mp_rank_00_optim_states.pt", True),
    (2, "zero_pp_rank_1_mp_rank_00_optim_states.pt", False),
    (3, "zero_pp_rank_1_mp_rank_00_model_states.pt", True),
], ids=["zero2-optim", "zero2-optim-unrecorded", "zero3-model"])
def test_a_truncated_shard_fails_on_every_rank_naming_it(stage, shard, record, saved_z2, saved_z3, tmp_path):
    folder = copy_of(saved_z2 if stage == 2 else saved_z3, tmp_path)
    truncate(folder / "saved" / shard)
    if not record:
        rewrite_record(folder / "saved", files=None)
    outcomes = load_everywhere(Z2 if stage == 2 else Z3, folder)  # (a hang would be a RankTimeout)
    assert len({outcome for outcome, _, _ in outcomes}) == 1, outcomes
    for outcome, _, changed in outcomes:
        assert shard in outcome and "truncated" in outcome and changed == [], outcome


# ---- item 10: tags stay inside the load folder -----------------------------------------------------

def test_tag_folder_refuses_names_leading_outside(tmp_path):
    (tmp_path / "ckpt" / "a").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", tmp_path / "ckpt" / "link")
    base = str(tmp_path / "ckpt")
    assert ckpt.tag_folder(base, "a") == os.path.join(base, "a")
    assert ckpt.tag_folder(base, "run1/step2") == os.path.join(base, "run1/step2")
    for tag, why in (("../outside", "without '..'"), ("a/../../outside", "without '..'"),
                     (str(tmp_path / "outside"), "without '..'"), ("", "without '..'"),
                     ("link", "through a symbolic link")):
        with pytest.raises(AutoEPCheckpointError, match=why) as raised:
            ckpt.tag_folder(base, tag)
        assert repr(tag) in str(raised.value)


def test_tags_and_latest_leading_outside_the_load_folder_are_refused(saved_z2, tmp_path):
    elsewhere = copy_of(saved_z2, tmp_path)  # a loadable checkpoint outside each load folder below
    relative, absolute, linked = tmp_path / "relative", tmp_path / "absolute", tmp_path / "linked"
    for folder in (relative, absolute, linked):
        folder.mkdir()
    (relative / "latest").write_text("../ckpt/saved")
    (absolute / "latest").write_text(str(elsewhere / "saved"))
    os.symlink(elsewhere / "saved", linked / "saved")
    attempts = [(str(relative), None), (str(absolute), None), (str(linked), "saved"),
                (str(relative), "../ckpt/saved"), (str(relative), str(elsewhere / "saved")),
                ("save", str(relative), "../escaped"), (str(elsewhere), None)]
    for per_rank in launch.run(WORLD, load_on_rank, Z2, attempts, timeout=TIMEOUT_S):
        messages = [outcome for outcome, _, _ in per_rank]
        for message, expected in zip(messages[:3], ("'../ckpt/saved'", repr(str(elsewhere / "saved")), "'saved'")):
            assert expected in message and "refused" in message, message
        assert "latest" in messages[0] and "symbolic link" in messages[2]
        assert all("refused" in message for message in messages[3:6]), messages
        assert not (tmp_path / "escaped").exists()
        assert messages[6] == "loaded"  # the same checkpoint, from its own folder
        assert all(changed == [] for _, _, changed in per_rank[:6])


# ---- item 11: temporaries of killed writers ------------------------------------------------------

@pytest.mark.parametrize("command,output", [("to-universal", "--output_folder"), ("export-hf", "--output_dir")])
def test_a_writer_removes_temporaries_of_dead_writers_only(command, output, saved_z2, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    ours = ckpt.temporary_path(str(out)).rsplit("-", 1)[0]  # "<out>.tmp-<this host>"
    stale = [f"{out}.tmp-{dead.pid}", f"{ours}-{dead.pid}"]  # an older writer's name, and ours
    kept = [f"{ours}-{os.getppid()}", f"{out}.tmp-otherhost-{dead.pid}"]  # running; another host's
    for path in stale + kept:
        os.makedirs(os.path.join(path, "zero"))
    code, err = cli(capsys, command, "--input_folder", str(saved_z2 / "saved"), output, str(out))
    assert code == 0, err
    assert out.is_dir() and not any(os.path.exists(path) for path in stale)
    assert all(os.path.isdir(path) for path in kept)
